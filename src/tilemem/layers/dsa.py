"""DeepSeek sparse attention (DSA: DeepSeek-V3.2, GLM-5): MLA whose keys are chosen per query by a
lightning indexer.

The indexer scores every cached position for every query,
    score[b, t, l] = sum_h w[b, t, h] * relu(q[b, t, h] . k[b, l]) / sqrt(Di * Hi),
with its own low-width queries (from MLA's q LoRA latent), one shared key per position (cached beside
MLA's keys) and per-head weights; each query then attends only its top `index_topk` causal keys.
GLM-MoE-DSA layers listed in `index_shared_layers` run no indexer and reuse the previous layer's
selection. Like transformers, we leave out the reference kernels' Hadamard rotation (it preserves dot
products) and FP8 scoring (a precision optimization).

Shape legend: B batch rows, T new tokens, L cached positions (kv_len), D hidden, Q q_lora_rank,
Hi indexer heads, Di indexer width, dr qk_rope_head_dim.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from tilemem.config import ModelConfig
from tilemem.errors import ConfigError
from tilemem.kernels import paged_index
from tilemem.layers.kv_cache import ForwardContext
from tilemem.layers.linear import Linear
from tilemem.layers.mla import MLAttention
from tilemem.layers.rope import RotaryEmbedding

INDEXER_NORM_EPS = 1e-6
"""The indexer's key LayerNorm uses the LayerNorm default eps whatever rms_norm_eps is."""


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [B, H, T, dr] by cos/sin [B, 1, T, dr]: halves, or interleaved pairs (output in halves
    layout, as transformers does; q and k are permuted alike, so q.k is unchanged)."""
    if interleave:
        b, h, t, d = x.shape
        x = x.view(b, h, t, d // 2, 2).transpose(4, 3).reshape(b, h, t, d)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Indexer(nn.Module):
    """The lightning indexer (hub names `wq_b`, `wk`, `k_norm`, `weights_proj`).

    A decode step on the CPU scores its paged keys in place with the native `kernels.paged_index` (the same
    math); other passes, and where the library cannot run, gather the cached keys and score them with torch.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.h, self.d, self.dr = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.interleave = cfg.index_rope_interleave
        self.wq_b = Linear(cfg.q_lora_rank, self.h * self.d, False)
        self.wk = Linear(cfg.hidden_size, self.d, False)
        self.k_norm = nn.LayerNorm(self.d, eps=INDEXER_NORM_EPS, device="meta")
        self.weights_proj = Linear(cfg.hidden_size, self.h, False)
        self.scale = self.d**-0.5

    def forward(
        self, x: torch.Tensor, q_latent: torch.Tensor, ctx: ForwardContext, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """x [B, T, D], q_latent [B, T, Q] -> (keep [B, 1, T, L]: True at each query's top-k causal keys, their
        positions [B, T, K] (-1: none), or None when every causal key is kept)."""
        b, t, _ = x.shape
        q = self.wq_b(q_latent).view(b, t, self.h, self.d).transpose(1, 2)  # [B, Hi, T, Di]
        k = self.k_norm(self.wk(x)).unsqueeze(1)  # [B, 1, T, Di]
        q_rot, q_pass = q.split([self.dr, self.d - self.dr], dim=-1)
        k_rot, k_pass = k.split([self.dr, self.d - self.dr], dim=-1)
        q = torch.cat([rotate(q_rot, cos, sin, self.interleave), q_pass], dim=-1).transpose(1, 2)  # [B, T, Hi, Di]
        k = torch.cat([rotate(k_rot, cos, sin, self.interleave), k_pass], dim=-1)[:, 0]  # [B, T, Di]
        pool = ctx.cache.index_keys[self.layer] if self.layer < len(ctx.cache.index_keys) else None
        if t == 1 and pool is not None and pool.is_cpu and paged_index.available():
            # Decode: score the paged keys in place (the same math, natively) instead of gathering all of them.
            ctx.write(pool, k.unsqueeze(1))
            if ctx.kv_len <= self.topk:  # every causal key makes the top-k: skip the scoring
                return ctx.mask, None
            weights = F.linear(x[:, 0].float(), self.weights_proj.weight.float()) * self.h**-0.5  # [B, Hi]
            index = paged_index.paged_index_scores(q[:, 0], weights, pool, ctx.tables, ctx.lengths, self.scale)
            index = index.unsqueeze(1)  # [B, 1, L]
        else:
            keys = ctx.store_index(self.layer, k)  # [B, L, Di]
            if ctx.kv_len <= self.topk:  # every causal key makes the top-k: skip the scoring
                return ctx.mask, None
            # Same op order as transformers (fp32 scores; weights_proj in fp32 whatever the model dtype).
            scores = torch.matmul(q.float(), keys.transpose(-1, -2).float().unsqueeze(1)) * self.scale  # [B, T, Hi, L]
            scores = F.relu(scores)
            weights = F.linear(x.float(), self.weights_proj.weight.float()) * self.h**-0.5  # [B, T, Hi]
            index = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)  # [B, T, L]
        causal = ctx.mask[:, 0]  # [B, T, L]
        index = index.masked_fill(~causal, float("-inf"))
        best = index.topk(min(self.topk, index.shape[-1]), dim=-1)  # [B, T, K]
        top = best.indices
        keep = torch.zeros_like(causal).scatter_(-1, top, True)  # [B, T, L]
        return (keep & causal).unsqueeze(1), top.masked_fill(best.values == float("-inf"), -1)


class DSAttention(MLAttention):
    """MLA (hub names unchanged) plus `indexer`, attending only the keys the indexer keeps.

    MLA computes the q LoRA latent inside its forward; the indexer needs it too, so it is computed once
    more here (q_a_proj is a few percent of the attention FLOPs) rather than forking MLA's code.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        if not self.q_lora:
            raise ConfigError(
                f"{cfg.architecture}: DeepSeek sparse attention needs q_lora_rank > 0 (the indexer reads the "
                "query latent); fix q_lora_rank in config.json."
            )
        self.indexer = Indexer(cfg, layer) if cfg.has_indexer(layer) else None

    def forward(
        self,
        x: torch.Tensor,
        ctx: ForwardContext,
        rope: RotaryEmbedding,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; also writes this layer's indexer keys and sets ctx.sparse_mask."""
        if self.indexer is not None:
            q_latent = self.q_a_layernorm(self.q_a_proj(x))  # [B, T, Q]
            keep, top = self.indexer(x, q_latent, ctx, cos, sin)  # [B, 1, T, L], [B, T, K] | None
            ctx.sparse_mask = ctx.mask & keep
            ctx.sparse_select = top  # [B, T, K] | None: the latent attention reads only these positions
        elif ctx.sparse_mask is None:
            raise ValueError(f"layer {self.layer} shares top-k keys, but no earlier layer of this pass ran an indexer")
        # Same cache, positions and slots; only the attention mask narrows to the kept keys.
        return super().forward(x, replace(ctx, mask=ctx.sparse_mask, causal=False), rope, cos, sin)
