"""The decoder-only MoE language model every family builds (families differ only in config and
checkpoint names). Modules mirror the hub's dotted names so each weight knows its checkpoint name.

Shape legend: B batch rows, T new tokens per row, D hidden, V vocab.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from tilemem import kernels
from tilemem.config import ModelConfig
from tilemem.layers.attention import Attention
from tilemem.layers.kv_cache import ForwardContext, KVCache
from tilemem.layers.linear import Linear
from tilemem.layers.mlp import GatedMLP
from tilemem.layers.moe import MoEBlock, ResidentExperts
from tilemem.layers.norm import RMSNorm
from tilemem.layers.rope import RotaryEmbedding
from tilemem.models.topology import DENSE, SHARED

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
        self.layer = layer
        # The fused native decode step covers softmax top-k routing over the routed experts alone.
        self._fusable = (
            isinstance(self.self_attn, Attention)
            and isinstance(self.mlp, MoEBlock)
            and self.mlp.shared_experts is None
            and (cfg.scoring_func, cfg.topk_method, cfg.router_fp32, cfg.router_bias)
            == ("softmax", "greedy", False, False)
        )
        self._native: kernels.DecodeLayer | None = None
        self._native_key: tuple = ()
        self._native_sources: tuple = ()

    def forward(self, x, ctx, rope, cos, sin, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; with `keep` [B] token offsets, [B, 1, D]: every token's keys and
        values still go to the cache, but the rest of the layer (queries and o projection where the
        attention is `Attention`, the FFN always) runs for the kept token of each row only: the last
        layer, where nothing else reads the other tokens' outputs."""
        if keep is None:
            x = x + self.self_attn(self.input_layernorm(x), ctx, rope, cos, sin)
        else:
            rows, keep = torch.arange(x.shape[0], device=x.device), keep.to(x.device)
            if isinstance(self.self_attn, Attention):
                x = x[rows, keep].unsqueeze(1) + self.self_attn(self.input_layernorm(x), ctx, rope, cos, sin, keep)
            else:
                x = (x + self.self_attn(self.input_layernorm(x), ctx, rope, cos, sin))[rows, keep].unsqueeze(1)
        return x + self.mlp(self.post_attention_layernorm(x))

    def native_decode(self, x: torch.Tensor, ctx: ForwardContext, rope: RotaryEmbedding) -> kernels.DecodeLayer | None:
        """The layer for the fused native decode step (the whole layer in one kernel call), or None where
        the modules run: not bf16 on the CPU, not a softmax-routed MoE layer over the resident experts
        (shared experts, group-limited or sigmoid routing, a tiered executor), or attention the
        decode kernel does not cover."""
        if not self._fusable or rope.interleave or not kernels.usable(x):
            return None
        attn, mlp = self.self_attn, self.mlp
        if ctx.cache.keys[self.layer].dtype != torch.bfloat16 or not isinstance(mlp.executor, ResidentExperts):
            return None
        if (attn_layer := attn.native()) is None or (table := mlp.executor.table(self.layer)) is None:
            return None
        norms = (self.input_layernorm.weight, self.post_attention_layernorm.weight, mlp.gate.weight)
        key = (id(attn_layer), id(table), rope.fp32_rotate, *(t.data_ptr() for t in norms))
        if self._native is not None and key == self._native_key:
            return self._native
        if any(t.dtype != torch.bfloat16 or not t.is_contiguous() for t in norms):
            return None
        cfg = mlp.gate.cfg
        attn_layer.fp32_rotate = int(rope.fp32_rotate)  # x is bf16: cos/sin are fp32 only for fp32 rotation
        self._native = kernels.DecodeLayer(
            attn_layer, *(t.data_ptr() for t in norms[:2]), self.input_layernorm.eps, norms[2].data_ptr(),
            table.gate.data_ptr(), table.up.data_ptr(), table.down.data_ptr(), cfg.num_experts, cfg.top_k,
            table.intermediate, kernels.ACTS[mlp.act_name], cfg.norm_topk_prob, cfg.router_weights_in_model_dtype,
            cfg.routed_scaling_factor, *table.codec_ptrs,
        )  # fmt: skip
        self._native_key = key
        self._native_sources = (attn_layer, table)  # alive while keyed by their ids
        return self._native


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
        self.fused_decode = True
        """Run decode steps' softmax-routed MoE layers as one native call (`DecoderLayer.native_decode`);
        False runs every layer as modules (the same result, for comparisons)."""
        self._stack: tuple | None = None  # (key, DecodeStack, weak ref to the cache) of the last native run
        self._ws = kernels.Workspace()

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

    def prepare_weights(self, codec: str = "x12", progress: bool = True) -> None:
        """Store the weights a decode step streams in `codec` now: "x12" (12 bits per weight, losslessly;
        see `kernels.X12Matrix`) for the resident experts and, where the experts are, the attention
        projections and the LM head; "none" keeps bf16 as loaded. Only bf16 weights mapped from the
        checkpoint on the CPU with the native kernels change (their file pages are let go); nothing
        changes for a tiered executor, which reads its experts from the tile store."""
        executor = next((b.executor for b in self.moe_blocks().values()), None)
        if not isinstance(executor, ResidentExperts):
            return
        executor.compress = codec == "x12"
        if executor.compress_all(progress) and codec == "x12":
            for m in self._x12_linears():
                m.compress()

    def _x12_linears(self) -> list[Linear]:
        """The Linears besides the routed experts that x12 stores: GQA attention's projections, the LM head."""
        attn = [layer.self_attn for layer in self.model.layers if isinstance(layer.self_attn, Attention)]
        return [*(p for a in attn for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)), self.lm_head]

    def x12_weight_names(self) -> set[str]:
        """Our names of the weights `prepare_weights("x12")` encodes (the routed experts' too)."""
        experts = [m for b in self.moe_blocks().values() for m in b.experts.modules() if isinstance(m, Linear)]
        chosen = {id(m) for m in (*experts, *self._x12_linears())}
        return {f"{name}.weight" for name, m in self.named_modules() if id(m) in chosen}

    def set_executor(self, executor) -> None:
        """Route every MoE block's expert computation through `executor`."""
        for block in self.moe_blocks().values():
            block.executor = executor

    def always_active_ffns(self) -> dict[tuple[int, int], GatedMLP]:
        """(layer, SHARED | DENSE) -> the shared-expert or dense FFN module of the decoder layers."""
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

    def _native_run(self, first: int, x: torch.Tensor, ctx: ForwardContext) -> list[kernels.DecodeLayer]:
        """The fused decode layers (`DecoderLayer.native_decode`) from layer `first` up to the first one
        that must run as modules."""
        run = []
        for layer in self.model.layers[first:]:
            if (native := layer.native_decode(x, ctx, self.rope)) is None:
                break
            run.append(native)
        return run

    def _decode_native(self, first: int, run: list[kernels.DecodeLayer], x, ctx, cos, sin) -> torch.Tensor:
        """Layers first .. first + len(run) - 1 of a decode step in one native call; the routed ids go to
        each MoE block's `on_route` observer as the module path would send them."""
        layers = range(first, first + len(run))
        key = (first, *(id(n) for n in run))  # the stack holds these alive, so the ids stay theirs
        # The cache by weak reference: a stack must not keep a replaced KV cache's memory alive.
        if self._stack is None or self._stack[0] != key or self._stack[2]() is not ctx.cache:
            keys, values = ctx.cache.keys, ctx.cache.values
            stack = kernels.DecodeStack(run, [keys[i] for i in layers], [values[i] for i in layers])
            self._stack = (key, stack, weakref.ref(ctx.cache))
        stack = self._stack[1]
        b = x.shape[0]
        y = x.reshape(b, -1).clone()  # the residual stream, updated in place by the kernel
        ids = kernels.decode_layers(
            stack, y, cos.reshape(b, -1), sin.reshape(b, -1), ctx.slots, ctx.positions[:, 0].contiguous(),
            self._ws,
        )  # fmt: skip
        for j, i in enumerate(layers):
            if (observer := self.model.layers[i].mlp.on_route) is not None:
                observer(i, ids[j])
        return y.view(b, 1, -1)

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
        layers = self.model.layers
        # Only the logits rows are read (no MTP head wants every token's hidden state): the last layer's
        # queries and FFN, a 1/num_layers share of a prefill, run on those tokens alone.
        keep = logits_at if logits_at is not None and not return_hidden and x.shape[1] > 1 else None
        i = 0
        while i < len(layers):
            run = self._native_run(i, x, ctx) if self.fused_decode and x.shape[1] == 1 else []
            if run:  # decode: consecutive fused layers in one native call
                x = self._decode_native(i, run, x, ctx, cos, sin)
                i += len(run)
            else:
                x = layers[i](x, ctx, self.rope, cos, sin, keep if i == len(layers) - 1 else None)
                i += 1
        hidden = self.model.norm(x) if return_hidden else None  # [B, T, D]
        if keep is not None:
            x = x[:, 0]  # [B, D]
        elif logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at.to(x.device)]  # [B, D]
        logits = self.lm_head(self.model.norm(x)).float()
        return (logits, hidden) if return_hidden else logits
