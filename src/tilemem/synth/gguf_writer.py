"""Write a checkpoint as a GGUF file the way llama.cpp's converter and `llama-quantize` lay it out: llama.cpp's
metadata keys and tensor names, experts stacked per layer, llama's q/k rows permuted for its rope, MLA's kv_b
split into attn_k_b / attn_v_b, the byte-level BPE tokenizer and chat template; weights in a quant mix
(`MIXES`: llama.cpp's Q4_K_M recipe, or one type everywhere). The file is written to a temp name, then renamed.

`synth --format gguf` writes a synthetic checkpoint and converts it here, so tests need no download.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tilemem.errors import ConfigError
from tilemem.layers.ggml import QUANT_TYPES
from tilemem.loader.checkpoint import Checkpoint
from tilemem.loader.gguf_arch import EXPERTS, GLOBAL, LAYER, SIGMOID
from tilemem.synth.ggml_quant import quantize

ARCH = {
    "olmoe": "olmoe",
    "mixtral": "llama",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
}
"""Our family -> llama.cpp's architecture."""
MIXES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
"""llama-quantize's type for rows that are not a multiple of 256 weights."""
FLOAT = {"f32": (np.float32, 0), "f16": (np.float16, 1), "bf16": (np.uint16, 30)}
TO_GGUF_LAYER = {ours: gguf for gguf, ours in LAYER.items()}
TO_GGUF_EXPERT = {ours: gguf for gguf, ours in EXPERTS.items()}
TO_GGUF_GLOBAL = {ours: gguf for gguf, ours in GLOBAL.items()}


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's `use_more_bits`: the layers Q4_K_M gives Q6_K attn_v / ffn_down."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_type(mix: str, name: str, shape: tuple[int, ...], layers: int) -> str:
    """The type `mix` stores GGUF tensor `name` of `shape` in: f32 for vectors, norms and routers, else the mix's
    type for it, falling back as llama-quantize does where rows do not split into its blocks."""
    kind = name.split(".")[-2]
    if len(shape) == 1 or "norm" in kind or kind in ("ffn_gate_inp", "exp_probs_b", "ffn_gate_inp_shexp"):
        return "f32"
    if mix in FLOAT:
        return mix
    want = {"q4_k_m": "q4_k", "q5_k_m": "q5_k"}.get(mix, mix)
    if mix in ("q4_k_m", "q5_k_m", "q4_0"):
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        if name == "output.weight" or (kind in ("attn_v", "ffn_down", "ffn_down_exps") and _more_bits(layer, layers)):
            want = "q6_k"
    if shape[-1] % QUANT_TYPES[want].weights:
        want = FALLBACK.get(want, want)
    return want if shape[-1] % QUANT_TYPES[want].weights == 0 else "f16"


