"""How llama.cpp's architectures map onto TileMEM's families: GGUF metadata -> config.json fields, GGUF tensor
names -> our module names, and the few layouts llama.cpp's converter changes (llama's q/k rows permuted for its
rope, experts stacked into one tensor, MLA's kv_b split in two).

Supported: olmoe, qwen2moe, qwen3moe, llama with experts (Mixtral) and deepseek2 (DeepSeek-V2/V3).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from tilemem.errors import UnsupportedArchitectureError, WeightError
from tilemem.layers.ggml import GgmlMatrix
from tilemem.loader.gguf_file import GgufFile, GgufTensor

ARCHITECTURES = ("olmoe", "qwen2moe", "qwen3moe", "llama", "deepseek2")
GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
"""GGUF per-layer tensor -> our module (the suffix `.weight`/`.bias` carries over)."""
EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
"""GGUF stacked expert tensors [E, rows, cols] -> the expert Linear each slice is."""
SOFTMAX, SIGMOID = 1, 2
"""llama.cpp's `expert_gating_func` values."""


def _common(g: GgufFile) -> dict[str, Any]:
    # the embedding's rows are the model's vocabulary (a tokenizer may list fewer tokens than a padded table)
    vocab_size = g.tensor("token_embd.weight").shape[0]
    heads = int(g.req(".attention.head_count"))
    return {
        "hidden_size": int(g.req(".embedding_length")),
        "num_hidden_layers": int(g.req(".block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g.get(".attention.head_count_kv", heads)),
        "vocab_size": int(vocab_size),
        "max_position_embeddings": int(g.req(".context_length")),
        "rope_theta": float(g.get(".rope.freq_base", 10000.0)),
        "rms_norm_eps": _round(float(g.req(".attention.layer_norm_rms_epsilon"))),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": g.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": g.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "bfloat16",
    }


def _round(x: float) -> float:
    """A float32 metadata value back to the decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(f"{x:.7g}")


def hf_config(g: GgufFile) -> dict[str, Any]:
    """The config.json dict of the family the file's architecture maps to."""
    arch = g.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"'{g.path}' is a GGUF model of architecture '{arch}'; TileMEM runs {', '.join(ARCHITECTURES)} "
            "(llama only with experts: Mixtral)."
        )
    c = _common(g)
    experts = int(g.get(".expert_count", 0) or 0)
    if not experts:
        raise UnsupportedArchitectureError(
            f"'{g.path}' ({arch}) has no experts (no {arch}.expert_count); TileMEM runs Mixture-of-Experts models."
        )
    top_k = int(g.req(".expert_used_count"))
    ff = int(g.get(".feed_forward_length", 0) or 0)
    expert_ff = int(g.get(".expert_feed_forward_length", 0) or ff)
    if arch == "olmoe":
        clip = g.get(".attention.clamp_kqv")
        return {
            "architectures": ["OlmoeForCausalLM"],
            "model_type": "olmoe",
            **c,
            "intermediate_size": expert_ff,
            "num_experts": experts,
            "num_experts_per_tok": top_k,
            "norm_topk_prob": bool(g.get(".expert_weights_norm", False)),
            "clip_qkv": float(clip) if clip else None,
        }
    if arch == "llama":
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            **c,
            "intermediate_size": ff,
            "num_local_experts": experts,
            "num_experts_per_tok": top_k,
        }
    if arch in ("qwen2moe", "qwen3moe"):
        out = {**c, "intermediate_size": ff or expert_ff, "moe_intermediate_size": expert_ff}
        out.update(num_experts=experts, num_experts_per_tok=top_k)
        if arch == "qwen3moe":
            head_dim = g.get(".attention.key_length")
            head_dim = int(head_dim) if head_dim else c["hidden_size"] // c["num_attention_heads"]
            return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **out, "head_dim": head_dim,
                    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}  # fmt: skip
        shared = int(g.get(".expert_shared_feed_forward_length", 0) or 0)
        return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", **out, "norm_topk_prob": False,
                "shared_expert_intermediate_size": shared, "decoder_sparse_step": 1, "mlp_only_layers": []}  # fmt: skip
    return _deepseek2(g, c, experts, top_k, ff, expert_ff)


