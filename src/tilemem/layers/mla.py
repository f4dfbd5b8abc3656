"""Multi-head latent attention (MLA, DeepSeek-V2/V3).

Keys and values come from a compressed latent: x -> [latent c (R) | shared rope key (dr)], then
c -> RMSNorm -> kv_b_proj -> per-head [k_nope (dn) | v (dv)]. Queries come from x directly
(`q_proj`) or through a low-rank bottleneck (`q_a_proj` -> RMSNorm -> `q_b_proj`). Only the last
dr dims of q and k carry rotary embeddings; the rope key is shared by all heads.

The cache holds only the normed latent and the rotated rope key: R + dr values per token (one "head"), not the
H * (dn + dr + dv) of the expanded keys and values (71x less for DeepSeek-V3). A prefill expands the cached
latents with kv_b_proj and attends as transformers does; a decode step attends in the latent space instead
("absorbed" weights, as DeepSeek's own inference code does): with kv_b_proj's rows split per head into
W_UK [dn, R] and W_UV [dv, R], q_nope . k_nope = (q_nope W_UK) . c, and the output's values are
(softmax . c) W_UV^T, so each cached position costs R + dr multiply-adds per head and nothing is expanded.

Shape legend: B batch rows, T new tokens, L cached positions (kv_len), D hidden, H heads,
R kv_lora_rank, Q q_lora_rank, dn qk_nope_head_dim, dr qk_rope_head_dim, dv v_head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tilemem.config import ModelConfig
from tilemem.kernels import bf16 as bf16_kernels
from tilemem.kernels.paged import paged_attention
from tilemem.layers.kv_cache import ForwardContext
from tilemem.layers.linear import SLOW_HALF_GEMM, Linear
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
        self.portable = False
        """The absorbed products of few rows through the portable kernel on any CPU, as `Linear.portable`."""
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

    def absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's per-head blocks W_UK [H, dn, R] and W_UV [H, dv, R] in the compute dtype: views of the weight
        when it is a plain matrix, else decoded once (FP8, GGUF blocks: the decode step reads them every token)."""
        w = self.kv_b_proj.weight
        key = (w.data_ptr(), w.dtype, w.device)
        if getattr(self, "_absorbed_key", None) != key:
            m = self.kv_b_proj.matrix
            dense = m if isinstance(m, torch.Tensor) else m.dequantize().to(self.kv_a_layernorm.weight.dtype)
            per_head = dense.view(self.h, self.dn + self.dv, self.rank)  # [H, dn+dv, R]
            self._absorbed_w = per_head[:, : self.dn], per_head[:, self.dn :]
            self._absorbed_key = key
        return self._absorbed_w

    def forward(
        self,
        x: torch.Tensor,
        ctx: ForwardContext,
        rope: RotaryEmbedding,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D], writing this layer's new latents into the cache."""
        b, t, _ = x.shape
        if self.q_lora:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # [B, T, H*(dn+dr)]
        else:
            q = self.q_proj(x)  # [B, T, H*(dn+dr)]
        q = q.view(b, t, self.h, self.dn + self.dr).transpose(1, 2)  # [B, H, T, dn+dr]
        q_nope, q_rope = q.split([self.dn, self.dr], dim=-1)  # [B, H, T, dn], [B, H, T, dr]

        compressed = self.kv_a_proj_with_mqa(x)  # [B, T, R+dr]
        latent, k_rope = compressed.split([self.rank, self.dr], dim=-1)  # [B, T, R], [B, T, dr]
        k_rope = k_rope.reshape(b, 1, t, self.dr)  # [B, 1, T, dr], shared by all heads
        q_rope, k_rope = rope.apply(q_rope, cos, sin), rope.apply(k_rope, cos, sin)
        entry = torch.cat([self.kv_a_layernorm(latent).unsqueeze(1), k_rope], dim=-1)  # [B, 1, T, R+dr]
        pool = ctx.cache.keys[self.layer]  # [N, 1, bs, R+dr]
        ctx.write(pool, entry.to(pool.dtype))
        if t == 1 or ctx.sparse_select is not None:  # decode, or DSA's top-k: attend in the latent space
            return self._latent(q_nope, q_rope, ctx, pool)
        cached = ctx.read(pool)  # [B, 1, L, R+dr]
        L = cached.shape[2]
        c, kr = cached[:, 0].split([self.rank, self.dr], dim=-1)  # [B, L, R], [B, L, dr]
        kv = self.kv_b_proj(c).view(b, L, self.h, self.dn + self.dv).transpose(1, 2)  # [B, H, L, dn+dv]
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)  # [B, H, L, dn], [B, H, L, dv]
        keys = torch.cat([k_nope, kr.unsqueeze(1).expand(b, self.h, L, self.dr)], dim=-1)  # [B, H, L, dn+dr]
        q = torch.cat([q_nope, q_rope], dim=-1)  # [B, H, T, dn+dr]
        # -> [B, H, T, dv]; keys are dn+dr wide, values dv wide (SDPA allows the widths to differ).
        o = F.scaled_dot_product_attention(q, keys, v, attn_mask=ctx.attn_mask, is_causal=ctx.causal, scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.h * self.dv))

    def _latent(self, q_nope: torch.Tensor, q_rope: torch.Tensor, ctx: ForwardContext, pool: torch.Tensor):
        """Attention in the latent space, each query token a row of the paged kernel (its row's block table, its
        position + 1 keys, or the DSA indexer's top-k `ctx.sparse_select`): q_nope [B, H, T, dn], q_rope
        [B, H, T, dr] -> [B, T, D]. Reads the cache in place: a decode step, and a DSA prefill, cost K (or L)
        latent rows per query, never an expansion of the whole cache."""
        b, _, t, _ = q_nope.shape
        w_uk, w_uv = self.absorbed()  # [H, dn, R], [H, dv, R]
        q_n = q_nope.permute(1, 0, 2, 3).reshape(self.h, b * t, self.dn)  # [H, B*T, dn]
        # a few bf16 rows where torch's bf16 GEMM is slow: per head through the portable kernel (as the one-call
        # decode layers compute them, `kernels.portable_decode`)
        few = q_nope.dtype == torch.bfloat16 and q_nope.device.type == "cpu" and b * t <= bf16_kernels.MAX_ROWS
        slow = SLOW_HALF_GEMM[torch.bfloat16] or self.portable
        few = few and w_uk.dtype == torch.bfloat16 and slow and bf16_kernels.available()
        if few:
            heads = [bf16_kernels.matmul_nn(q_n[i].float(), w_uk[i]) for i in range(self.h)]  # H x [B*T, R]
            q_lat = torch.stack(heads).to(q_nope.dtype)  # [H, B*T, R]
        else:
            q_lat = torch.bmm(q_n, w_uk.to(q_nope.dtype))  # [H, B*T, R]
        q_r = q_rope.permute(0, 2, 1, 3).reshape(b * t, self.h, self.dr)  # [B*T, H, dr]
        q_full = torch.cat([q_lat.transpose(0, 1), q_r], dim=-1)  # [B*T, H, R+dr]
        tables = ctx.tables.repeat_interleave(t, dim=0) if t > 1 else ctx.tables  # [B*T, M]
        lengths = (ctx.positions + 1).reshape(b * t)  # [B*T]
        select = None if ctx.sparse_select is None else ctx.sparse_select.reshape(b * t, -1)  # [B*T, K]
        q_full = q_full.to(pool.dtype).contiguous()
        if pool.device.type == "cpu":
            o_lat = paged_attention(q_full, pool, pool[..., : self.rank], tables, lengths, self.scale, select)
        else:
            o_lat = self._latent_gathered(q_full, pool, tables, lengths, select)  # [B*T, H, R]
        if few and o_lat.dtype == torch.bfloat16:
            heads = [bf16_kernels.matmul_nt(o_lat[:, i].float(), w_uv[i]) for i in range(self.h)]  # H x [B*T, dv]
            o = torch.stack(heads).to(q_nope.dtype)  # [H, B*T, dv]
        else:
            o = torch.bmm(o_lat.to(q_nope.dtype).transpose(0, 1), w_uv.to(q_nope.dtype).transpose(1, 2))  # [H, B*T, dv]
        return self.o_proj(o.transpose(0, 1).reshape(b, t, self.h * self.dv))

    def _latent_gathered(
        self,
        q: torch.Tensor,
        pool: torch.Tensor,
        tables: torch.Tensor,
        lengths: torch.Tensor,
        select: torch.Tensor | None,
    ) -> torch.Tensor:
        """`_latent`'s attention with torch ops on any device (a GPU: the paged kernel is CPU code): q [R, H, R+dr]
        against each row's positions (or its `select`ed ones) gathered from the pool -> [R, H, kv_lora_rank]."""
        bs = pool.shape[2]
        flat = pool.view(-1, pool.shape[-1])  # [N*bs, R+dr]
        if select is None:
            select = torch.arange(int(lengths.max()), device=q.device).expand(q.shape[0], -1)  # [R, L]
            select = select.masked_fill(select >= lengths.unsqueeze(1), -1)
        pos = select.clamp_min(0)  # [R, K]
        rows = tables.gather(1, pos // bs) * bs + pos % bs  # [R, K] flat index of each position
        kv = flat[rows]  # [R, K, R+dr]
        scores = torch.einsum("rhd,rkd->rhk", q.float(), kv.float()) * self.scale  # [R, H, K]
        scores = scores.masked_fill((select < 0).unsqueeze(1), float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with nothing to attend: zeros
        return torch.einsum("rhk,rkd->rhd", probs, kv[..., : self.rank].float()).to(q.dtype)  # [R, H, R]
