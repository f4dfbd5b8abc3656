"""Multi-token prediction (MTP) head, DeepSeek-V3 style (DeepSeek-V3/V3.2, GLM-4.5/5 checkpoints).

MTP layer i predicts one token further ahead than the model it follows. For a position with hidden
state h (the main model's final-normed output, or the previous MTP depth's output) and the token
that follows it:
    h' = block(eh_proj(cat(enorm(embed(next_token)), hnorm(h))))
    logits = shared_head.head(shared_head.norm(h'))
`block` is a full decoder layer (attention with its own KV cache rows, MoE FFN). transformers drops
these weights; we load them when the checkpoint has them.

Hub layout: MTP layer i is `model.layers.{N + i}` (N = num_hidden_layers) with `enorm`, `hnorm`,
`eh_proj`, `shared_head.norm`, optionally `embed_tokens` and `shared_head.head` (else the main
model's are used), and the decoder block's usual names. Ours: `mtp.layers.{i}.*`; its KV cache layer
is N + i.

Shape legend: B batch rows, T tokens, D hidden, V vocab, K draft tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from tilemem.config import ModelConfig
from tilemem.layers.kv_cache import ForwardContext
from tilemem.layers.linear import Linear
from tilemem.layers.moe import MoEBlock, ResidentExperts
from tilemem.layers.norm import RMSNorm
from tilemem.layers.rope import RotaryEmbedding
from tilemem.models.model import DecoderLayer

OUR_PREFIX = "mtp.layers."
"""Our module-name prefix of MTP layers."""
MTP_OWN_NAMES = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")
"""Tensors every MTP layer has besides its decoder block."""
_HUB_LAYER = re.compile(r"model\.layers\.(\d+)\.(.*)")
_OUR_LAYER = re.compile(re.escape(OUR_PREFIX) + r"(\d+)\.(.*)")


def hub_mtp_layer(hub_name: str, cfg: ModelConfig) -> int | None:
    """The MTP layer index i of a hub tensor `model.layers.{N + i}.*` (any i >= 0), else None."""
    m = _HUB_LAYER.fullmatch(hub_name)
    return int(m[1]) - cfg.num_layers if m and int(m[1]) >= cfg.num_layers else None


def hub_to_ours(hub_name: str, cfg: ModelConfig) -> str:
    """`model.layers.{N + i}.x` -> `mtp.layers.{i}.x` when the config declares MTP layers."""
    i = hub_mtp_layer(hub_name, cfg) if cfg.num_mtp_layers else None
    return hub_name if i is None else f"{OUR_PREFIX}{i}.{_HUB_LAYER.fullmatch(hub_name)[2]}"


def ours_to_hub(our_name: str, cfg: ModelConfig) -> str:
    """`mtp.layers.{i}.x` -> `model.layers.{N + i}.x`; other names unchanged."""
    m = _OUR_LAYER.fullmatch(our_name)
    return f"model.layers.{cfg.num_layers + int(m[1])}.{m[2]}" if m else our_name


def is_mtp_name(our_name: str) -> bool:
    """Whether one of our module names belongs to the MTP head."""
    return our_name.startswith(OUR_PREFIX)


class SharedHead(nn.Module):
    """`shared_head`: the final norm and, when the checkpoint stores one, an LM head of its own."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size, False) if cfg.mtp_own_head else None


class MTPLayer(DecoderLayer):
    """One MTP depth: a decoder block (layer index N + i) plus its input projection and output head."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * d, d, False)
        self.shared_head = SharedHead(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d, device="meta") if cfg.mtp_own_embed else None


@dataclass(frozen=True)
class MainParts:
    """The main model's modules an MTP head borrows (held by reference, not registered as children)."""

    embed: nn.Embedding
    lm_head: nn.Linear
    rope: RotaryEmbedding


class MTPHead(nn.Module):
    """`num_mtp_layers` MTP layers; `forward` runs one depth, `draft` proposes tokens greedily."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(MTPLayer(cfg, cfg.num_layers + i) for i in range(cfg.num_mtp_layers))
        self.main: MainParts | None = None

    def moe_blocks(self) -> dict[int, MoEBlock]:
        """MoE blocks by (KV cache) layer index N + i."""
        return {layer.mlp.layer: layer.mlp for layer in self.layers if isinstance(layer.mlp, MoEBlock)}

    def finish_loading(self, embed: nn.Embedding, lm_head: nn.Linear, rope: RotaryEmbedding) -> None:
        """Borrow the main model's embedding, LM head and rope; run experts from resident weights
        (MTP weights are non-expert weights for placement: they always stay resident)."""
        self.main = MainParts(embed, lm_head, rope)
        executor = ResidentExperts(self.moe_blocks())
        for block in self.moe_blocks().values():
            block.executor = executor

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        ctx: ForwardContext,
        depth: int = 0,
        logits_at: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP depth over a batch: (logits [B, T, V] fp32 (or [B, V] at `logits_at`), h' [B, T, D]).

        hidden [B, T, D]: states of the tokens at ctx.positions (the main model's
        `forward(..., return_hidden=True)` output, or h' of the previous call); next_ids [B, T]: the
        token that follows each of them. Writes KV cache layer N + depth at ctx.positions, so ctx is
        the main model's context for those tokens (same slots and positions)."""
        main = self.main
        if main is None:
            raise RuntimeError("the MTP head is not loaded; load it with tilemem.loader.load_model")
        layer = self.layers[depth]
        embed = layer.embed_tokens if layer.embed_tokens is not None else main.embed
        head = layer.shared_head.head if layer.shared_head.head is not None else main.lm_head
        e = layer.enorm(embed(next_ids.to(hidden.device)))  # [B, T, D]
        x = layer.eh_proj(torch.cat([e, layer.hnorm(hidden.to(e.dtype))], dim=-1))  # [B, T, D]
        cos, sin = main.rope.table(ctx.positions, x.dtype)
        x = layer(x, ctx, main.rope, cos, sin)  # [B, T, D]
        out = x if logits_at is None else x[torch.arange(x.shape[0], device=x.device), logits_at.to(x.device)]
        return head(layer.shared_head.norm(out)).float(), x

    @torch.inference_mode()
    def draft(self, hidden: torch.Tensor, next_ids: torch.Tensor, ctx: ForwardContext, k: int) -> torch.Tensor:
        """Greedy draft of k tokens per row -> [B, K].

        hidden [B, T, D], next_ids [B, T], ctx: as in `forward` (the main model's last pass, its
        sampled tokens shifted in, so the last valid next_id of each row is the token just sampled).
        Draft j >= 1 feeds h' and draft j - 1 back through depth 0 at the next position (vLLM's
        recursion), writing MTP cache rows that the next verified pass overwrites."""
        b = hidden.shape[0]
        rows = torch.arange(b, device=hidden.device)
        last = ctx.valid.sum(dim=1) - 1  # [B]
        logits, h = self(hidden, next_ids, ctx, logits_at=last)  # [B, V], [B, T, D]
        h = h[rows, last]  # [B, D]
        pos = ctx.positions[rows, last]  # [B]
        tokens = [logits.argmax(dim=-1)]
        for j in range(1, k):
            step = ctx.at((pos + j).tolist(), [1] * b)
            logits, h = self(h.unsqueeze(1), tokens[-1].unsqueeze(1), step)  # [B, 1, V], [B, 1, D]
            h = h[:, 0]
            tokens.append(logits[:, 0].argmax(dim=-1))
        return torch.stack(tokens, dim=1)
