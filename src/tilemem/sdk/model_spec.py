"""ModelSpec: a MoE model plus planning settings, without a checkpoint.

The same blocks appear in a `.tmem` file, a JSON model spec and the SDK's keyword arguments:
`model` (shape, or `hf_config` / `checkpoint` / `preset` to take it from a Hugging Face config),
`workload`, `tile`, `memory`, `precision`, `schedule`, `runtime`. `SCHEMA` lists every key with
its type; values may be given as strings (`8GiB`, `on`, `gate_up, down`) and are converted here,
once, for all three front ends.

A bare spec (shape fields only) estimates the non-expert weights as, per layer, attention 4*D*D,
router E*D and two norms, plus embeddings and LM head 2*V*D when `vocab_size` is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tilemem.config import ModelConfig
from tilemem.errors import ConfigError
from tilemem.models.topology import DTYPE_BYTES, LayerTopology, Topology
from tilemem.units import parse_bytes

GIB = 2**30


@dataclass(frozen=True)
class Field:
    """One key of a spec block."""

    kind: str
    """`str`, `int`, `bytes`, `bool`, `float`, `list` or `ints`."""
    doc: str
    """What it means."""


SCHEMA: dict[str, dict[str, Field]] = {
    "model": {
        "name": Field("str", "plan name"),
        "family": Field("str", "model family (generic for a bare shape)"),
        "layers": Field("int", "decoder layers"),
        "experts_per_layer": Field("int", "routed experts per MoE layer"),
        "hidden_size": Field("int", "hidden width D"),
        "intermediate_size": Field("int", "routed expert width I"),
        "top_k": Field("int", "experts per token"),
        "expert_budget": Field("int", "experts per layer in the fast tier (KT-style budget)"),
        "shared_intermediate_size": Field("int", "total width of the shared experts (0: none)"),
        "dense_layers": Field("ints", "layers with a dense FFN instead of experts"),
        "dense_intermediate_size": Field("int", "width of the dense FFN"),
        "vocab_size": Field("int", "vocabulary (counts embeddings and LM head)"),
        "hf_config": Field("str", "config.json (or its directory) to take the shape from"),
        "checkpoint": Field("str", "checkpoint directory to take the shape from"),
        "preset": Field("str", "real-shape preset to take the shape from (e.g. olmoe-1b-7b)"),
    },
    "workload": {
        "name": Field("str", "workload the plan is for (recorded)"),
        "profile": Field("str", "profile JSON guiding the plan (default: uniform routing)"),
    },
    "tile": {
        "intermediate_tile": Field("int", "fine tile size in neurons"),
        "hidden_tile": Field("int", "kernel K-tile hint recorded for backends (0: whole D)"),
        "shard_count": Field("int", "tensor-parallel shards of the intermediate dimension"),
        "projection_groups": Field("list", "must be gate_up, down"),
    },
    "memory": {
        "cuda": Field("bytes", "cuda budget"),
        "cpu": Field("bytes", "cpu budget"),
        "disk": Field("bytes", "disk budget (default unbounded)"),
        "experts_per_layer": Field("int", "experts per layer in cuda (same as model.expert_budget)"),
        "cache": Field("str", "dynamic tile cache reserve, e.g. cuda=10%"),
        "gpu_cache_budget_gib": Field("float", "cuda budget in GiB (alias of cuda)"),
        "cpu_cache_budget_gib": Field("float", "cpu budget in GiB (alias of cpu)"),
    },
    "precision": {
        "dtype": Field("str", "checkpoint dtype: bf16, fp16, fp32 (default: the model's)"),
        "format": Field("str", "tile format (default: the dtype; fp8_e4m3 for external kernels)"),
    },
    "schedule": {
        "policy": Field("str", "placement policy"),
        "adaptive_mode": Field("str", "throughput, balanced or tail_latency"),
        "phase": Field("str", "routing counts to use: all, prefill or decode"),
        "async_planning": Field("bool", "re-plan from a rolling histogram at runtime"),
    },
    "runtime": {
        "backend": Field("str", "preferred backend for non-plain formats"),
        "prefetch": Field("bool", "prefetch the next layer's predicted tiles"),
    },
}
BLOCKS = tuple(SCHEMA)
TRUE, FALSE = ("on", "true", "yes", "1"), ("off", "false", "no", "0")


def coerce(block: str, key: str, value: Any) -> Any:
    """`value` converted to the type SCHEMA gives `block.key`; ValueError says why not."""
    if block not in SCHEMA:
        raise KeyError(f"unknown block '{block}'; blocks: {', '.join(BLOCKS)}")
    if key not in SCHEMA[block]:
        raise KeyError(f"unknown key '{key}' in block '{block}'; keys: {', '.join(SCHEMA[block])}")
    kind = SCHEMA[block][key].kind
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"{block}.{key} must be a string, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"{block}.{key} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{block}.{key} must be an integer, got {value!r}") from None
    if kind == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{block}.{key} must be a number, got {value!r}") from None
    if kind == "bytes":
        try:
            return parse_bytes(value, f"{block}.{key}")
        except ConfigError as exc:
            raise ValueError(str(exc).rstrip(".")) from None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if str(value).lower() in TRUE + FALSE:
            return str(value).lower() in TRUE
        raise ValueError(f"{block}.{key} must be on/off (true/false), got {value!r}")
    items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError(f"{block}.{key} must be a comma-separated list, got {value!r}")
    if kind == "ints":
        try:
            return tuple(int(v) for v in items)
        except (TypeError, ValueError):
            raise ValueError(f"{block}.{key} must be a list of integers, got {value!r}") from None
    return tuple(str(v) for v in items)


@dataclass(frozen=True)
class ModelSpec:
    """A MoE model shape and the settings to plan it with (see SCHEMA for each key): the SDK's hand-written
    description of a model, from which `topology()` derives the `Topology` planning uses."""

    name: str
    """Plan name."""
    layers: int
    """Decoder layers."""
    experts_per_layer: int
    """Routed experts per MoE layer."""
    hidden_size: int
    """Hidden width D."""
    intermediate_size: int
    """Routed expert width I."""
    top_k: int = 2
    """Experts per token."""
    expert_budget: int | None = None
    """Experts per layer in the fast tier (KTransformers-style budget)."""
    family: str = "generic"
    """Model family."""
    shared_intermediate_size: int = 0
    """Total width of the shared experts."""
    dense_layers: tuple[int, ...] = ()
    """Layers with a dense FFN."""
    dense_intermediate_size: int = 0
    """Width of the dense FFN."""
    vocab_size: int = 0
    """Vocabulary size (0: embeddings not counted)."""
    blocks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Settings of the workload, tile, memory, precision, schedule and runtime blocks."""
    source: dict[str, Any] = field(default_factory=dict)
    """Where the shape came from: {} for a bare spec, or {hf_config|checkpoint|preset: ...}."""
    config: ModelConfig | None = field(default=None, compare=False)
    """The full model config when the shape came from a Hugging Face config."""

    def setting(self, block: str, key: str, default: Any = None) -> Any:
        """A block setting, or `default`."""
        return self.blocks.get(block, {}).get(key, default)

    def topology(self) -> Topology:
        """The model's topology (exact from a config; estimated non-expert weights for a bare spec)."""
        dtype = self.setting("precision", "dtype") or (self.config.torch_dtype if self.config else "bfloat16")
        if dtype not in DTYPE_BYTES:
            raise ConfigError(f"precision.dtype '{dtype}' is not one of bf16, fp16, fp32.")
        if self.config is not None:
            return Topology.from_config(self.config, dtype)
        return _bare_topology(self, dtype)

    def to_dict(self) -> dict[str, Any]:
        """Nested JSON form (`model` block first); `model_spec_from_dict` reads it back."""
        model: dict[str, Any] = {"name": self.name}
        if self.source:
            model.update(self.source)
        else:
            for f in fields(self):
                value = getattr(self, f.name)
                if f.name in SCHEMA["model"] and f.name != "name" and value != f.default:
                    model[f.name] = list(value) if isinstance(value, tuple) else value
        if self.expert_budget is not None:
            model["expert_budget"] = self.expert_budget
        model = {k: v for k, v in model.items() if v is not None}
        out: dict[str, Any] = {"model": model}
        for block in BLOCKS[1:]:
            if self.blocks.get(block):
                out[block] = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(self.blocks[block].items())}
        return out


