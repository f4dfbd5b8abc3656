"""DeepSeek-V3 (DeepseekV3ForCausalLM). Only diff with deepseek_v2: sigmoid router scores with
`e_score_correction_bias` (noaux_tc group choice), top-k renormalization, q LoRA, and rope
applied to interleaved pairs (`rope_interleave`)."""

from tilemem.config import HFConfig, ModelConfig
from tilemem.models.deepseek_v2 import mla_common, mla_fields
from tilemem.models.registry import Family


def config_from_hf(hf: HFConfig) -> ModelConfig:
    """V3 routing is always sigmoid + bias-corrected group-limited top-k (noaux_tc)."""
    common = mla_common(hf)
    return ModelConfig(
        family="deepseek_v3",
        **common,
        **mla_fields(hf),
        rope=hf.rope(interleave=bool(hf.get("rope_interleave", True))),
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        router_bias=True,
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
    )


FAMILY = Family(
    name="deepseek_v3",
    architecture="DeepseekV3ForCausalLM",
    model_type="deepseek_v3",
    attribute_map={"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"},
    config_from_hf=config_from_hf,
    tiny=dict(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        scoring_func="sigmoid",  # as published configs say it (llama.cpp's converter reads it)
        topk_method="noaux_tc",
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        vocab_size=512,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rope_scaling=dict(
            type="yarn",
            factor=4.0,
            original_max_position_embeddings=256,
            beta_fast=32,
            beta_slow=1,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        rope_interleave=True,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
)
