"""Synthetic checkpoint presets: Hugging Face config fields per (family, preset).

`tiny` (every family) is for unit tests, `small` is the demo model, and the real-shape presets
reproduce the published configs exactly (weights random)."""

from __future__ import annotations

from typing import Any

from tilemem.errors import ConfigError
from tilemem.models.registry import families, family_by_name

REAL_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "olmoe-1b-7b": (
        "olmoe",
        dict(
            vocab_size=50304,
            hidden_size=2048,
            intermediate_size=1024,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            num_experts=64,
            num_experts_per_tok=8,
            max_position_embeddings=4096,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            norm_topk_prob=False,
            clip_qkv=None,
            tie_word_embeddings=False,
        ),
    ),
    "mixtral-8x7b": (
        "mixtral",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            rms_norm_eps=1e-5,
            sliding_window=None,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3-30b-a3b": (
        "qwen3_moe",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            head_dim=128,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            num_experts=128,
            num_experts_per_tok=8,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            max_position_embeddings=40960,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
    ),
    "deepseek-v2-lite": (
        "deepseek_v2",
        dict(
            vocab_size=102400,
            hidden_size=2048,
            intermediate_size=10944,
            moe_intermediate_size=1408,
            num_hidden_layers=27,
            num_attention_heads=16,
            num_key_value_heads=16,
            n_routed_experts=64,
            n_shared_experts=2,
            num_experts_per_tok=6,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            topk_method="greedy",
            routed_scaling_factor=1.0,
            q_lora_rank=None,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            max_position_embeddings=163840,
            rope_theta=10000.0,
            rope_scaling=dict(
                type="yarn",
                factor=40,
                original_max_position_embeddings=4096,
                beta_fast=32,
                beta_slow=1,
                mscale=0.707,
                mscale_all_dim=0.707,
            ),
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
    ),
    "deepseek-v3.2": (
        "deepseek_v32",
        dict(
            vocab_size=129280,
            hidden_size=7168,
            intermediate_size=18432,
            moe_intermediate_size=2048,
            num_hidden_layers=61,
            num_attention_heads=128,
            num_key_value_heads=128,
            n_routed_experts=256,
            n_shared_experts=1,
            num_experts_per_tok=8,
            first_k_dense_replace=3,
            n_group=8,
            topk_group=4,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            index_topk=2048,
            index_n_heads=64,
            index_head_dim=128,
            num_nextn_predict_layers=1,
            max_position_embeddings=163840,
            rope_theta=10000.0,
            rope_scaling=dict(
                type="yarn",
                factor=40,
                original_max_position_embeddings=4096,
                beta_fast=32,
                beta_slow=1,
                mscale=1.0,
                mscale_all_dim=1.0,
            ),
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
    ),
    "glm-5": (
        "glm_moe_dsa",
        dict(
            vocab_size=154880,
            hidden_size=6144,
            intermediate_size=12288,
            moe_intermediate_size=2048,
            num_hidden_layers=78,
            num_attention_heads=64,
            num_key_value_heads=64,
            n_routed_experts=256,
            n_shared_experts=1,
            num_experts_per_tok=8,
            first_k_dense_replace=3,
            n_group=1,
            topk_group=1,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            q_lora_rank=2048,
            kv_lora_rank=512,
            qk_nope_head_dim=192,
            qk_rope_head_dim=64,
            v_head_dim=256,
            index_topk=2048,
            index_n_heads=32,
            index_head_dim=128,
            num_nextn_predict_layers=1,
            max_position_embeddings=202752,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
    ),
}

SMALL: dict[str, Any] = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=256,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    num_experts=32,
    num_experts_per_tok=4,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    norm_topk_prob=False,
    clip_qkv=None,
    tie_word_embeddings=False,
)


def preset_names() -> list[str]:
    """Every preset name."""
    return ["tiny", "small", *REAL_SHAPES]


def resolve_preset(family: str | None, preset: str) -> tuple[str, dict[str, Any]]:
    """(family name, HF config fields) for a preset; the family may be implied by the preset."""
    if preset in REAL_SHAPES:
        fam, fields = REAL_SHAPES[preset]
        if family not in (None, fam):
            raise ConfigError(f"preset '{preset}' is a {fam} model, not {family}; drop the family or fix it.")
        return fam, dict(fields)
    if family is None:
        raise ConfigError(f"preset '{preset}' needs a family; one of: {', '.join(families())}.")
    fam = family_by_name(family)
    if preset == "tiny":
        return fam.name, dict(fam.tiny)
    if preset == "small":
        if fam.name != "olmoe":
            raise ConfigError("preset 'small' exists for the olmoe family only; use `tilemem synth olmoe`.")
        return fam.name, dict(SMALL)
    raise ConfigError(f"unknown preset '{preset}'; presets: {', '.join(preset_names())}.")
