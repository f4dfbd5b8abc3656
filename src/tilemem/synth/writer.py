"""Write a real Hugging Face-format checkpoint with random weights, shard by shard.

Routing skew: every embedding shares a component along one direction u, which survives into the
post-attention RMSNorm output; each router row gets `skew * z_e * u` added, with z_e a per-layer
permutation of standard-normal strengths scaled per layer. Larger skew concentrates routing mass
on fewer experts, differently in every layer, and the weights stay an ordinary valid checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from tilemem.config import HFConfig
from tilemem.errors import ConfigError
from tilemem.layers.fp8 import E8M0, quantize
from tilemem.loader.checkpoint import parse_dtype
from tilemem.models.model import MoECausalLM, quantized_weight_names
from tilemem.models.mtp import ours_to_hub
from tilemem.models.registry import family_by_name
from tilemem.synth.output import MARKER, check_out, install, resolve_out, staging_dir
from tilemem.synth.presets import resolve_preset
from tilemem.synth.tokenizer import EOS, write_tokenizer

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
INIT_STD = 0.02


FP8_SKIP = ("lm_head", "mlp.gate", "shared_expert_gate", "weights_proj", "eh_proj", "shared_head.head")
"""Linear modules an FP8 checkpoint keeps in bf16 (`modules_to_not_convert`): the LM heads, routers and the
small gates, as the published FP8 checkpoints do; every other Linear (attention, MLA, the DSA indexer's
wq_b/wk, dense, shared and routed experts) is FP8."""
FP8_TINY = {"hidden_size": 192, "intermediate_size": 288, "moe_intermediate_size": 160}
"""`tiny` in FP8: widths past one 128-block and not multiples of it, so tests see partial blocks cropped."""


def quantization_config(scale_fmt: str) -> dict[str, Any]:
    """config.json's `quantization_config` of a synthetic FP8 checkpoint (DeepSeek-V3's, plus the skips)."""
    qc = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    if scale_fmt == "ue8m0":
        qc["scale_fmt"] = "ue8m0"
    return {**qc, "modules_to_not_convert": list(FP8_SKIP)}


def hf_config(family: str, fields: dict[str, Any], dtype: torch.dtype, eos_id: int) -> dict[str, Any]:
    """The config.json dict for `fields` of `family`."""
    fam = family_by_name(family)
    return {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        **fields,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "torch_dtype": DTYPE_NAMES[dtype],
        "initializer_range": INIT_STD,
        "use_cache": True,
        "attention_dropout": 0.0,
    }


EMBED_STD = 1.0
"""Embeddings dominate the residual stream, so tokens stay distinct and routing depends on the token
(with 0.02 embeddings, near-uniform random attention makes every hidden state alike)."""


def _init(name: str, shape: tuple[int, ...], gen: torch.Generator, layers: int = 1) -> torch.Tensor:
    if name.endswith("norm.weight") or "layernorm" in name:
        return torch.ones(shape)
    if name.endswith(".bias") or name.endswith("e_score_correction_bias"):
        return torch.randn(shape, generator=gen) * 0.01
    if name == "model.embed_tokens.weight":
        return torch.randn(shape, generator=gen) * EMBED_STD
    if name.endswith(("o_proj.weight", "down_proj.weight")):  # residual writers, GPT-2 style scaling
        return torch.randn(shape, generator=gen) * (INIT_STD / math.sqrt(2 * layers))
    return torch.randn(shape, generator=gen) * INIT_STD


class SkewInjector:
    """Adds the shared embedding direction and per-layer router biases described above."""

    def __init__(self, hidden: int, skew: float, seed: int) -> None:
        self.skew = skew
        self.gen = torch.Generator().manual_seed(seed + 7919)
        u = torch.randn(hidden, generator=self.gen)
        self.u = u / u.norm()
        self.hidden = hidden

    SHARED = 0.25
    """Norm of the shared embedding component relative to the token-specific part."""

    def embedding(self, w: torch.Tensor) -> torch.Tensor:
        if self.skew <= 0:
            return w
        return w + self.u * self.SHARED * EMBED_STD * math.sqrt(self.hidden)

    def router(self, w: torch.Tensor) -> torch.Tensor:
        if self.skew <= 0:
            return w
        experts = w.shape[0]
        layer_scale = 0.5 + torch.rand(1, generator=self.gen).item()
        strengths = torch.randn(experts, generator=self.gen)[torch.randperm(experts, generator=self.gen)]
        f = self.SHARED
        sigma = INIT_STD * math.sqrt(self.hidden) / math.sqrt(1 + f * f)  # token-dependent logit spread
        along_u = math.sqrt(self.hidden) * f / math.sqrt(1 + f * f)  # x_norm . u
        bias = 0.5 * self.skew * layer_scale * strengths * sigma  # logit offsets, std skew * sigma / 2
        w = w - torch.outer(w @ self.u, self.u)  # rows see the shared direction only through `bias`
        return w + torch.outer(bias / along_u, self.u)


def synthesize(
    family: str | None,
    preset: str,
    out: str | Path,
    seed: int = 0,
    routing_skew: float = 0.0,
    dtype: str = "bf16",
    shard_bytes: int = 1 << 30,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    mtp: bool = False,
    overwrite: bool = False,
    scale_fmt: str = "float32",
) -> Path:
    """Write a synthetic checkpoint to `out` (atomically: a temp folder renamed at the end).

    An existing `out` must be empty or hold only an earlier synth checkpoint's files (which are
    replaced); anything else is refused with OutputExistsError unless `overwrite`, and even then
    only the files synth writes are replaced, the others kept.

    With `mtp`, also `num_nextn_predict_layers` (the preset's, at least 1) multi-token-prediction
    layers under their hub names `model.layers.{num_hidden_layers + i}.*` (DeepSeek-V3 layout, with
    their own `embed_tokens` and `shared_head.head`); without it, none (whatever the preset declares).

    `dtype="fp8"` writes the published FP8 layout: every Linear but `FP8_SKIP` as float8_e4m3fn with its
    `weight_scale_inv` (128x128 blocks; `scale_fmt` float32 or ue8m0), the rest bf16; `tiny` then takes the
    widths of `FP8_TINY`."""
    fam_name, fields = resolve_preset(family, preset)
    fp8 = dtype.lower() in ("fp8", "fp8_e4m3", "float8_e4m3fn")
    if fp8 and preset == "tiny":
        fields.update({k: v for k, v in FP8_TINY.items() if k in fields or k == "hidden_size"})
    fields.update(overrides or {})
    if mtp:
        fields["num_nextn_predict_layers"] = max(1, int(fields.get("num_nextn_predict_layers") or 0))
    if scale_fmt not in ("float32", "ue8m0"):
        raise ConfigError(f"scale_fmt '{scale_fmt}' is not one of float32, ue8m0")
    torch_dtype = torch.bfloat16 if fp8 else parse_dtype(dtype)
    quant = quantization_config(scale_fmt) if fp8 else None
    out = resolve_out(out)
    check_out(out, overwrite)
    tmp = staging_dir(out)
    try:
        _write(tmp, fam_name, preset, fields, torch_dtype, seed, routing_skew, shard_bytes, progress, mtp, quant)
    except BaseException:  # failed or interrupted: leave neither a half-written OUT nor its staging folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    install(tmp, out)
    return out


def _write(
    tmp: Path,
    fam_name: str,
    preset: str,
    fields: dict[str, Any],
    torch_dtype: torch.dtype,
    seed: int,
    routing_skew: float,
    shard_bytes: int,
    progress: bool,
    mtp: bool = False,
    quant: dict[str, Any] | None = None,
) -> None:
    """Write every file of the checkpoint into `tmp` (FP8 where `quant`, a `quantization_config`, says)."""
    special = write_tokenizer(tmp, int(fields["vocab_size"]))
    eos = special[EOS]
    config = hf_config(fam_name, fields, torch_dtype, eos)
    if quant is not None:
        config["quantization_config"] = quant
    fam = family_by_name(fam_name)
    cfg = fam.config_from_hf(HFConfig(config))
    if not mtp:
        cfg = cfg.with_(num_mtp_layers=0)
    model = MoECausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    quantized = quantized_weight_names(model, cfg) if quant is not None else set()
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    itemsize = torch.empty(0, dtype=torch_dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    sizes = {name: math.prod(shape) * (1 if name in quantized else itemsize) for name, shape in shapes.items()}
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    skew = SkewInjector(cfg.hidden_size, routing_skew, seed)
    weight_map: dict[str, str] = {}
    total = sum(sizes.values())
    written = 0
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"synth {preset}", disable=not progress)
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            t = _init(name, shapes[name], gen, cfg.num_layers)
            if name == "model.embed_tokens.weight":
                t = skew.embedding(t)
            elif name.endswith("mlp.gate.weight"):
                t = skew.router(t)
            keep_fp32 = name.endswith("e_score_correction_bias")
            hub = fam.to_hub(ours_to_hub(name, cfg))
            if name in quantized:
                data, scale = quantize(t, ue8m0=quant.get("scale_fmt") == "ue8m0")
                scale = scale.to(E8M0) if quant.get("scale_fmt") == "ue8m0" else scale
                tensors[hub.removesuffix(".weight") + ".weight_scale_inv"] = scale
                written += scale.numel() * scale.element_size()
                t = data
            else:
                t = t.to(torch.float32 if keep_fp32 else torch_dtype).contiguous()
            tensors[hub] = t
            written += t.numel() * t.element_size()
            bar.update(sizes[name])
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
        del tensors
    bar.close()
    index = {"metadata": {"total_size": written}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    gen_cfg = {"eos_token_id": eos, "pad_token_id": eos, "do_sample": False}
    (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    made = {"family": fam_name, "preset": preset, "seed": seed, "routing_skew": routing_skew, "mtp": mtp}
    (tmp / MARKER).write_text(json.dumps({**made, "files": sorted(p.name for p in tmp.iterdir())}))
