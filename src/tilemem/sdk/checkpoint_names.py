"""Checkpoint tensor names of tiles: which hub tensors hold each expert's projection groups.

Names come from each family's rename table (`tilemem.models.registry`), so a family added there is
covered here. `generic` uses TileMEM's own names (the OLMoE/Qwen layout).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tilemem.errors import CheckpointError
from tilemem.models.topology import our_ffn_prefix
from tilemem.placement.tiles import expert_key

PROJECTIONS = {"gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}


def _to_hub(family: str, name: str) -> str:
    if family == "generic":
        return name
    from tilemem.models.registry import family_by_name

    return family_by_name(family).to_hub(name)


def expert_tensor_names(family: str, layer: int, expert: int) -> dict[str, list[str]]:
    """Hub tensor names per projection group of one FFN.

    >>> expert_tensor_names("mixtral", 0, 3)["gate_up"]
    ['model.layers.0.block_sparse_moe.experts.3.w1.weight', 'model.layers.0.block_sparse_moe.experts.3.w3.weight']
    """
    prefix = our_ffn_prefix(layer, expert)
    return {g: [_to_hub(family, f"{prefix}.{p}.weight") for p in projs] for g, projs in PROJECTIONS.items()}


def checkpoint_weight_names(path: str | Path) -> list[str]:
    """Sorted tensor names of a checkpoint directory (index file or safetensors headers; no weights read).

    >>> import tilemem as TM  # doctest: +SKIP
    >>> TM.checkpoint_weight_names("checkpoints/demo-small")[:1]  # doctest: +SKIP
    ['lm_head.weight']
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"'{p}' is not a checkpoint directory.")
    index = p / "model.safetensors.index.json"
    if index.exists():
        try:
            return sorted(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is malformed ({exc}); it needs a 'weight_map'.") from None
    from tilemem.loader.safetensors_file import SafetensorsFile

    shards = sorted(p.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"'{p}' has no *.safetensors files.")
    return sorted(n for f in shards for n in SafetensorsFile(f).names())


@dataclass(frozen=True)
class WeightMatch:
    """How checkpoint tensors map onto tile projection groups."""

    matched: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    """`L0:E3` -> group -> hub tensor names present in the checkpoint."""
    missing: list[str] = field(default_factory=list)
    """Expected expert tensors the checkpoint lacks."""
    other: list[str] = field(default_factory=list)
    """Checkpoint tensors that are not expert weights of the requested layers/experts."""

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"matched": self.matched, "missing": self.missing, "other": self.other}


def match_checkpoint_weights(
    names: Iterable[str],
    spec: Any = None,
    family: str | None = None,
    layers: Iterable[int] | None = None,
    experts: Iterable[int] | None = None,
) -> WeightMatch:
    """Match checkpoint tensor `names` to the projection groups of routed experts.

    `family` defaults to the spec's; `layers`/`experts` default to all MoE layers / experts of the spec.

    >>> m = match_checkpoint_weights(["model.layers.0.mlp.experts.0.gate_proj.weight"], family="olmoe",
    ...                              layers=[0], experts=[0])
    >>> m.matched["L0:E0"]["gate_up"], m.missing
    (['model.layers.0.mlp.experts.0.gate_proj.weight'], ['model.layers.0.mlp.experts.0.up_proj.weight', \
'model.layers.0.mlp.experts.0.down_proj.weight'])
    """
    family = family or (spec.family if spec is not None else "generic")
    if layers is None:
        if spec is None:
            raise CheckpointError("match_checkpoint_weights needs `layers` (or a spec to take them from).")
        layers = [i for i in range(spec.layers) if i not in spec.dense_layers]
    if experts is None:
        if spec is None:
            raise CheckpointError("match_checkpoint_weights needs `experts` (or a spec to take them from).")
        experts = range(spec.experts_per_layer)
    present = set(names)
    matched: dict[str, dict[str, list[str]]] = {}
    missing: list[str] = []
    used: set[str] = set()
    for layer in layers:
        for e in experts:
            groups = {}
            for g, wanted in expert_tensor_names(family, layer, e).items():
                groups[g] = [n for n in wanted if n in present]
                missing.extend(n for n in wanted if n not in present)
                used.update(groups[g])
            matched[expert_key(layer, e)] = groups
    return WeightMatch(matched, missing, sorted(present - used))


def build_runtime_weight_aliases(
    family: str, layers: Iterable[int], experts: Iterable[int]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per `L{layer}:E{expert}`: its tensor names under each naming convention.

    `hub`: checkpoint names; `tilemem`: TileMEM module names; `fused_moe`: the stacked per-layer
    `w13_weight` / `w2_weight` parameters of fused-MoE kernels (vLLM/SGLang style), indexed by expert.

    >>> a = build_runtime_weight_aliases("olmoe", [0], [1])
    >>> a["L0:E1"]["fused_moe"]["gate_up"]
    'model.layers.0.mlp.experts.w13_weight[1]'
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for layer in layers:
        for e in experts:
            ours = our_ffn_prefix(layer, e)
            hub_experts = _to_hub(family, f"model.layers.{layer}.mlp.experts")
            out[expert_key(layer, e)] = {
                "hub": expert_tensor_names(family, layer, e),
                "tilemem": {g: [f"{ours}.{p}.weight" for p in projs] for g, projs in PROJECTIONS.items()},
                "fused_moe": {"gate_up": f"{hub_experts}.w13_weight[{e}]", "down": f"{hub_experts}.w2_weight[{e}]"},
            }
    return out
