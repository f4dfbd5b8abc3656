"""The `import tilemem as TM` planning SDK: model spec -> plan (MIR, manifest) -> tile handles.

    >>> import tilemem as TM
    >>> spec = TM.model_spec(name="my_moe", layers=2, experts_per_layer=4, hidden_size=16,
    ...                      intermediate_size=32, expert_budget=2)
    >>> compiled = TM.plan(spec)
    >>> compiled.mir.schema_version, len(compiled.handles)
    ('tilemem_mir_v1', 16)

The implementation lives in the SDK's modules beside this one, in `tilemem.placement` (planning),
`tilemem.artifacts` (MIR, manifest) and `tilemem.tmap` (`hardware_profile`); this module gathers the
public names.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilemem.artifacts.mir import Manifest, Mir, build_artifacts, save_plan
from tilemem.artifacts.mir import load_plan as _load_plan
from tilemem.jsonio import write_json_atomic
from tilemem.models.topology import Topology
from tilemem.placement.plan import Plan
from tilemem.placement.policies import policy_names
from tilemem.placement.profile import Profile, merge_profiles
from tilemem.sdk.backends import (
    BackendCapability,
    BackendRegistry,
    TileHandle,
    build_tile_handles,
    register_backend,
)
from tilemem.sdk.checkpoint_names import (
    build_runtime_weight_aliases,
    checkpoint_weight_names,
    match_checkpoint_weights,
)
from tilemem.sdk.compiler import compile_spec, spec_profile
from tilemem.sdk.model_spec import ModelSpec, build_spec, parse_blocks, read_hf_config, spec_from_dict
from tilemem.sdk.tmem import format_tmem, load_tmem, parse_tmem
from tilemem.tmap import HardwareProfile, hardware_profile  # TMAP's seed-named entry point (`TM.hardware_profile`)

__all__ = [
    "BackendCapability",
    "BackendRegistry",
    "HardwareProfile",
    "ModelSpec",
    "MoETopology",
    "Plan",
    "Profile",
    "TileHandle",
    "TileMEMPlan",
    "build_mir",
    "build_runtime_weight_aliases",
    "build_tile_handles",
    "checkpoint_weight_names",
    "format_tmem",
    "hardware_profile",
    "infer_moe_topology",
    "load_plan",
    "load_profile",
    "load_tmem",
    "match_checkpoint_weights",
    "merge_profiles",
    "model_spec",
    "model_spec_from_dict",
    "model_spec_from_hf_config",
    "parse_tmem",
    "plan",
    "plan_from_hf_config",
    "policy_names",
    "register_backend",
]


@dataclass(frozen=True)
class TileMEMPlan:
    """A compiled plan: the Plan, its MIR and manifest, and dispatch-ready tile handles."""

    spec: ModelSpec
    """The spec it was compiled from."""
    plan: Plan
    """The typed plan (tiers, tiles, queries for the runtime)."""
    profile: Profile
    """The routing profile it was planned with."""
    mir: Mir
    """Public model/tile intermediate representation."""
    manifest: Manifest
    """Per-tile deployment metadata."""
    handles: tuple[TileHandle, ...]
    """One handle per tile (built-in backend; rebuild with your registry via build_tile_handles)."""

    @property
    def checksum(self) -> str:
        """The plan's sha256 (of the MIR)."""
        return self.mir.checksum

    def dispatch_summary(self, iterations: int = 3, seed: int = 0) -> dict[str, Any]:
        """Handles per backend and tier, and `iterations` simulated decode steps routed by the profile.

        >>> import tilemem as TM
        >>> compiled = TM.plan(TM.model_spec(name="d", layers=2, experts_per_layer=4, hidden_size=16,
        ...                                  intermediate_size=32, expert_budget=2))
        >>> s = compiled.dispatch_summary(iterations=2)
        >>> s["tiles"], s["dispatchable"], len(s["iterations"])
        (16, 16, 2)
        """
        handles = self.handles
        by_tier: dict[str, dict[str, int]] = {}
        for h in handles:
            entry = by_tier.setdefault(h.residency, {"tiles": 0, "bytes": 0})
            entry["tiles"] += 1
            entry["bytes"] += h.weight_bytes + h.scale_bytes
        rng = random.Random(seed)
        steps = []
        for step in range(iterations):
            routed = {layer: _sample_topk(rng, self.profile.probabilities(layer), self.profile.model.top_k)
                      for layer in self.profile.model.moe_layers}  # fmt: skip
            hit = [h for h in handles if isinstance(h.expert, str) or h.expert in routed.get(h.layer, ())]
            steps.append(
                {
                    "step": step,
                    "experts": {str(k): sorted(v) for k, v in routed.items()},
                    "tiles_by_tier": dict(sorted(Counter(h.residency for h in hit).items())),
                    "bytes_by_tier": _sum_by(hit, lambda h: h.residency),
                    "not_dispatchable": sum(not h.dispatchable for h in hit),
                }
            )
        return {
            "plan": self.plan.name,
            "policy": self.plan.policy,
            "checksum": self.checksum,
            "tiles": len(handles),
            "dispatchable": sum(h.dispatchable for h in handles),
            "by_backend": dict(sorted(Counter(h.backend for h in handles).items())),
            "by_tier": dict(sorted(by_tier.items())),
            "expected_bytes_per_token": self.plan.expected_bytes_per_token,
            "iterations": steps,
        }

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write mir.json, manifest.json, heatmap.png and model_spec.json into `out_dir` (atomically)."""
        paths = save_plan(self.plan, out_dir)
        paths["model_spec"] = write_json_atomic(Path(out_dir) / "model_spec.json", self.spec.to_dict())
        return paths


@dataclass(frozen=True)
class MoETopology:
    """What `infer_moe_topology` found in a Hugging Face config: the checkpoint's family and name with its
    shape twice, as an SDK `ModelSpec` and as the `Topology` planning uses (a result, not a third shape)."""

    family: str
    """Model family."""
    name: str
    """Checkpoint (directory) name."""
    spec: ModelSpec
    """The shape as a ModelSpec."""
    topology: Topology
    """Per-layer structure and bytes."""

    def to_dict(self) -> dict[str, Any]:
        """Summary: shape, layers, bytes."""
        t = self.topology
        return {
            "family": self.family,
            "name": self.name,
            "layers": len(t.layers),
            "moe_layers": t.moe_layers,
            "experts_per_layer": self.spec.experts_per_layer,
            "top_k": self.spec.top_k,
            "hidden_size": t.hidden_size,
            "expert_intermediate": self.spec.intermediate_size,
            "shared_intermediate": self.spec.shared_intermediate_size,
            "dense_layers": list(self.spec.dense_layers),
            "dtype": t.dtype,
            "expert_bytes": t.expert_bytes(t.moe_layers[0]) if t.moe_layers else 0,
            "non_expert_bytes": t.non_expert_bytes,
            "total_bytes": t.total_bytes,
        }


def model_spec(
    name: str,
    layers: int,
    experts_per_layer: int,
    hidden_size: int,
    intermediate_size: int,
    top_k: int | None = None,
    expert_budget: int | None = None,
    workload: str | dict | None = None,
    tile: dict | None = None,
    memory: dict | None = None,
    precision: dict | None = None,
    schedule: dict | None = None,
    runtime: dict | None = None,
    **model: Any,
) -> ModelSpec:
    """Describe a MoE model shape and how to plan it (`model` takes the other `model` block keys).

    >>> import tilemem as TM
    >>> spec = TM.model_spec(name="demo", layers=4, experts_per_layer=8, hidden_size=64,
    ...                      intermediate_size=96, top_k=2, expert_budget=2,
    ...                      tile={"intermediate_tile": 32}, schedule={"policy": "tilepo_fine"})
    >>> spec.layers, spec.setting("tile", "intermediate_tile")
    (4, 32)
    """
    payload: dict[str, Any] = {
        "model": {
            "name": name,
            "layers": layers,
            "experts_per_layer": experts_per_layer,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "top_k": top_k,
            "expert_budget": expert_budget,
            **model,
        }
    }
    blocks = {"workload": workload, "tile": tile, "memory": memory, "precision": precision}
    blocks |= {"schedule": schedule, "runtime": runtime}
    payload.update({k: v for k, v in blocks.items() if v is not None})
    return spec_from_dict(payload)


def model_spec_from_dict(payload: dict[str, Any]) -> ModelSpec:
    """A ModelSpec from a JSON-style dict (nested blocks, or flat `model` keys with nested blocks).

    >>> import tilemem as TM
    >>> TM.model_spec_from_dict({"model": {"name": "x", "layers": 2, "experts_per_layer": 4,
    ...     "hidden_size": 16, "intermediate_size": 32}, "memory": {"cuda": "1MiB"}}).name
    'x'
    """
    return spec_from_dict(payload)


def model_spec_from_hf_config(
    path: str | Path | dict, name: str | None = None, expert_budget: int | None = None, **blocks: dict
) -> ModelSpec:
    """A ModelSpec from a checkpoint directory, a config.json, or a config dict (exact topology).

    >>> import tilemem as TM
    >>> cfg = {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "vocab_size": 512,
    ...        "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
    ...        "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2}
    >>> spec = TM.model_spec_from_hf_config(cfg, expert_budget=2)
    >>> spec.family, spec.experts_per_layer, spec.top_k
    ('olmoe', 8, 2)
    """
    cfg, label = read_hf_config(path)
    source = {} if isinstance(path, dict) else {"hf_config": str(path)}
    model = {"name": name or label, "expert_budget": expert_budget}
    where = "hf_config" if isinstance(path, dict) else str(path)
    return build_spec(
        {k: v for k, v in model.items() if v is not None}, parse_blocks(blocks, where), where, (cfg, source)
    )


def infer_moe_topology(path: str | Path | dict) -> MoETopology:
    """The MoE structure of a Hugging Face checkpoint directory, config.json or config dict.

    >>> import tilemem as TM
    >>> cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 512,
    ...        "hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 2,
    ...        "num_attention_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 2}
    >>> t = TM.infer_moe_topology(cfg)
    >>> t.family, t.to_dict()["experts_per_layer"], t.to_dict()["expert_bytes"]
    ('mixtral', 8, 18432)
    """
    spec = model_spec_from_hf_config(path)
    return MoETopology(spec.family, spec.name, spec, spec.topology())


def plan(spec: ModelSpec, profile: Profile | str | Path | None = None, policy: str | None = None) -> TileMEMPlan:
    """Compile `spec` (with a profile, else its workload.profile, else uniform routing).

    With no budget in the spec, the GPU holds top_k experts per layer.

    >>> import tilemem as TM
    >>> spec = TM.model_spec(name="d", layers=2, experts_per_layer=4, hidden_size=16,
    ...                      intermediate_size=32, expert_budget=2)
    >>> compiled = TM.plan(spec, policy="kt_expert")
    >>> compiled.plan.resident_ranges(0, 0)
    {'cuda': [(0, 32)]}
    """
    topology = spec.topology()
    if isinstance(profile, str | Path):
        profile = Profile.load(profile, topology)
    used = spec_profile(spec, topology, profile)
    compiled = compile_spec(spec, used, policy)
    mir, manifest = build_artifacts(compiled)
    man = Manifest(manifest)
    return TileMEMPlan(spec, compiled, used, Mir(mir), man, tuple(build_tile_handles(man)))


def plan_from_hf_config(
    path: str | Path | dict,
    expert_budget: int | None = None,
    profile: Profile | str | Path | None = None,
    policy: str | None = None,
    **blocks: dict,
) -> TileMEMPlan:
    """`plan(model_spec_from_hf_config(path, expert_budget=..., **blocks), profile, policy)`.

    >>> import tilemem as TM
    >>> cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 512,
    ...        "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    ...        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    ...        "num_experts": 8, "num_experts_per_tok": 2}
    >>> TM.plan_from_hf_config(cfg, expert_budget=4).plan.usage("cuda").tiles
    98304
    """
    return plan(model_spec_from_hf_config(path, expert_budget=expert_budget, **blocks), profile, policy)


def build_mir(spec: ModelSpec, profile: Profile | None = None) -> Mir:
    """The MIR of `spec`'s plan.

    >>> import tilemem as TM
    >>> TM.build_mir(TM.model_spec(name="m", layers=1, experts_per_layer=2, hidden_size=8,
    ...                            intermediate_size=16, expert_budget=1)).name
    'm'
    """
    return plan(spec, profile).mir


def load_plan(out_dir: str | Path) -> Plan:
    """A plan directory written by `tilemem plan` / `tilemem compile` / `TileMEMPlan.save` (checksums checked).

    >>> import tempfile, tilemem as TM
    >>> compiled = TM.plan(TM.model_spec(name="m", layers=1, experts_per_layer=2, hidden_size=8,
    ...                                  intermediate_size=16, expert_budget=1))
    >>> d = tempfile.mkdtemp()
    >>> _ = compiled.save(d)
    >>> TM.load_plan(d).tiles == compiled.plan.tiles
    True
    """
    return _load_plan(out_dir)


def load_profile(path: str | Path, spec: ModelSpec | None = None) -> Profile:
    """A profile file; with `spec`, checked against its shape.

    >>> import tempfile, os, tilemem as TM
    >>> spec = TM.model_spec(name="m", layers=1, experts_per_layer=2, hidden_size=8, intermediate_size=16)
    >>> path = os.path.join(tempfile.mkdtemp(), "p.json")
    >>> _ = TM.Profile.uniform(spec.topology(), tokens=10).save(path)
    >>> TM.load_profile(path, spec).total_tokens
    10
    """
    return Profile.load(path, spec.topology() if spec is not None else None)


def _sample_topk(rng: random.Random, probs: list[float], k: int) -> list[int]:
    """k distinct experts drawn with probability proportional to `probs` (uniform if all zero)."""
    pool = list(range(len(probs)))
    weights = [max(p, 0.0) for p in probs]
    out = []
    for _ in range(min(k, len(pool))):
        total = sum(weights)
        i = rng.choices(range(len(pool)), weights=weights if total > 0 else None)[0]
        out.append(pool.pop(i))
        weights.pop(i)
    return out


def _sum_by(handles: list[TileHandle], key) -> dict[str, int]:
    out: dict[str, int] = {}
    for h in handles:
        out[key(h)] = out.get(key(h), 0) + h.weight_bytes + h.scale_bytes
    return dict(sorted(out.items()))


# ----- TMAP: hardware profiles and the cost model (tilemem.tmap) -----

from tilemem.tmap import (  # noqa: E402
    Prediction,
    RuntimeSettings,
    ServingWorkload,
    reference_profiles,
)
from tilemem.tmap.recommend import Recommendation  # noqa: E402

__all__ += [
    "HardwareProfile",
    "PolicyDecision",
    "PolicyPrediction",
    "Prediction",
    "Recommendation",
    "RuntimeSettings",
    "ServingWorkload",
    "hardware_profile",
    "load_hardware_profile",
    "predict",
    "predict_policy",
    "recommend",
    "reference_profiles",
]


def load_hardware_profile(path: str | Path) -> HardwareProfile:
    """A profile written by `tilemem doctor --probe`, or a reference profile by name.

    >>> import tilemem as TM
    >>> TM.load_hardware_profile("cpu_laptop_nvme").measured
    False
    """
    return HardwareProfile.load(path)


def predict(
    plan: Plan | TileMEMPlan,
    hardware: HardwareProfile,
    workload: ServingWorkload | Profile | None = None,
    settings: RuntimeSettings | None = None,
) -> Prediction:
    """Predicted prefill/decode tok/s and p50/p95 of `plan` on `hardware` (a compiled plan brings its profile).

    >>> import tilemem as TM
    >>> compiled = TM.plan(TM.model_spec(name="m", layers=2, experts_per_layer=4, hidden_size=64,
    ...     intermediate_size=64, expert_budget=2))
    >>> hw = TM.load_hardware_profile("rtx5090_ddr")
    >>> TM.predict(compiled, hw).decode_tok_s > 0
    True
    """
    from tilemem.tmap import predict as _predict

    if isinstance(plan, TileMEMPlan):
        workload = workload if workload is not None else plan.profile
        plan = plan.plan
    return _predict(plan, hardware, workload, settings)


def recommend(
    spec: ModelSpec | Topology,
    hardware: HardwareProfile,
    budget: str,
    profile: Profile | None = None,
    **options: Any,
) -> Recommendation:
    """Every policy and tile size predicted under `budget`, and the recommended one (see tilemem.tmap.recommend).

    >>> import tilemem as TM
    >>> spec = TM.model_spec(name="m", layers=2, experts_per_layer=4, hidden_size=64, intermediate_size=64)
    >>> hw = TM.load_hardware_profile("rtx5090_ddr")  # a reference profile: not measured
    >>> rec = TM.recommend(spec, hw, "cuda=1MiB,cpu=inf", allow_extrapolation=True)
    >>> rec.recommended.policy in {"kt_expert", "tilepo_coarse", "tilepo_fine", "tilepo_hybrid", "tilepo_adaptive"}
    True
    """
    from tilemem.tmap.recommend import recommend as _recommend

    topology = spec.topology() if isinstance(spec, ModelSpec) else spec
    return _recommend(topology, profile or Profile.uniform(topology), hardware, budget, **options)


@dataclass(frozen=True)
class PolicyDecision:
    """The seed TMAP's decision record for one (workload, budget) target."""

    workload: str
    """Workload label."""
    budget: str
    """Budget (an experts-per-layer count becomes its cuda/cpu budget)."""
    recommended_policy: str
    """Recommended policy."""
    admitted_system: str
    """`TilePO` or `KT` (kt_expert kept: predicted gain below the threshold)."""
    predicted_tok_gain_pct: float
    """Predicted decode gain of the best TilePO plan over kt_expert, percent."""
    confidence: float
    """Probability the pick is right under the model's error band."""
    extrapolated: bool
    """Quick-planning estimate (outside what was measured)."""
    probe_hint: str
    """Short run that would confirm it."""


@dataclass(frozen=True)
class PolicyPrediction:
    """Decisions for several targets."""

    decisions: tuple[PolicyDecision, ...]
    """One per target."""

    def decision_for(self, workload: str, budget: int | str) -> PolicyDecision:
        """The decision of target (workload, budget)."""
        for d in self.decisions:
            if d.workload == workload and d.budget == _budget_label(budget):
                return d
        targets = [(d.workload, d.budget) for d in self.decisions]
        raise KeyError(f"no decision for ({workload!r}, {budget!r}); targets: {targets}")


def _budget_label(budget: int | str) -> str:
    return f"experts_per_layer={budget}" if isinstance(budget, int) else str(budget)


def predict_policy(
    hardware: HardwareProfile,
    target_pairs: list[tuple[str, int | str]],
    spec: ModelSpec | Topology | None = None,
    profiles: dict[str, Profile] | None = None,
    allow_extrapolation: bool = False,
    min_gain: float = 0.05,
) -> PolicyPrediction:
    """Seed-style TMAP: for each (workload, budget) pick kt_expert or TilePO on `hardware`.

    A budget is a tier budget string or, as in the seed, an experts-per-layer count (that many experts
    per layer in VRAM, the rest in DRAM). Without `spec` the seed's OLMoE-1B-7B shape is used; without
    a profile for a workload, uniform routing.

    >>> import tilemem as TM
    >>> spec = TM.model_spec(name="m", layers=2, experts_per_layer=8, hidden_size=64, intermediate_size=64)
    >>> hw = TM.load_hardware_profile("rtx5090_ddr")
    >>> p = TM.predict_policy(hw, [("mixed", 2)], spec=spec, allow_extrapolation=True)
    >>> d = p.decision_for("mixed", 2)
    >>> d.admitted_system in ("KT", "TilePO"), d.extrapolated
    (True, True)
    """
    from tilemem.placement.budgets import Budgets
    from tilemem.placement.formats import tile_format
    from tilemem.tmap.recommend import recommend as _recommend

    if spec is None:
        from tilemem.sdk.model_spec import preset_config

        topology = Topology.from_config(preset_config("olmoe-1b-7b"))
    else:
        topology = spec.topology() if isinstance(spec, ModelSpec) else spec
    decisions = []
    for workload, budget in target_pairs:
        text = budget
        if isinstance(budget, int):
            b = Budgets.from_experts_per_layer(topology, budget, tile_format(topology.dtype))
            text = f"cuda={b.tiers[0].capacity}B,cpu=inf"
        profile = (profiles or {}).get(workload) or Profile.uniform(topology)
        rec = _recommend(topology, profile, hardware, text, min_gain=min_gain,
                         allow_extrapolation=allow_extrapolation, tiles=(128,))  # fmt: skip
        pick = rec.recommended.policy
        decisions.append(
            PolicyDecision(
                workload,
                _budget_label(budget),
                pick,
                "KT" if pick == "kt_expert" else "TilePO",
                round(100 * rec.gain_over_baseline, 3),
                round(rec.confidence, 4),
                rec.extrapolated,
                rec.probe_hint,
            )
        )
    return PolicyPrediction(tuple(decisions))
