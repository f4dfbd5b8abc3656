"""DeepSeek-V2 (DeepseekV2ForCausalLM): multi-head latent attention (MLA, with or without q LoRA),
YaRN rope, `first_k_dense_replace` dense layers, fused shared experts, softmax routing that is
greedy or group-limited, scaled by `routed_scaling_factor`.

Only diff with the original DeepSeek code: transformers' router never renormalizes top-k weights
for V2 (it ignores `norm_topk_prob`), and it is our oracle, so neither do we. Rope always rotates
interleaved pairs (as complex numbers); unlike V3 there is no `rope_interleave` switch.
"""

from dataclasses import replace

from tilemem.config import HFConfig, ModelConfig
from tilemem.models.registry import Family


def mla_common(hf: HFConfig) -> dict:
    """`hf.common()` for MLA: one KV head per query head, and `head_dim` the rope width, as transformers
    sets it (unused by MLA attention, but a config transformers saved must read as the same model)."""
    common = hf.common()
    common["num_kv_heads"] = common["num_heads"]
    common["head_dim"] = int(hf.req("qk_rope_head_dim"))
    return common


def mla_fields(hf: HFConfig) -> dict:
    """MLA, MoE-layout and routing fields shared by DeepSeek-V2 and V3."""
    moe_inter = int(hf.req("moe_intermediate_size"))
    first_dense = int(hf.get("first_k_dense_replace", 0))
    return dict(
        intermediate_size=int(hf.req("intermediate_size")),
        moe_intermediate_size=moe_inter,
        num_experts=int(hf.req("n_routed_experts")),
        top_k=int(hf.req("num_experts_per_tok")),
        n_group=int(hf.get("n_group", 1)),
        topk_group=int(hf.get("topk_group", 1)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        num_shared_experts=int(hf.get("n_shared_experts", 0)),
        shared_intermediate_size=moe_inter,
        dense_layers=tuple(range(min(first_dense, int(hf.req("num_hidden_layers"))))),
        q_lora_rank=int(hf.get("q_lora_rank", 0) or 0),
        kv_lora_rank=int(hf.req("kv_lora_rank")),
        qk_nope_head_dim=int(hf.req("qk_nope_head_dim")),
        qk_rope_head_dim=int(hf.req("qk_rope_head_dim")),
        v_head_dim=int(hf.req("v_head_dim")),
        attention_bias=bool(hf.get("attention_bias", False)),
        router_fp32=True,  # transformers upcasts hidden states and router weight for V2 and V3 alike
    )


def config_from_hf(hf: HFConfig) -> ModelConfig:
    """V2: softmax scores; `topk_method` greedy or group_limited_greedy."""
    common = mla_common(hf)
    method = str(hf.get("topk_method", "greedy"))
    return ModelConfig(
        family="deepseek_v2",
        **common,
        **mla_fields(hf),
        # transformers rotates (x0, x1), (x2, x3), ... as fp32 complex numbers (`apply_rotary_emb`):
        # our interleave path (its halves output layout permutes q and k alike), in fp32.
        rope=replace(hf.rope(interleave=True), fp32_rotate=True),
        scoring_func="softmax",
        topk_method=method,
        norm_topk_prob=False,
    )


FAMILY = Family(
    name="deepseek_v2",
    architecture="DeepseekV2ForCausalLM",
    model_type="deepseek_v2",
    attribute_map={"num_experts": "n_routed_experts"},
    config_from_hf=config_from_hf,
    tiny=dict(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=2,
        # top_k > topk_group, else group-limited greedy always picks what plain greedy picks.
        num_experts_per_tok=3,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        topk_method="group_limited_greedy",
        routed_scaling_factor=1.5,
        q_lora_rank=None,
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
            mscale=0.707,
            mscale_all_dim=0.707,
        ),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
)
