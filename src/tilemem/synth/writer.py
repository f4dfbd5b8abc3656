"""Write a real Hugging Face-format checkpoint with random weights, shard by shard.

Routing skew: every embedding shares a component along one direction u, which survives into the
post-attention RMSNorm output; each router row gets `skew * z_e * u` added, with z_e a per-layer
permutation of standard-normal strengths scaled per layer. Larger skew concentrates routing mass
on fewer experts, differently in every layer, and the weights stay an ordinary valid checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from tilemem.config import HFConfig
from tilemem.loader.checkpoint import parse_dtype
from tilemem.models.model import MoECausalLM
from tilemem.models.registry import family_by_name
from tilemem.synth.presets import resolve_preset
from tilemem.synth.tokenizer import EOS, write_tokenizer

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
INIT_STD = 0.02


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


def _init(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight") or "layernorm" in name:
        return torch.ones(shape)
    if name.endswith(".bias") or name.endswith("e_score_correction_bias"):
        return torch.randn(shape, generator=gen) * 0.01
    return torch.randn(shape, generator=gen) * INIT_STD


class SkewInjector:
    """Adds the shared embedding direction and per-layer router biases described above."""

    def __init__(self, hidden: int, skew: float, seed: int) -> None:
        self.skew = skew
        self.gen = torch.Generator().manual_seed(seed + 7919)
        u = torch.randn(hidden, generator=self.gen)
        self.u = u / u.norm()
        self.hidden = hidden

    def embedding(self, w: torch.Tensor) -> torch.Tensor:
        if self.skew <= 0:
            return w
        # Shared component as large as the random part (norm INIT_STD * sqrt(D)).
        return w + self.u * INIT_STD * math.sqrt(self.hidden)

    def router(self, w: torch.Tensor) -> torch.Tensor:
        if self.skew <= 0:
            return w
        experts = w.shape[0]
        layer_scale = 0.5 + torch.rand(1, generator=self.gen).item()
        strengths = torch.randn(experts, generator=self.gen)[torch.randperm(experts, generator=self.gen)]
        # x_norm . u ~ sqrt(D / 2), so this adds about skew * layer_scale * z_e to the logits.
        return w + (self.skew * layer_scale * strengths).unsqueeze(1) * self.u / math.sqrt(self.hidden / 2)


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
) -> Path:
    """Write a synthetic checkpoint to `out` (atomically: a temp folder renamed at the end)."""
    fam_name, fields = resolve_preset(family, preset)
    fields.update(overrides or {})
    torch_dtype = parse_dtype(dtype)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    special = write_tokenizer(tmp, int(fields["vocab_size"]))
    eos = special[EOS]
    config = hf_config(fam_name, fields, torch_dtype, eos)
    fam = family_by_name(fam_name)
    cfg = fam.config_from_hf(HFConfig(config))
    shapes = {k: tuple(v.shape) for k, v in MoECausalLM(cfg).state_dict(keep_vars=True).items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    itemsize = torch.empty(0, dtype=torch_dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    skew = SkewInjector(cfg.hidden_size, routing_skew, seed)
    weight_map: dict[str, str] = {}
    total = sum(math.prod(s) * itemsize for s in shapes.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"synth {preset}", disable=not progress)
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            t = _init(name, shapes[name], gen)
            if name == "model.embed_tokens.weight":
                t = skew.embedding(t)
            elif name.endswith("mlp.gate.weight"):
                t = skew.router(t)
            keep_fp32 = name.endswith("e_score_correction_bias")
            tensors[fam.to_hub(name)] = t.to(torch.float32 if keep_fp32 else torch_dtype).contiguous()
            bar.update(math.prod(shapes[name]) * itemsize)
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
        del tensors
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    gen_cfg = {"eos_token_id": eos, "pad_token_id": eos, "do_sample": False}
    (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    (tmp / "tilemem_synth.json").write_text(
        json.dumps({"family": fam_name, "preset": preset, "seed": seed, "routing_skew": routing_skew})
    )
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
