"""Multi-head latent attention (MLA, DeepSeek-V2/V3).

Keys and values come from a compressed latent: x -> [latent c (R) | shared rope key (dr)], then
c -> RMSNorm -> kv_b_proj -> per-head [k_nope (dn) | v (dv)]. Queries come from x directly
(`q_proj`) or through a low-rank bottleneck (`q_a_proj` -> RMSNorm -> `q_b_proj`). Only the last
dr dims of q and k carry rotary embeddings; the rope key is shared by all heads.

The cache holds the expanded per-head keys [k_nope | k_rope] and values, like transformers does
after `expand_kv`; caching the latent instead is a memory optimization, not a different result.

Shape legend: B batch rows, T new tokens, L cached positions (kv_len), D hidden, H heads,
R kv_lora_rank, Q q_lora_rank, dn qk_nope_head_dim, dr qk_rope_head_dim, dv v_head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tilemem.config import ModelConfig
from tilemem.layers.kv_cache import ForwardContext
from tilemem.layers.linear import Linear
from tilemem.layers.norm import RMSNorm
from tilemem.layers.rope import RotaryEmbedding, yarn_softmax_scale

LATENT_NORM_EPS = 1e-6
"""DeepSeek builds q_a_layernorm / kv_a_layernorm with the RMSNorm default eps, not rms_norm_eps."""


class MLAttention(nn.Module):
    """MLA with hub submodule names (q_proj or q_a_proj/q_a_layernorm/q_b_proj, kv_a_proj_with_mqa,
    kv_a_layernorm, kv_b_proj, o_proj)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.h = cfg.num_heads
        self.dn, self.dr, self.dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        d, dqk = cfg.hidden_size, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.q_lora = cfg.q_lora_rank > 0
        if self.q_lora:
            self.q_a_proj = Linear(d, cfg.q_lora_rank, cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, self.h * dqk, False)
        else:
            self.q_proj = Linear(d, self.h * dqk, False)
        self.kv_a_proj_with_mqa = Linear(d, self.rank + self.dr, cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.rank, self.h * (self.dn + self.dv))
        self.o_proj = Linear(self.h * self.dv, d, cfg.attention_bias)
        # Softmax scale over the full q/k width, times mscale(factor, mscale_all_dim)^2 under YaRN.
        self.scale = yarn_softmax_scale(cfg.rope, dqk**-0.5)

    def forward(
        self,
        x: torch.Tensor,
        ctx: ForwardContext,
        rope: RotaryEmbedding,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D], writing this layer's new keys/values into the cache."""
        b, t, _ = x.shape
        if self.q_lora:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # [B, T, H*(dn+dr)]
        else:
            q = self.q_proj(x)  # [B, T, H*(dn+dr)]
        q = q.view(b, t, self.h, self.dn + self.dr).transpose(1, 2)  # [B, H, T, dn+dr]
        q_nope, q_rope = q.split([self.dn, self.dr], dim=-1)  # [B, H, T, dn], [B, H, T, dr]

        compressed = self.kv_a_proj_with_mqa(x)  # [B, T, R+dr]
        latent, k_rope = compressed.split([self.rank, self.dr], dim=-1)  # [B, T, R], [B, T, dr]
        kv = self.kv_b_proj(self.kv_a_layernorm(latent))  # [B, T, H*(dn+dv)]
        kv = kv.view(b, t, self.h, self.dn + self.dv).transpose(1, 2)  # [B, H, T, dn+dv]
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)  # [B, H, T, dn], [B, H, T, dv]
        k_rope = k_rope.view(b, 1, t, self.dr)  # [B, 1, T, dr], shared by all heads

        q_rope, k_rope = rope.apply(q_rope, cos, sin), rope.apply(k_rope, cos, sin)
        q = torch.cat([q_nope, q_rope], dim=-1)  # [B, H, T, dn+dr]
        k = torch.cat([k_nope, k_rope.expand(b, self.h, t, self.dr)], dim=-1)  # [B, H, T, dn+dr]
        keys, values = ctx.store(self.layer, k, v)  # [B, H, L, dn+dr], [B, H, L, dv]
        # -> [B, H, T, dv]; keys are dn+dr wide, values dv wide (SDPA allows the widths to differ).
        o = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=ctx.attn_mask, is_causal=ctx.causal, scale=self.scale
        )
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.h * self.dv))
