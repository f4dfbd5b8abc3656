"""`tilemem profile | plan | compile` on a synthetic checkpoint, and their errors for bad input."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tilemem.artifacts.mir import load_plan, plan_checksum
from tilemem.cli import plan_commands
from tilemem.errors import ConfigError
from tilemem.placement.errors import BudgetError, PolicyError, ProfileError, TmemSyntaxError


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="tilemem")
    sub = parser.add_subparsers(dest="command", required=True)
    plan_commands.register(sub)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("olmoe", dtype="bf16", routing_skew=2.0)


@pytest.fixture(scope="module")
def profile_path(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("prof") / "profile.json"
    assert cli("profile", ckpt, "--workload", "chat", "--tokens", "40", "--out", out) == 0
    return out


def test_profile_then_plan_with_byte_budget(ckpt, profile_path, tmp_path, capsys):
    data = json.loads(profile_path.read_text())
    assert data["schema_version"] == "tilemem_profile_v1" and data["workloads"] == ["chat"]
    out = tmp_path / "plan"
    args = ("plan", ckpt, "--profile", profile_path, "--budget", "cuda=250KiB,cpu=50KiB", "--tile-size", "8")
    assert cli(*args, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "tier" in printed and "cuda" in printed and "disk" in printed and "checksum" in printed
    assert {p.name for p in out.iterdir()} == {"mir.json", "manifest.json", "heatmap.png"}
    plan = load_plan(out)
    assert plan.policy == "tilepo_fine" and [u.tier for u in plan.tiers] == ["cuda", "cpu", "disk"]
    assert all(u.used <= u.capacity for u in plan.tiers if u.capacity is not None)
    # Same inputs, same plan.
    assert cli(*args, "--out", tmp_path / "again") == 0
    assert plan_checksum(load_plan(tmp_path / "again")) == plan_checksum(plan)


@pytest.mark.parametrize("policy", ["uniform", "kt_expert", "tilepo_coarse", "tilepo_hybrid", "tilepo_adaptive"])
def test_every_policy_plans_an_expert_budget(ckpt, profile_path, tmp_path, policy):
    out = tmp_path / policy
    assert cli("plan", ckpt, "--profile", profile_path, "--experts-per-layer", "3", "--policy", policy,
               "--no-heatmap", "--out", out) == 0  # fmt: skip
    plan = load_plan(out)
    assert plan.policy == policy and plan.budget_source == "experts_per_layer=3"


def test_compile_json_spec_and_tmem_without_checkpoint(tmp_path, capsys):
    spec = {
        "model": {"name": "demo", "layers": 2, "experts_per_layer": 8, "hidden_size": 64, "intermediate_size": 96},
        "memory": {"cuda": "160KiB", "cpu": "64KiB"},
        "schedule": {"policy": "tilepo_fine"},
        "tile": {"intermediate_tile": 32},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert cli("compile", "--model-spec", tmp_path / "spec.json", "--out-dir", tmp_path / "a") == 0
    tmem = (
        "model {\n  name = demo\n  layers = 2\n  experts_per_layer = 8\n  hidden_size = 64\n"
        "  intermediate_size = 96\n}\nmemory {\n  cuda = 160KiB\n  cpu = 64KiB\n}\n"
        "schedule { policy = tilepo_fine }\ntile { intermediate_tile = 32 }\n"
    )
    (tmp_path / "plan.tmem").write_text(tmem)
    assert cli("compile", "--model-spec", tmp_path / "plan.tmem", "--out-dir", tmp_path / "b") == 0
    assert plan_checksum(load_plan(tmp_path / "a")) == plan_checksum(load_plan(tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "model_spec.json").read_text())["model"]["name"] == "demo"
    assert "wrote" in capsys.readouterr().out


def test_plan_without_weights_from_config_json(ckpt, tmp_path):
    assert cli("plan", ckpt / "config.json", "--budget", "cpu=1MiB", "--no-heatmap", "--out", tmp_path / "p") == 0
    assert load_plan(tmp_path / "p").tiers[0].tier == "cpu"


def _bad_tmem(tmp_path):
    bad = tmp_path / "bad.tmem"
    bad.write_text("model {\n  layers = 2\n  experts_per_layer: 8\n}\n")
    return bad


def _yaml_spec(tmp_path):
    (tmp_path / "spec.yaml").write_text("")
    return tmp_path / "spec.yaml"


BAD_INPUTS = {
    "profile of another model": (
        lambda c, p, m, t: ("plan", m("qwen2_moe"), "--profile", p, "--experts-per-layer", "2"),
        ProfileError,
        "was recorded on a olmoe model with 2 layers",
    ),
    "impossible budget": (
        lambda c, p, m, t: ("plan", c, "--budget", "cuda=10KiB"),
        BudgetError,
        r"impossible budget: .* missing; raise cuda to at least",
    ),
    "unknown policy": (
        lambda c, p, m, t: ("plan", c, "--experts-per-layer", "2", "--policy", "best"),
        PolicyError,
        "unknown policy 'best'",
    ),
    "unknown tier": (lambda c, p, m, t: ("plan", c, "--budget", "gpu=1GiB"), BudgetError, "unknown tier 'gpu'"),
    "tmem syntax error": (
        lambda c, p, m, t: ("compile", "--model-spec", _bad_tmem(t)),
        TmemSyntaxError,
        r"bad.tmem:3:20: expected '=' after key 'experts_per_layer'",
    ),
    "spec of unknown kind": (
        lambda c, p, m, t: ("compile", "--model-spec", _yaml_spec(t)),
        ConfigError,
        r"must be a .json model spec or a .tmem",
    ),
    "missing model": (
        lambda c, p, m, t: ("plan", t / "missing", "--experts-per-layer", "2"),
        ConfigError,
        "is not a checkpoint directory, a config.json, or a preset",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_a_clear_error_and_writes_nothing(case, ckpt, profile_path, make_ckpt, tmp_path):
    argv, error, match = BAD_INPUTS[case]
    args = argv(ckpt, profile_path, make_ckpt, tmp_path)
    out = tmp_path / "x"
    with pytest.raises(error, match=match):
        cli(*args, "--out-dir" if args[0] == "compile" else "--out", out)
    assert not out.exists()  # nothing half-written


def test_main_prints_one_line_and_exits_2(ckpt, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "tilemem.cli.main", "plan", str(ckpt), "--experts-per-layer", "2"]
    res = subprocess.run(
        [*cmd, "--policy", "nope", "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env
    )
    assert res.returncode == 2, res.stderr
    assert "error: unknown policy 'nope'" in res.stderr and "Traceback" not in res.stderr


def test_fine_plan_offsets_match_the_converted_tile_store(ckpt, profile_path, tmp_path):
    from tilemem.runtime.tile_store import TileStore, convert

    out = tmp_path / "plan"
    assert cli("plan", ckpt, "--profile", profile_path, "--experts-per-layer", "2", "--tile-size", "8",
               "--no-heatmap", "--out", out) == 0  # fmt: skip
    plan = load_plan(out)
    store = TileStore(convert(ckpt, tmp_path / "store", tile_size=8, progress=False))
    routed = [t for t in plan.tiles if t.expert >= 0]
    stored = {(s.layer, s.expert, s.start): s for lt in plan.topology.layers for e in range(lt.num_experts)
              for s in store.tiles_of(lt.index, e)}  # fmt: skip
    assert len(stored) * 2 == len(routed)
    assert plan.fmt.name == "x12" and store.codec.x12  # a bf16 checkpoint's tiles, counted as the store keeps them
    ends: dict[tuple, int] = {}
    for t in routed:
        s = stored[(t.layer, t.expert, t.start)]
        if t.group == "gate_up":
            assert t.offset == s.offset  # the block starts with gate and up rows
        end = max(t.offset + t.nbytes, t.scale_offset + t.scale_bytes)
        ends[(t.layer, t.expert, t.start)] = max(end, ends.get((t.layer, t.expert, t.start), 0))
    for key, end in ends.items():  # x12: the code table, row offsets and exceptions counted as the groups' scales
        assert 0 <= end - (stored[key].offset + stored[key].nbytes) <= 2  # each third rounded up
