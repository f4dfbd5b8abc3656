"""Qwen3-MoE (Qwen3MoeForCausalLM): per-head q/k RMSNorm, no qkv bias, no shared expert."""

from tilemem.config import HFConfig, ModelConfig
from tilemem.models.qwen2_moe import check_no_sliding_window, dense_layers
from tilemem.models.registry import Family


def config_from_hf(hf: HFConfig) -> ModelConfig:
    """Only diff with qwen2_moe: q/k norm per head, explicit head_dim, no shared expert."""
    check_no_sliding_window(hf)
    return ModelConfig(
        family="qwen3_moe",
        **hf.common(),
        intermediate_size=int(hf.req("intermediate_size")),
        moe_intermediate_size=int(hf.req("moe_intermediate_size")),
        num_experts=int(hf.req("num_experts")),
        top_k=int(hf.req("num_experts_per_tok")),
        rope=hf.rope(),
        attention_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)),
        qk_norm="head",
        router_weights_in_model_dtype=True,
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        dense_layers=dense_layers(hf),
    )


FAMILY = Family(
    name="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    model_type="qwen3_moe",
    attribute_map={"num_experts": "num_local_experts"},
    config_from_hf=config_from_hf,
    tiny=dict(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        head_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        vocab_size=512,
        max_position_embeddings=512,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        tie_word_embeddings=False,
    ),
)
