"""Qwen2-MoE (Qwen2MoeForCausalLM): qkv bias, a shared expert scaled by a sigmoid gate,
`decoder_sparse_step` / `mlp_only_layers` dense layers, optional top-k renormalization."""

from tilemem.config import HFConfig, ModelConfig
from tilemem.errors import ConfigError
from tilemem.models.registry import Family


def dense_layers(hf: HFConfig) -> tuple[int, ...]:
    """Layers that run a dense MLP: listed in mlp_only_layers or off the sparse step."""
    step = int(hf.get("decoder_sparse_step", 1))
    only = set(hf.get("mlp_only_layers", []))
    return tuple(i for i in range(int(hf.req("num_hidden_layers"))) if i in only or (i + 1) % step != 0)


def check_no_sliding_window(hf: HFConfig) -> None:
    """Sliding-window attention is not implemented; refuse rather than compute something else."""
    if hf.get("use_sliding_window", False):
        raise ConfigError(
            f"{hf.source}: use_sliding_window=true is not supported; set it to false "
            "(the released Qwen MoE checkpoints do)."
        )


def config_from_hf(hf: HFConfig) -> ModelConfig:
    """Shared expert width is `shared_expert_intermediate_size`; experts are `num_experts`."""
    check_no_sliding_window(hf)
    return ModelConfig(
        family="qwen2_moe",
        **hf.common(),
        intermediate_size=int(hf.req("intermediate_size")),
        moe_intermediate_size=int(hf.req("moe_intermediate_size")),
        num_experts=int(hf.req("num_experts")),
        top_k=int(hf.req("num_experts_per_tok")),
        rope=hf.rope(),
        attention_bias=bool(hf.get("qkv_bias", True)),
        router_weights_in_model_dtype=True,
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        num_shared_experts=1 if int(hf.get("shared_expert_intermediate_size", 0)) else 0,
        shared_intermediate_size=int(hf.get("shared_expert_intermediate_size", 0)),
        shared_expert_gate=True,
        dense_layers=dense_layers(hf),
    )


FAMILY = Family(
    name="qwen2_moe",
    architecture="Qwen2MoeForCausalLM",
    model_type="qwen2_moe",
    config_from_hf=config_from_hf,
    renames=((".mlp.shared_expert.", ".mlp.shared_experts."),),
    tiny=dict(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        norm_topk_prob=False,
        vocab_size=512,
        max_position_embeddings=512,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        tie_word_embeddings=False,
    ),
)
