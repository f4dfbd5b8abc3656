"""The `import tilemem as TM` SDK contract: names, docstring examples, handles and backends."""

import doctest
import importlib
from pathlib import Path

import pytest

import tilemem as TM
from tilemem.artifacts.mir import plan_checksum
from tilemem.errors import ConfigError

SEED_NAMES = [
    "model_spec",
    "model_spec_from_dict",
    "model_spec_from_hf_config",
    "infer_moe_topology",
    "plan",
    "plan_from_hf_config",
    "TileHandle",
    "BackendCapability",
    "BackendRegistry",
    "register_backend",
    "build_tile_handles",
    "checkpoint_weight_names",
    "match_checkpoint_weights",
    "build_runtime_weight_aliases",
    "build_mir",
]


def test_sdk_exports_the_seed_names():
    assert set(SEED_NAMES) <= set(TM.__all__)
    assert all(hasattr(TM, name) for name in TM.__all__)


@pytest.mark.parametrize(
    "module",
    [
        "tilemem.sdk.api",
        "tilemem.sdk.backends",
        "tilemem.sdk.checkpoint_names",
        "tilemem.sdk.tmem",
        "tilemem.placement.profile",
        "tilemem.placement.policies",
    ],
)
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_every_public_sdk_function_has_a_runnable_example():
    for name in TM.__all__:
        obj = getattr(TM, name)
        if callable(obj) and not isinstance(obj, type):
            assert ">>>" in (obj.__doc__ or ""), name


def demo_spec(**kw):
    base = dict(
        name="olmoe_like_demo",
        layers=4,
        experts_per_layer=16,
        hidden_size=256,
        intermediate_size=512,
        top_k=4,
        expert_budget=4,
        workload="mixed",
        tile={"hidden_tile": 128, "intermediate_tile": 128, "shard_count": 2, "projection_groups": ["gate_up", "down"]},
        memory={"gpu_cache_budget_gib": 8.0, "cpu_cache_budget_gib": 0.05},
    )
    return TM.model_spec(**{**base, **kw})


def test_seed_flow_plan_handles_dispatch():
    compiled = TM.plan(demo_spec())
    assert compiled.mir.name == "olmoe_like_demo" and compiled.mir.schema_version == "tilemem_mir_v1"
    assert len(compiled.handles) == len(compiled.manifest.tiles) == len(compiled.plan.tiles)
    h = compiled.handles[0]
    assert h.stable_key == "L0:E0:gate_up:S0:N0-128" and h.dispatchable and h.backend == "tilemem_builtin"
    assert (h.dtype, h.format, h.scale_bytes, h.fallback_dtype) == ("bf16", "bf16", 0, "bf16")
    assert {t.tier for t in compiled.plan.tiers} == {"cuda", "cpu", "disk"}  # expert budget + cpu budget
    summary = compiled.dispatch_summary(iterations=3)
    assert len(summary["iterations"]) == 3 and summary["dispatchable"] == summary["tiles"]
    assert summary == compiled.dispatch_summary(iterations=3)  # deterministic
    assert TM.plan(demo_spec()).checksum == compiled.checksum


def test_low_precision_tiles_dispatch_only_where_a_backend_declares_them():
    compiled = TM.plan(demo_spec(precision={"format": "fp8_e4m3"}, runtime={"backend": "customer_cuda_fp8"}))
    handles = TM.build_tile_handles(compiled.manifest)
    assert not any(h.dispatchable for h in handles)
    assert handles[0].backend == "customer_cuda_fp8" and handles[0].fallback_backend == "tilemem_builtin"
    assert handles[0].scale_layout == "block128x128_fp32" and handles[0].scale_bytes > 0
    registry = TM.BackendRegistry()
    TM.register_backend(
        TM.BackendCapability(
            name="customer_cuda_fp8",
            formats=["fp8_e4m3"],
            layouts=["block128x128_fp32"],
            scale_granularities=["block2d"],
            projection_groups=["gate_up"],
            runtime_entrypoint="kernels/gemm_fp8.cu:tilemem_launch_gemm_fp8",
            hardware_targets=["cuda_sm90"],
        ),
        registry=registry,
    )
    handles = TM.build_tile_handles(compiled.manifest, registry=registry)
    assert all(h.dispatchable == (h.projection_group == "gate_up") for h in handles)
    with pytest.raises(ConfigError, match="already registered"):
        TM.register_backend(TM.BackendCapability(name="customer_cuda_fp8", formats=["x"]), registry=registry)
    with pytest.raises(ConfigError, match="unknown projection groups"):
        TM.BackendCapability(name="b", formats=["x"], projection_groups=["gate"])