def spec_from_dict(payload: Any, where: str = "model spec") -> ModelSpec:
    """A ModelSpec from the nested form (`{"model": {...}, "tile": {...}}`) or the flat SDK form."""
    if not isinstance(payload, dict):
        raise ConfigError(f"{where} must be a JSON object with a 'model' block.")
    data = dict(payload)
    model = dict(data.pop("model", {}) or {})
    if not isinstance(model, dict):
        raise ConfigError(f"{where}: 'model' must be an object.")
    if isinstance(data.get("workload"), str):
        data["workload"] = {"name": data["workload"]}
    for key in list(data):
        if key not in BLOCKS:
            model[key] = data.pop(key)
    try:
        model = {k: coerce("model", k, v) for k, v in model.items() if v is not None}
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc.args[0]}.") from None
    return build_spec(model, parse_blocks(data, where), where)


def parse_blocks(raw: dict[str, Any], where: str = "model spec") -> dict[str, dict[str, Any]]:
    """Typed settings of the non-model blocks in `raw` (unknown blocks or keys are errors)."""
    blocks: dict[str, dict[str, Any]] = {}
    try:
        for block, values in raw.items():
            if block == "model" or block not in BLOCKS:
                raise KeyError(f"unknown block '{block}'; blocks: {', '.join(BLOCKS[1:])}")
            if isinstance(values, str) and block == "workload":
                values = {"name": values}
            if not isinstance(values, dict):
                raise ValueError(f"block '{block}' must be an object")
            blocks[block] = {k: coerce(block, k, v) for k, v in values.items() if v is not None}
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc.args[0]}.") from None
    return blocks


