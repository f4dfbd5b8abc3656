"""The decoder-only MoE language model every family builds (families differ only in config and
checkpoint names). Modules mirror the hub's dotted names so each weight knows its checkpoint name.

Shape legend: B batch rows, T new tokens per row, D hidden, V vocab.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from tilemem.config import ModelConfig
from tilemem.layers.attention import Attention
from tilemem.layers.kv_cache import ForwardContext, KVCache
from tilemem.layers.linear import Linear
from tilemem.layers.mlp import GatedMLP
from tilemem.layers.moe import MoEBlock, ResidentExperts
from tilemem.layers.norm import RMSNorm
from tilemem.layers.rope import RotaryEmbedding

if TYPE_CHECKING:
    from tilemem.models.mtp import MTPHead


def make_attention(cfg: ModelConfig, layer: int) -> nn.Module:
    """GQA attention, multi-head latent attention for DeepSeek-style configs, or MLA with a top-k
    indexer (DeepSeek sparse attention) for DeepSeek-V3.2 / GLM-5."""
    if cfg.is_dsa:
        from tilemem.layers.dsa import DSAttention

        return DSAttention(cfg, layer)
    if cfg.is_mla:
        from tilemem.layers.mla import MLAttention

        return MLAttention(cfg, layer)
    return Attention(cfg, layer)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + ffn(norm(h)) with a MoE or dense FFN."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = make_attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer):
            self.mlp: nn.Module = MoEBlock(cfg, layer)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, ctx, rope, cos, sin) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, rope, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, decoder layers and the final norm (hub prefix `model.`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device="meta")
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MoECausalLM(nn.Module):
    """A MoE causal LM. Build on `meta`, then `tilemem.loader` assigns memory-mapped weights.

    With `cfg.num_mtp_layers`, `mtp` holds the multi-token-prediction head (`tilemem.models.mtp`);
    else it is None."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False)
        self.mtp: MTPHead | None = None
        if cfg.num_mtp_layers:
            from tilemem.models.mtp import MTPHead

            self.mtp = MTPHead(cfg)
        self.rope: RotaryEmbedding | None = None

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the loaded weights."""
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the non-expert weights live and activations flow (`cpu` or a CUDA device)."""
        return self.model.embed_tokens.weight.device

    def moe_blocks(self) -> dict[int, MoEBlock]:
        """MoE blocks by layer index."""
        return {i: l.mlp for i, l in enumerate(self.model.layers) if isinstance(l.mlp, MoEBlock)}

    def finish_loading(self, max_positions: int) -> None:
        """Create non-checkpoint state (rope tables, resident expert executor) after weights load."""
        cfg = self.cfg
        rope_dim = cfg.qk_rope_head_dim if cfg.is_mla else cfg.head_dim
        self.rope = RotaryEmbedding(cfg.rope, rope_dim, max_positions)
        self.set_executor(ResidentExperts(self.moe_blocks()))
        if self.mtp is not None:
            self.mtp.finish_loading(self.model.embed_tokens, self.lm_head, self.rope)

    def set_executor(self, executor) -> None:
        """Route every MoE block's expert computation through `executor`."""
        for block in self.moe_blocks().values():
            block.executor = executor

    def always_active_ffns(self) -> dict[tuple[int, int], GatedMLP]:
        """(layer, SHARED | DENSE) -> the shared-expert or dense FFN module of the decoder layers."""
        from tilemem.placement.tiles import DENSE, SHARED

        out = {}
        for i, layer in enumerate(self.model.layers):
            if isinstance(layer.mlp, GatedMLP):
                out[(i, DENSE)] = layer.mlp
            elif layer.mlp.shared_experts is not None:
                out[(i, SHARED)] = layer.mlp.shared_experts
        return out

    def kv_shape(self) -> tuple[int, int, int]:
        """(heads, key width, value width) one layer caches per position."""
        cfg = self.cfg
        if cfg.is_mla:
            return cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        return cfg.num_kv_heads, cfg.head_dim, cfg.head_dim

    def allocate_cache(self, slots: int, length: int) -> KVCache:
        """A KV cache for `slots` sequences of up to `length` tokens: one layer per decoder layer, then
        one per MTP layer (when loaded), plus indexer keys for DSA layers."""
        cfg = self.cfg
        heads, kd, vd = self.kv_shape()
        layers = cfg.num_layers + (len(self.mtp.layers) if self.mtp is not None else 0)
        index_dim = cfg.index_head_dim if cfg.is_dsa else 0
        index_layers = [i for i in range(layers) if cfg.has_indexer(i)]
        return KVCache.allocate(layers, slots, length, heads, kd, vd, self.dtype, index_dim, index_layers, self.device)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        ctx: ForwardContext,
        logits_at: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, T] -> logits [B, T, V] (or [B, V] at `logits_at` [B] token offsets).

        With `return_hidden`, also the final-normed hidden states [B, T, D] of every token (what the
        MTP head reads): (logits, hidden). Inputs may live on the CPU; outputs are on `self.device`."""
        input_ids = input_ids.to(self.device)
        x = self.model.embed_tokens(input_ids)  # [B, T, D]
        cos, sin = self.rope.table(ctx.positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, ctx, self.rope, cos, sin)
        hidden = self.model.norm(x) if return_hidden else None  # [B, T, D]
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at.to(x.device)]  # [B, D]
        logits = self.lm_head(self.model.norm(x)).float()
        return (logits, hidden) if return_hidden else logits