def _metadata(hf: dict[str, Any], family: str, arch: str) -> dict[str, tuple[str, Any]]:
    """GGUF key -> (value kind, value): the inverse of `loader.gguf_arch.hf_config`."""
    heads = int(hf["num_attention_heads"])
    kv = {
        "context_length": ("u32", hf["max_position_embeddings"]),
        "embedding_length": ("u32", hf["hidden_size"]),
        "block_count": ("u32", hf["num_hidden_layers"]),
        "attention.head_count": ("u32", heads),
        "attention.head_count_kv": ("u32", hf.get("num_key_value_heads") or heads),
        "rope.freq_base": ("f32", hf.get("rope_theta", 10000.0)),
        "attention.layer_norm_rms_epsilon": ("f32", hf["rms_norm_eps"]),
        "expert_count": ("u32", hf.get("num_experts") or hf.get("num_local_experts") or hf.get("n_routed_experts")),
        "expert_used_count": ("u32", hf["num_experts_per_tok"]),
        "feed_forward_length": ("u32", hf["intermediate_size"]),
    }
    if "moe_intermediate_size" in hf:
        kv["expert_feed_forward_length"] = ("u32", hf["moe_intermediate_size"])
    if family == "olmoe" and hf.get("clip_qkv"):
        kv["attention.clamp_kqv"] = ("f32", hf["clip_qkv"])
    if family == "qwen3_moe":
        kv["attention.key_length"] = ("u32", hf.get("head_dim") or hf["hidden_size"] // heads)
        kv["attention.value_length"] = kv["attention.key_length"]
    if family == "qwen2_moe":
        kv["expert_shared_feed_forward_length"] = ("u32", hf["shared_expert_intermediate_size"])
    if arch == "deepseek2":
        kv["attention.head_count_kv"] = ("u32", 1)
        rope, nope, v = hf["qk_rope_head_dim"], hf["qk_nope_head_dim"], hf["v_head_dim"]
        kv.update({
            "leading_dense_block_count": ("u32", hf.get("first_k_dense_replace", 0)),
            "vocab_size": ("u32", hf["vocab_size"]),
            "attention.kv_lora_rank": ("u32", hf["kv_lora_rank"]),
            "attention.key_length": ("u32", hf["kv_lora_rank"] + rope),
            "attention.value_length": ("u32", hf["kv_lora_rank"]),
            "attention.key_length_mla": ("u32", nope + rope),
            "attention.value_length_mla": ("u32", v),
            "expert_shared_count": ("u32", hf.get("n_shared_experts", 0)),
            "expert_weights_scale": ("f32", hf.get("routed_scaling_factor", 1.0)),
            "expert_group_count": ("u32", hf.get("n_group", 1)),
            "expert_group_used_count": ("u32", hf.get("topk_group", 1)),
            "rope.dimension_count": ("u32", rope),
        })  # fmt: skip
        if hf.get("q_lora_rank"):
            kv["attention.q_lora_rank"] = ("u32", hf["q_lora_rank"])
        if hf.get("norm_topk_prob"):
            kv["expert_weights_norm"] = ("bool", True)
        if family == "deepseek_v3":
            kv["expert_gating_func"] = ("u32", SIGMOID)
        scaling = hf.get("rope_scaling") or {}
        if scaling.get("type", scaling.get("rope_type")) == "yarn":
            kv.update({
                "rope.scaling.type": ("str", "yarn"),
                "rope.scaling.factor": ("f32", scaling["factor"]),
                "rope.scaling.original_context_length": ("u32", scaling["original_max_position_embeddings"]),
                "rope.scaling.yarn_beta_fast": ("f32", scaling.get("beta_fast", 32)),
                "rope.scaling.yarn_beta_slow": ("f32", scaling.get("beta_slow", 1)),
                "rope.scaling.yarn_log_multiplier": ("f32", 0.1 * scaling.get("mscale_all_dim", 1.0)),
            })  # fmt: skip
    return {f"{arch}.{k}": v for k, v in kv.items()}


def _gguf_tensors(ckpt: Checkpoint, arch: str) -> Iterator[tuple[str, Any]]:
    """(GGUF name, fp32 tensor or a callable giving it) for every tensor, in llama.cpp's names and layouts.
    Stacked experts and rebuilt tensors are callables, so the first pass (tensor infos) reads no data."""
    hf = ckpt.hf_config
    heads, kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    ours = {ckpt.to_ours(n): n for n, _ in ckpt.tensors()}
    experts: dict[tuple[int, str], list[str]] = {}
    for name in ours:
        base, _, suffix = name.rpartition(".")
        if base in TO_GGUF_GLOBAL:
            yield f"{TO_GGUF_GLOBAL[base]}.{suffix}", (lambda n=name: ckpt.tensor(ours[n]).float())
            continue
        parts = base.split(".")  # model.layers.{i}.{module...}
        layer, module = int(parts[2]), ".".join(parts[3:])
        if module.startswith("mlp.experts."):
            experts.setdefault((layer, parts[-1]), []).append(name)
            if len(experts[(layer, parts[-1])]) == 1:  # one stacked tensor, at the first expert's place
                kind = TO_GGUF_EXPERT[parts[-1]]
                yield f"blk.{layer}.{kind}.{suffix}", (lambda k=(layer, parts[-1]): _stack(ckpt, ours, experts[k]))
        elif module == "mlp.gate" and suffix == "e_score_correction_bias":
            yield f"blk.{layer}.exp_probs_b.bias", (lambda n=name: ckpt.tensor(ours[n]).float())
        elif module == "self_attn.kv_b_proj":
            yield from _split_kv_b(ckpt, ours[name], layer, hf)
        elif module == "mlp.shared_expert_gate":
            yield f"blk.{layer}.ffn_gate_inp_shexp.{suffix}", (lambda n=name: ckpt.tensor(ours[n]).float().reshape(-1))
        else:
            kind = TO_GGUF_LAYER[module]
            permute = arch == "llama" and kind in ("attn_q", "attn_k")
            n_heads = heads if kind == "attn_q" else kv_heads
            yield f"blk.{layer}.{kind}.{suffix}", (
                lambda n=name, p=permute, h=n_heads: _permute(ckpt.tensor(ours[n]).float(), h) if p else
                ckpt.tensor(ours[n]).float()
            )  # fmt: skip


def _stack(ckpt: Checkpoint, ours: dict[str, str], names: list[str]) -> torch.Tensor:
    order = sorted(names, key=lambda n: int(n.split(".")[5]))  # model.layers.L.mlp.experts.E....
    return torch.stack([ckpt.tensor(ours[n]).float() for n in order])


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order for its rope (the converter's `permute`)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _split_kv_b(ckpt: Checkpoint, hub: str, layer: int, hf: dict) -> Iterator[tuple[str, Any]]:
    heads, nope, v = hf["num_attention_heads"], hf["qk_nope_head_dim"], hf["v_head_dim"]

    def half(k: bool) -> torch.Tensor:
        kv_b = ckpt.tensor(hub).float().view(heads, nope + v, -1)  # [H, nope + v, kv_lora]
        return kv_b[:, :nope].transpose(1, 2).contiguous() if k else kv_b[:, nope:].contiguous()

    yield f"blk.{layer}.attn_k_b.weight", lambda: half(True)
    yield f"blk.{layer}.attn_v_b.weight", lambda: half(False)


def _encode(t: torch.Tensor, kind: str) -> np.ndarray:
    """A tensor stored as `kind`: numpy data GGUFWriter writes as it is."""
    if kind in FLOAT:
        if kind == "bf16":
            return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        return t.numpy().astype(FLOAT[kind][0])
    return quantize(kind, t).numpy()


def _tokenizer(writer, ckpt_dir: Path) -> None:
    """The byte-level BPE tokenizer (tokenizer.json) and chat template, in llama.cpp's keys."""
    tok = json.loads((ckpt_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    size = max([*vocab.values(), *added]) + 1
    tokens, types = [""] * size, [1] * size
    for text, i in vocab.items():
        tokens[i] = text
    for i, a in added.items():
        tokens[i] = a["content"]
        types[i] = 3 if a.get("special") else 4  # CONTROL, USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("olmo")  # GPT-2's split regex, what our ByteLevel pre-tokenizer does
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    cfg_file = ckpt_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    eos = cfg.get("eos_token")
    ids = {a["content"]: i for i, a in added.items()}
    if isinstance(eos, str) and eos in ids:
        writer.add_eos_token_id(ids[eos])
    if cfg.get("chat_template"):
        writer.add_chat_template(cfg["chat_template"])


def write_gguf(ckpt_dir: str | Path, out: str | Path, mix: str = "q8_0", progress: bool = True) -> Path:
    """Convert the checkpoint at `ckpt_dir` into the GGUF file `out`, weights in `mix` (one of `MIXES`)."""
    import gguf

    if mix not in MIXES:
        raise ConfigError(f"unknown GGUF quant '{mix}'; use one of {', '.join(MIXES)}.")
    ckpt = Checkpoint.open(ckpt_dir)
    family = ckpt.family.name
    if family not in ARCH:
        raise ConfigError(f"{family} has no llama.cpp architecture; GGUF files are written for {', '.join(ARCH)}.")
    arch = ARCH[family]
    if family == "qwen2_moe" and ckpt.config.dense_layers:
        raise ConfigError(
            f"{ckpt_dir} has dense layers (mlp_only_layers), which llama.cpp's qwen2moe cannot hold; write it with "
            "mlp_only_layers [] or keep it as safetensors."
        )
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_name(f"tilemem synth {family}")
        writer.add_quantization_version(2)
        for key, (kind, value) in _metadata(ckpt.hf_config, family, arch).items():
            {"u32": writer.add_uint32, "f32": writer.add_float32, "bool": writer.add_bool, "str": writer.add_string}[
                kind
            ](key, value)
        _tokenizer(writer, Path(ckpt_dir))
        layers = int(ckpt.hf_config["num_hidden_layers"])
        entries = list(_gguf_tensors(ckpt, arch))
        kinds = {}
        for name, get in entries:
            t = get()
            kinds[name] = tensor_type(mix, name, tuple(t.shape), layers)
            data = _encode(t[:1] if t.dim() > 1 else t, kinds[name])  # one row: dtype and row bytes
            shape = (*t.shape[:-1], data.shape[-1]) if kinds[name] not in FLOAT else tuple(t.shape)
            nbytes = int(np.prod(shape)) * data.dtype.itemsize
            raw = gguf.GGMLQuantizationType[kinds[name].upper()]
            writer.add_tensor_info(name, shape, data.dtype, nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, get in tqdm(entries, desc=f"gguf {mix}", unit="tensor", disable=not progress):
            writer.write_tensor_data(_encode(get(), kinds[name]))
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


GGUF_TINY = {"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 256}
"""`tiny` as a GGUF file: rows of 256 weights, so K-quant files hold K-quant blocks (llama-quantize falls back to
32-weight types on shorter rows), still a few MB."""


def synthesize_gguf(
    family: str | None,
    preset: str,
    out: str | Path,
    mix: str = "q4_k_m",
    seed: int = 0,
    routing_skew: float = 0.0,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """`tilemem synth --format gguf`: a synthetic checkpoint written (bf16) to a temp folder beside `out`, then
    converted to the GGUF file `out` in `mix`. `tiny` takes the widths of `GGUF_TINY`."""
    import shutil

    from tilemem.synth.presets import resolve_preset
    from tilemem.synth.writer import synthesize

    out = Path(out)
    if out.suffix != ".gguf" or out.is_dir():
        raise ConfigError(f"--out '{out}' must be a file name ending in .gguf with --format gguf.")
    if mix not in MIXES:
        raise ConfigError(f"unknown GGUF quant '{mix}'; use one of {', '.join(MIXES)}.")
    fam, fields = resolve_preset(family, preset)
    if fam not in ARCH:
        raise ConfigError(f"{fam} has no llama.cpp architecture; GGUF files are written for {', '.join(ARCH)}.")
    extra = dict(overrides or {})
    if preset == "tiny":
        extra = {**{k: v for k, v in GGUF_TINY.items() if k in fields or k == "hidden_size"}, **extra}
        if "shared_expert_intermediate_size" in fields:
            extra.setdefault("shared_expert_intermediate_size", GGUF_TINY["moe_intermediate_size"])
    if fam == "qwen2_moe":
        extra.setdefault("mlp_only_layers", [])  # llama.cpp's qwen2moe has no dense layers
    out.parent.mkdir(parents=True, exist_ok=True)
    hf_dir = out.with_name(f".{out.name}.hf-{os.getpid()}")
    try:
        synthesize(fam, preset, hf_dir, seed, routing_skew, "bf16", overrides=extra, progress=progress, overwrite=True)
        write_gguf(hf_dir, out, mix, progress)
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)
    return out