def build_spec(
    model: dict[str, Any],
    blocks: dict[str, dict[str, Any]],
    where: str,
    config: tuple[ModelConfig, dict[str, Any]] | None = None,
) -> ModelSpec:
    """Validate typed values and assemble the ModelSpec; `config` = (ModelConfig, source) gives the shape."""
    blocks = {b: dict(v) for b, v in blocks.items() if v}
    mem = blocks.get("memory", {})
    for alias, tier_name in (("gpu_cache_budget_gib", "cuda"), ("cpu_cache_budget_gib", "cpu")):
        if alias in mem:
            mem.setdefault(tier_name, int(mem.pop(alias) * GIB))
    if "experts_per_layer" in mem:
        model.setdefault("expert_budget", mem.pop("experts_per_layer"))
    if mem:
        blocks["memory"] = mem
    groups = blocks.get("tile", {}).get("projection_groups")
    if groups is not None and sorted(groups) != ["down", "gate_up"]:
        raise ConfigError(f"{where}: tile.projection_groups must be 'gate_up, down', got {', '.join(groups)}.")
    sources = [k for k in ("hf_config", "checkpoint", "preset") if k in model]
    if len(sources) > 1:
        raise ConfigError(f"{where}: give one of model.hf_config, model.checkpoint, model.preset, not several.")
    if sources and config is None:
        cfg, label = _config_from_source(sources[0], model[sources[0]], where)
        model.setdefault("name", label)
        config = (cfg, {sources[0]: model[sources[0]]})
    if config is not None:
        shape_keys = set(model) - {"name", "expert_budget", *sources}
        if shape_keys:
            raise ConfigError(
                f"{where}: the Hugging Face config defines the shape, so do not also set "
                f"{', '.join('model.' + k for k in sorted(shape_keys))}."
            )
        spec = spec_from_config(config[0], model.get("name") or "model", source=config[1])
        spec = replace(spec, expert_budget=model.get("expert_budget"), blocks=blocks)
    else:
        missing = [k for k in ("layers", "experts_per_layer", "hidden_size", "intermediate_size") if k not in model]
        if missing:
            raise ConfigError(
                f"{where}: model needs {', '.join(missing)} (or hf_config / checkpoint / preset to read them from)."
            )
        model.setdefault("name", "model")
        model.setdefault("top_k", min(2, model["experts_per_layer"]))
        spec = ModelSpec(**model, blocks=blocks)
    _validate(spec, where)
    return spec


def spec_from_config(cfg: ModelConfig, name: str, source: dict[str, Any] | None = None) -> ModelSpec:
    """A ModelSpec carrying a full ModelConfig (exact non-expert weights)."""
    return ModelSpec(
        name=name,
        layers=cfg.num_layers,
        experts_per_layer=cfg.num_experts,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.moe_intermediate_size,
        top_k=cfg.top_k,
        family=cfg.family,
        shared_intermediate_size=cfg.num_shared_experts * cfg.shared_intermediate_size,
        dense_layers=tuple(cfg.dense_layers),
        dense_intermediate_size=cfg.intermediate_size if cfg.dense_layers else 0,
        vocab_size=cfg.vocab_size,
        source=dict(source or {}),
        config=cfg,
    )


