"""OLMoE (OlmoeForCausalLM): q/k RMSNorm over all heads, optional qkv clipping, softmax top-k."""

from tilemem.config import HFConfig, ModelConfig
from tilemem.models.registry import Family


def config_from_hf(hf: HFConfig) -> ModelConfig:
    """OLMoE names its expert width `intermediate_size` and has no dense layers."""
    inter = int(hf.req("intermediate_size"))
    return ModelConfig(
        family="olmoe",
        **hf.common(),
        intermediate_size=inter,
        moe_intermediate_size=inter,
        num_experts=int(hf.req("num_experts")),
        top_k=int(hf.req("num_experts_per_tok")),
        rope=hf.rope(),
        attention_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)),
        qk_norm="full",
        clip_qkv=hf.get("clip_qkv"),
        router_weights_in_model_dtype=True,
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
    )


FAMILY = Family(
    name="olmoe",
    architecture="OlmoeForCausalLM",
    model_type="olmoe",
    attribute_map={"num_local_experts": "num_experts"},
    config_from_hf=config_from_hf,
    tiny=dict(
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        vocab_size=512,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        norm_topk_prob=False,
        clip_qkv=None,
        tie_word_embeddings=False,
    ),
)
