"""DeepSeek-V3.2 (DeepseekV32ForCausalLM). Only diff with deepseek_v3: DeepSeek sparse attention
(`tilemem.layers.dsa`): a lightning indexer per layer keeps each query's top `index_topk` keys, its
rope rotating halves; q LoRA is mandatory and MLA's rope always interleaved (no `rope_interleave`).
"""

from __future__ import annotations

from typing import Any

from tilemem.config import HFConfig, ModelConfig
from tilemem.errors import ConfigError
from tilemem.models import deepseek_v3
from tilemem.models.deepseek_v2 import mla_common, mla_fields
from tilemem.models.registry import Family

HF_DEFAULTS: dict[str, Any] = dict(
    first_k_dense_replace=3,
    n_group=8,
    topk_group=4,
    n_shared_experts=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    index_topk=2048,
    index_head_dim=128,
    index_n_heads=64,
)
"""transformers' DeepseekV32Config defaults for fields a config.json may leave out."""


def dense_layers(hf: HFConfig) -> tuple[int, ...]:
    """Layers with a dense FFN: `mlp_layer_types` if given, else the first `first_k_dense_replace`."""
    n = int(hf.req("num_hidden_layers"))
    types = hf.get("mlp_layer_types")
    if types is not None:
        return tuple(i for i, kind in enumerate(types) if kind == "dense")
    return tuple(range(min(int(hf.get("first_k_dense_replace", 0)), n)))


def dsa_config(hf: HFConfig, family: str, defaults: dict[str, Any], **changes: Any) -> ModelConfig:
    """DeepSeek-V3 routing + MLA + DSA indexer fields, for DeepSeek-V3.2 and GLM-MoE-DSA."""
    hf = HFConfig({**defaults, **{k: v for k, v in hf.data.items() if v is not None}}, hf.source, hf.aliases)
    if not hf.get("q_lora_rank"):
        raise ConfigError(f"{hf.source}: {family} needs q_lora_rank > 0 (the DSA indexer reads the query latent).")
    index_head_dim = int(hf.req("index_head_dim"))
    if index_head_dim < int(hf.req("qk_rope_head_dim")):
        raise ConfigError(f"{hf.source}: index_head_dim ({index_head_dim}) is smaller than qk_rope_head_dim.")
    common = mla_common(hf)
    fields = {**mla_fields(hf), "dense_layers": dense_layers(hf)}
    cfg = ModelConfig(
        family=family,
        **common,
        **fields,
        rope=hf.rope(interleave=True),
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        router_bias=True,
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        index_topk=int(hf.req("index_topk")),
        index_n_heads=int(hf.req("index_n_heads")),
        index_head_dim=index_head_dim,
    )
    return cfg.with_(**changes)


def config_from_hf(hf: HFConfig) -> ModelConfig:
    """Every layer runs its own indexer with half-split rope."""
    return dsa_config(hf, "deepseek_v32", HF_DEFAULTS)


FAMILY = Family(
    name="deepseek_v32",
    architecture="DeepseekV32ForCausalLM",
    model_type="deepseek_v32",
    attribute_map={"num_local_experts": "n_routed_experts"},
    config_from_hf=config_from_hf,
    # V3's tiny preset (without rope_interleave: V3.2 uses half-split rope) plus the indexer. Top-k below
    # the test sequences (4..43 tokens) so the indexer really drops keys; 16 heads keep exact score ties
    # (all heads' relu at zero) negligible.
    tiny={
        **{k: v for k, v in deepseek_v3.FAMILY.tiny.items() if k != "rope_interleave"},
        "index_topk": 6,
        "index_n_heads": 16,
        "index_head_dim": 16,
    },
)