def read_hf_config(path: str | Path | dict[str, Any]) -> tuple[ModelConfig, str]:
    """(ModelConfig, name) from a checkpoint directory, a config.json path, or a config dict."""
    from tilemem.models.registry import config_from_hf

    if isinstance(path, dict):
        return config_from_hf(path, "hf_config"), str(path.get("model_type", "model"))
    p = Path(path)
    cfg_path = p / "config.json" if p.is_dir() else p
    if not cfg_path.is_file():
        raise ConfigError(f"'{path}' is neither a checkpoint directory with config.json nor a config.json file.")
    try:
        data = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{cfg_path} is not valid JSON: {exc}.") from None
    name = cfg_path.parent.name if cfg_path.name == "config.json" else cfg_path.stem
    return config_from_hf(data, str(cfg_path)), name


def preset_config(name: str) -> ModelConfig:
    """The ModelConfig of a synthetic preset (real shapes, no weights needed)."""
    import torch

    from tilemem.config import HFConfig
    from tilemem.models.registry import family_by_name
    from tilemem.synth.presets import REAL_SHAPES, resolve_preset
    from tilemem.synth.writer import hf_config

    if name not in REAL_SHAPES:
        raise ConfigError(f"unknown preset '{name}'; presets with real shapes: {', '.join(REAL_SHAPES)}.")
    fam, fields_ = resolve_preset(None, name)
    return family_by_name(fam).config_from_hf(HFConfig(hf_config(fam, fields_, torch.bfloat16, 0), name))


def _config_from_source(kind: str, value: str, where: str) -> tuple[ModelConfig, str]:
    if kind == "preset":
        return preset_config(value), value
    return read_hf_config(value)


def _validate(spec: ModelSpec, where: str) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{where}: {msg}.")

    for key in ("layers", "experts_per_layer", "hidden_size", "intermediate_size"):
        need(getattr(spec, key) >= 1, f"model.{key} must be >= 1, got {getattr(spec, key)}")
    need(
        1 <= spec.top_k <= spec.experts_per_layer,
        f"model.top_k must be in 1..{spec.experts_per_layer}, got {spec.top_k}",
    )
    need(all(0 <= i < spec.layers for i in spec.dense_layers), f"model.dense_layers must be in 0..{spec.layers - 1}")
    need(not spec.dense_layers or spec.dense_intermediate_size > 0, "dense layers need model.dense_intermediate_size")
    if spec.expert_budget is not None:
        need(
            0 <= spec.expert_budget <= spec.experts_per_layer,
            f"expert_budget must be in 0..{spec.experts_per_layer}, got {spec.expert_budget}",
        )
    for key in ("intermediate_tile", "shard_count"):
        value = spec.setting("tile", key, 1)
        need(value >= 1, f"tile.{key} must be >= 1, got {value}")


def _bare_topology(spec: ModelSpec, dtype: str) -> Topology:
    b, d, e = DTYPE_BYTES[dtype], spec.hidden_size, spec.experts_per_layer
    layers, non_expert = [], []
    if spec.vocab_size:
        non_expert.append(("model.embed_tokens.weight", spec.vocab_size * d * b))
    for i in range(spec.layers):
        dense = i in spec.dense_layers
        layers.append(
            LayerTopology(
                index=i,
                is_moe=not dense,
                num_experts=0 if dense else e,
                top_k=0 if dense else spec.top_k,
                expert_intermediate=0 if dense else spec.intermediate_size,
                shared_intermediate=0 if dense else spec.shared_intermediate_size,
                dense_intermediate=spec.dense_intermediate_size if dense else 0,
            )
        )
        non_expert.append((f"model.layers.{i}.input_layernorm.weight", d * b))
        non_expert.append((f"model.layers.{i}.self_attn", 4 * d * d * b))
        non_expert.append((f"model.layers.{i}.post_attention_layernorm.weight", d * b))
        if not dense:
            non_expert.append((f"model.layers.{i}.mlp.gate.weight", e * d * b))
    non_expert.append(("model.norm.weight", d * b))
    if spec.vocab_size:
        non_expert.append(("lm_head.weight", spec.vocab_size * d * b))
    return Topology(spec.family, d, dtype, b, tuple(layers), tuple(non_expert))
