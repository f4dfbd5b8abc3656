"""Plan artifacts (MIR, manifest, heatmap), the runtime's queries, and `.tmem` configs."""

import json

import pytest

from tilemem.artifacts.mir import load_plan, plan_checksum, save_plan
from tilemem.models.topology import LayerTopology, Topology
from tilemem.placement.budgets import Budgets
from tilemem.placement.errors import PlanError, TmemSyntaxError
from tilemem.placement.formats import tile_format
from tilemem.placement.plan import Plan
from tilemem.placement.planner import build_plan
from tilemem.placement.policies import PlacementProblem
from tilemem.placement.profile import Profile
from tilemem.placement.store_layout import ALIGNMENT
from tilemem.placement.tiles import SHARED
from tilemem.sdk.compiler import compile_spec
from tilemem.sdk.model_spec import spec_from_dict
from tilemem.sdk.tmem import format_tmem, load_tmem, parse_tmem


@pytest.fixture(scope="module")
def plan() -> Plan:
    layers = (LayerTopology(0, True, 4, 2, 40, 24, 0), LayerTopology(1, False, 0, 0, 0, 0, 48))
    topo = Topology("generic", 16, "bfloat16", 2, layers, (("model.embed_tokens.weight", 4096), ("attn", 2048)))
    fmt = tile_format("bf16")
    budgets = Budgets.parse("cuda=16KiB,cpu=6KiB")
    problem = PlacementProblem(topo, Profile.synthetic(topo, 1.0), budgets, fmt, tile=16)
    return build_plan(problem, "tilepo_fine", "demo")


def test_artifacts_round_trip_with_checksums(plan, tmp_path):
    paths = save_plan(plan, tmp_path)
    assert {p.name for p in paths.values()} == {"mir.json", "manifest.json", "heatmap.png"}
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mir = json.loads(paths["mir"].read_text())
    assert mir["schema_version"] == "tilemem_mir_v1" and mir["checksum"] == plan_checksum(plan)
    loaded = load_plan(tmp_path)
    assert plan_checksum(loaded) == plan_checksum(plan) and loaded.tiles == plan.tiles
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_tampered_artifacts_are_refused(plan, tmp_path):
    paths = save_plan(plan, tmp_path, heatmap=False)
    manifest = json.loads(paths["manifest"].read_text())
    manifest["tiles"][0]["tier"] = "disk"
    paths["manifest"].write_text(json.dumps(manifest))
    with pytest.raises(PlanError, match="manifest checksum does not match"):
        load_plan(tmp_path)
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(tmp_path / "nowhere")


def test_manifest_records_everything_a_backend_needs(plan):
    from tilemem.artifacts.mir import build_artifacts

    _, manifest = build_artifacts(plan)
    t = manifest["tiles"][0]
    assert set(t) >= {"key", "tier", "offset", "bytes", "dtype", "format", "scale", "backend", "fallback"}
    assert t["key"] == "L0:Eshared:gate_up:S0:N0-16" and t["offset"] == 0  # a layer's shared experts first
    routed = next(x for x in manifest["tiles"] if x["expert"] == 0)
    assert routed["key"] == "L0:E0:gate_up:S0:N0-16" and routed["offset"] > 0
    assert all(x["offset"] % ALIGNMENT == 0 for x in manifest["tiles"] if x["group"] == "gate_up")
    assert all(x["bytes"] == (2 if x["group"] == "gate_up" else 1) * (x["end"] - x["start"]) * 16 * 2
               for x in manifest["tiles"])  # fmt: skip
    assert manifest["tiles"][0]["fallback"] == {"dtype": "bf16", "backend": "tilemem_builtin"}


def test_runtime_queries(plan):
    ranges = plan.resident_ranges(0, 0)
    covered = sorted(r for rs in ranges.values() for r in rs)
    assert covered[0][0] == 0 and covered[-1][1] == 40
    tier, (a, b) = next((t, r[0]) for t, r in ranges.items())
    first = next(t for t in plan.tiles if (t.layer, t.expert, t.start) == (0, 0, a))
    assert plan.tier_of(0, 0, "down", first.start, first.end) == tier
    assert plan.tier_of(0, SHARED, "gate_up", 0, 16) == "cuda"  # always-active tiles first
    assert plan.tile_by_key(first.key) == first
    with pytest.raises(PlanError, match="resident_ranges"):
        plan.tier_of(0, 0, "down", 0, 3)
    assert all(w.tier == "cuda" for w in plan.non_expert)
    assert sum(u.tiles for u in plan.tiers) == sum(t.total_bytes for t in plan.tiles)


TMEM = """# a demo plan config
model {
  name = demo            # trailing comments are fine
  layers = 3
  experts_per_layer = 8
  hidden_size = 32
  intermediate_size = 64
  top_k = 2
  dense_layers = 0
  dense_intermediate_size = 96
  expert_budget = 3
}
tile { intermediate_tile = 16 }
memory {
  cpu = 100KiB
  cache = "cuda=5%"
}
schedule {
  policy = tilepo_hybrid
  async_planning = on
}
runtime { prefetch = off }
"""


def test_tmem_parses_to_the_same_plan_as_json(tmp_path):
    spec = parse_tmem(TMEM, "demo.tmem")
    assert spec.dense_layers == (0,) and spec.setting("schedule", "async_planning") is True
    as_json = spec_from_dict(json.loads(json.dumps(spec.to_dict())))
    assert plan_checksum(compile_spec(spec)) == plan_checksum(compile_spec(as_json))
    assert parse_tmem(format_tmem(spec)) == spec
    path = tmp_path / "demo.tmem"
    path.write_text(TMEM)
    plan = compile_spec(load_tmem(path))
    assert plan.policy == "tilepo_hybrid" and [u.tier for u in plan.tiers] == ["cuda", "cpu", "disk"]
    assert plan.usage("cuda").cache > 0 and plan.settings["prefetch"] is False


@pytest.mark.parametrize(
    "text, where, message",
    [
        ("model {\n  layers 3\n}\n", "2:10", "expected '=' after key 'layers'"),
        ("model {\n  layers = three\n}\n", "2:12", "model.layers must be an integer"),
        ("model {\n  layers = 3\n", "1:1", "block 'model' is never closed"),
        ("modle {\n}\n", "1:1", "unknown block 'modle'"),
        ("model {\n}\ntile {\n  tile_size = 3\n}\n", "4:3", "unknown key 'tile_size' in block 'tile'"),
        ('model {\n  name = "demo\n}\n', "2:10", "unterminated string"),
        ("model {\n  name = a\n  name = b\n}\n", "3:3", "key .name. is set twice"),
        ("tile { intermediate_tile = 8 }\n", "1:1", "no 'model' block"),
        ("model\n", "1:6", "expected '{'"),
    ],
)
def test_malformed_tmem_names_line_and_column(text, where, message):
    with pytest.raises(TmemSyntaxError, match=f"bad.tmem:{where}: {message}"):
        parse_tmem(text, "bad.tmem")
