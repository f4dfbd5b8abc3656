"""Mixtral (MixtralForCausalLM): Llama attention with GQA, softmax top-k always renormalized.

Only diff with OLMoE in the checkpoint: experts live under `block_sparse_moe` as w1 (gate),
w3 (up) and w2 (down)."""

from tilemem.config import HFConfig, ModelConfig
from tilemem.models.registry import Family


def config_from_hf(hf: HFConfig) -> ModelConfig:
    """Mixtral calls experts `num_local_experts` and always renormalizes top-k weights."""
    inter = int(hf.req("intermediate_size"))
    return ModelConfig(
        family="mixtral",
        **hf.common(),
        intermediate_size=inter,
        moe_intermediate_size=inter,
        num_experts=int(hf.req("num_local_experts")),
        top_k=int(hf.req("num_experts_per_tok")),
        rope=hf.rope(),
        norm_topk_prob=True,
    )


FAMILY = Family(
    name="mixtral",
    architecture="MixtralForCausalLM",
    model_type="mixtral",
    attribute_map={"num_experts": "num_local_experts"},
    config_from_hf=config_from_hf,
    renames=(
        (".block_sparse_moe.", ".mlp."),
        (".w1.", ".gate_proj."),
        (".w3.", ".up_proj."),
        (".w2.", ".down_proj."),
    ),
    tiny=dict(
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=512,
        max_position_embeddings=512,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
)