def test_save_and_load(tmp_path):
    compiled = TM.plan(demo_spec())
    paths = compiled.save(tmp_path)
    assert set(paths) == {"mir", "manifest", "heatmap", "model_spec"}
    assert plan_checksum(TM.load_plan(tmp_path)) == compiled.checksum
    again = TM.model_spec_from_dict(__import__("json").loads(paths["model_spec"].read_text()))
    assert TM.plan(again).checksum == compiled.checksum
    assert len(TM.build_tile_handles(tmp_path)) == len(compiled.handles)


def test_hf_checkpoint_topology_names_and_aliases(make_ckpt):
    ckpt = make_ckpt("qwen2_moe")
    topo = TM.infer_moe_topology(ckpt)
    assert topo.family == "qwen2_moe" and topo.to_dict()["dense_layers"] == [1]
    spec = TM.model_spec_from_hf_config(ckpt)
    names = TM.checkpoint_weight_names(ckpt)
    match = TM.match_checkpoint_weights(names, spec=spec)
    assert match.missing == [] and set(match.matched) == {f"L{i}:E{e}" for i in (0, 2) for e in range(8)}
    assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in match.other
    aliases = TM.build_runtime_weight_aliases(family=topo.family, layers=[0], experts=[0])
    assert aliases["L0:E0"]["hub"]["down"] == ["model.layers.0.mlp.experts.0.down_proj.weight"]
    compiled = TM.plan_from_hf_config(ckpt, expert_budget=2, schedule={"policy": "kt_expert"})
    assert compiled.plan.policy == "kt_expert"
    assert any(t.key.startswith("L1:Edense:") for t in compiled.plan.tiles)
    assert any(t.key.startswith("L0:Eshared:") for t in compiled.plan.tiles)
    assert compiled.plan.usage("cuda").non_expert == topo.topology.non_expert_bytes


SPEC_ERRORS = {
    "no hidden size": (
        lambda: TM.model_spec_from_dict(
            {"model": {"name": "x", "layers": 2, "experts_per_layer": 4, "intermediate_size": 8}}
        ),
        "model needs hidden_size",
    ),
    "unknown tile key": (lambda: demo_spec(tile={"tile_size": 3}), "unknown key 'tile_size' in block 'tile'"),
    "top_k out of range": (lambda: demo_spec(top_k=17), "top_k must be in 1..16"),
    "bad projection groups": (
        lambda: demo_spec(tile={"projection_groups": ["gate", "up"]}),
        "projection_groups must be 'gate_up, down'",
    ),
    "missing checkpoint": (
        lambda: TM.infer_moe_topology(Path("/nonexistent/ckpt")),
        "does not exist|neither a checkpoint",
    ),
}


@pytest.mark.parametrize("case", sorted(SPEC_ERRORS))
def test_spec_error_is_clear(case):
    make, match = SPEC_ERRORS[case]
    with pytest.raises(ConfigError, match=match):
        make()


def test_docs_sdk_walkthrough_runs():
    path = Path(__file__).parents[1] / "docs" / "sdk.md"
    result = doctest.testfile(str(path), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 30 and result.failed == 0