def _deepseek2(g: GgufFile, c: dict, experts: int, top_k: int, ff: int, expert_ff: int) -> dict[str, Any]:
    """DeepSeek-V2 (softmax routing) or V3 (sigmoid with a correction bias, `exp_probs_b`)."""
    gating = g.get(".expert_gating_func")
    v3 = gating == SIGMOID or any(n.endswith("exp_probs_b.bias") for n in g.tensors)
    rope = int(g.req(".rope.dimension_count"))
    key_mla, value_mla = g.get(".attention.key_length_mla"), g.get(".attention.value_length_mla")
    nope = int(key_mla if key_mla else g.req(".attention.key_length")) - rope
    v_head = int(value_mla if value_mla else g.req(".attention.value_length"))
    n_group = int(g.get(".expert_group_count", 1) or 1)
    out = {
        **c,
        "num_key_value_heads": c["num_attention_heads"],
        "intermediate_size": ff,
        "moe_intermediate_size": expert_ff,
        "n_routed_experts": experts,
        "num_experts_per_tok": top_k,
        "n_shared_experts": int(g.get(".expert_shared_count", 0) or 0),
        "first_k_dense_replace": int(g.get(".leading_dense_block_count", 0) or 0),
        "routed_scaling_factor": _round(float(g.get(".expert_weights_scale", 1.0))),
        "norm_topk_prob": bool(g.get(".expert_weights_norm", False)),
        "n_group": n_group,
        "topk_group": int(g.get(".expert_group_used_count", 1) or 1),
        "q_lora_rank": int(g.get(".attention.q_lora_rank", 0) or 0) or None,
        "kv_lora_rank": int(g.req(".attention.kv_lora_rank")),
        "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope,
        "v_head_dim": v_head,
    }
    if g.get(".rope.scaling.type") == "yarn":
        log_mul = float(g.get(".rope.scaling.yarn_log_multiplier", 0.0) or 0.0)
        mscale = _round(log_mul / 0.1) if log_mul else 1.0  # the converter writes 0.1 * mscale_all_dim
        out["rope_scaling"] = {
            "type": "yarn",
            "factor": _round(float(g.req(".rope.scaling.factor"))),
            "original_max_position_embeddings": int(g.req(".rope.scaling.original_context_length")),
            "beta_fast": _round(float(g.get(".rope.scaling.yarn_beta_fast", 32.0))),
            "beta_slow": _round(float(g.get(".rope.scaling.yarn_beta_slow", 1.0))),
            "mscale": mscale,
            "mscale_all_dim": mscale,
        }
    if v3:
        return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **out,
                "scoring_func": "sigmoid", "topk_method": "noaux_tc", "rope_interleave": True}  # fmt: skip
    method = "group_limited_greedy" if n_group > 1 else "greedy"
    return {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", **out, "topk_method": method}


Value = torch.Tensor | GgmlMatrix


def _unpermute(value: Value, heads: int) -> Value:
    """Undo llama.cpp's q/k row order for its rope (rows of each head interleaved by pairs): whole rows move, so
    a quantized matrix stays quantized."""
    data = value.data if isinstance(value, GgmlMatrix) else value
    rows = data.shape[0]
    out = data.reshape(heads, rows // heads // 2, 2, *data.shape[1:]).transpose(1, 2).reshape(data.shape)
    return GgmlMatrix(out.contiguous(), value.qtype, value.cols) if isinstance(value, GgmlMatrix) else out.contiguous()


def _dense(t: GgufTensor) -> torch.Tensor:
    """A tensor as fp32 (a quantized one decoded): for the few tensors whose layout must change."""
    return t.value.dequantize() if isinstance(t.value, GgmlMatrix) else t.value.float()


def _kv_b(k_b: GgufTensor, v_b: GgufTensor, heads: int) -> torch.Tensor:
    """MLA's kv_b_proj [H * (nope + v), kv_lora] from llama.cpp's split halves: attn_k_b [H, kv_lora, nope]
    (transposed, for its absorbed decode) and attn_v_b [H, v, kv_lora]."""
    k = _dense(k_b).reshape(heads, *k_b.shape[-2:]).transpose(1, 2)  # [H, nope, kv_lora]
    v = _dense(v_b).reshape(heads, *v_b.shape[-2:])  # [H, v, kv_lora]
    return torch.cat([k, v], dim=1).reshape(-1, k.shape[-1])


def tensors(g: GgufFile, hf: dict[str, Any]) -> Iterator[tuple[str, str, Value]]:
    """(our name, GGUF name, value) for every tensor of the model, in file order. Values are mapped views of the
    file but for llama's q/k (rows reordered) and MLA's kv_b (rebuilt from attn_k_b + attn_v_b, decoded:
    `kv_b_dequantized`)."""
    arch = g.architecture
    heads, kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
    for name, t in g.tensors.items():
        base, _, suffix = name.rpartition(".")
        if base in GLOBAL:
            yield f"{GLOBAL[base]}.{suffix}", name, t.value
            continue
        parts = base.split(".")
        if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit():
            raise WeightError(f"'{g.path}' has a tensor '{name}' that a {arch} model does not use.")
        layer, kind = f"model.layers.{parts[1]}", parts[2]
        if kind in EXPERTS:
            value = t.value
            for e in range(t.shape[0]):
                part = GgmlMatrix(value.data[e], value.qtype, value.cols) if isinstance(value, GgmlMatrix) else value[e]
                yield f"{layer}.mlp.experts.{e}.{EXPERTS[kind]}.{suffix}", name, part
        elif kind == "exp_probs_b":
            yield f"{layer}.mlp.gate.e_score_correction_bias", name, t.value
        elif kind == "attn_k_b":
            v_b = g.tensor(f"blk.{parts[1]}.attn_v_b.weight")
            yield f"{layer}.self_attn.kv_b_proj.weight", name, _kv_b(t, v_b, heads)
        elif kind == "attn_v_b":
            g.tensor(f"blk.{parts[1]}.attn_k_b.weight")  # consumed with attn_k_b; a lone half is an error
        elif kind == "ffn_gate_inp_shexp":
            value = t.value
            flat = isinstance(value, torch.Tensor) and value.dim() == 1
            yield f"{layer}.{LAYER[kind]}.{suffix}", name, value.reshape(1, -1) if flat else value
        elif kind in LAYER:
            value = t.value
            if arch == "llama" and kind in ("attn_q", "attn_k"):
                value = _unpermute(value, heads if kind == "attn_q" else kv_heads)
            yield f"{layer}.{LAYER[kind]}.{suffix}", name, value
        else:
            raise WeightError(f"'{g.path}' has a tensor '{name}' that a {arch} model does not use.")
