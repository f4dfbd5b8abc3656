"""GLM-MoE-DSA (GlmMoeDsaForCausalLM, GLM-5's architecture). Only diff with deepseek_v32: the indexer
rotates interleaved pairs, and layers marked `shared` in `indexer_types` (or the `index_topk_pattern`
/ `index_topk_freq` schedule it derives from) run no indexer but reuse the previous layer's top-k.
"""

from __future__ import annotations

from typing import Any

from tilemem.config import HFConfig, ModelConfig
from tilemem.errors import ConfigError
from tilemem.models import deepseek_v32
from tilemem.models.deepseek_v32 import dsa_config
from tilemem.models.registry import Family

HF_DEFAULTS: dict[str, Any] = dict(
    first_k_dense_replace=3,
    n_group=1,
    topk_group=1,
    n_shared_experts=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    rms_norm_eps=1e-5,
    index_topk=2048,
    index_head_dim=128,
    index_n_heads=32,
)
"""transformers' GlmMoeDsaConfig defaults for fields a config.json may leave out."""


def indexer_types(hf: HFConfig) -> list[str]:
    """Per-layer `full` / `shared`, resolved like transformers' GlmMoeDsaConfig."""
    n = int(hf.req("num_hidden_layers"))
    types = hf.get("indexer_types")
    if types is None and (pattern := hf.get("index_topk_pattern")) is not None:
        types = [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
    if types is None:
        freq, offset = max(int(hf.get("index_topk_freq", 1)), 1), int(hf.get("index_skip_topk_offset", 2))
        types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]
    if len(types) != n or set(types) - {"full", "shared"} or types[0] != "full":
        raise ConfigError(
            f"{hf.source}: indexer_types {types} must name 'full' or 'shared' for each of the {n} layers, "
            "starting with 'full' (a shared layer reuses the previous full layer's top-k)."
        )
    return types


def config_from_hf(hf: HFConfig) -> ModelConfig:
    """DeepSeek-V3.2's config plus interleaved indexer rope and cross-layer top-k sharing."""
    shared = tuple(i for i, kind in enumerate(indexer_types(hf)) if kind == "shared")
    return dsa_config(hf, "glm_moe_dsa", HF_DEFAULTS, index_rope_interleave=True, index_shared_layers=shared)


FAMILY = Family(
    name="glm_moe_dsa",
    architecture="GlmMoeDsaForCausalLM",
    model_type="glm_moe_dsa",
    attribute_map={"num_local_experts": "n_routed_experts"},
    config_from_hf=config_from_hf,
    # DeepSeek-V3.2's tiny preset (indexer top-k 6 below the test sequences, so it really drops keys)
    # with GLM's default rope, wider heads, 4 layers of which 1 and 3 reuse the top-k of 0 and 2.
    tiny={
        **{k: v for k, v in deepseek_v32.FAMILY.tiny.items() if k not in ("rope_theta", "rope_scaling")},
        "num_hidden_layers": 4,
        "n_group": 1,
        "topk_group": 1,
        "qk_nope_head_dim": 24,
        "v_head_dim": 32,
        "index_topk_pattern": "FSFS",
        "rope_parameters": dict(rope_type="default", rope_theta=1000000.0),
        "rms_norm_eps": 1e-5,
    },
)
