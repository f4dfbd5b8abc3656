"""The decoder-only MoE language model every family builds (families differ only in config and
checkpoint names). Modules mirror the hub's dotted names so each weight knows its checkpoint name.

Shape legend: B batch rows, T new tokens per row, D hidden, V vocab.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from tilemem import kernels
from tilemem.config import ModelConfig
from tilemem.kernels.portable_decode import MAX_ROWS, PortableDecode
from tilemem.layers.attention import Attention
from tilemem.layers.fp8 import FP8
from tilemem.layers.kv_cache import ForwardContext, KVCache
from tilemem.layers.linear import Embedding, Linear, gemm
from tilemem.layers.mlp import GatedMLP
from tilemem.layers.moe import MoEBlock, ResidentExperts
from tilemem.layers.norm import RMSNorm
from tilemem.layers.rope import RotaryEmbedding
from tilemem.models import portable_decode
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

    def native_decode(self, rope: RotaryEmbedding) -> kernels.DecodeLayer | None:
        """The layer for the fused native decode step (the whole layer in one kernel call), or None where
        the modules run: not a softmax-routed MoE layer over the resident experts (shared experts,
        group-limited or sigmoid routing, a tiered executor), or attention the decode kernel does not cover."""
        attn, mlp = self.self_attn, self.mlp
        if not self._fusable or rope.interleave or not isinstance(mlp.executor, ResidentExperts):
            return None
        if (attn_layer := attn.native()) is None or (table := mlp.executor.table(self.layer)) is None:
            return None
        cfg, norms = mlp.gate.cfg, (self.input_layernorm.weight, self.post_attention_layernorm.weight)
        return kernels.decode_layer(
            attn_layer, norms, self.input_layernorm.eps, mlp.gate.weight, table, mlp.act_name, cfg.num_experts,
            cfg.top_k, cfg.norm_topk_prob, cfg.router_weights_in_model_dtype, cfg.routed_scaling_factor,
            rope.fp32_rotate,
        )  # fmt: skip


class Backbone(nn.Module):
    """Embeddings, decoder layers and the final norm (hub prefix `model.`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
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
        self.head_split = None
        """Expert parallelism (`parallel.RankGroup`): every rank computes its share of the LM head's vocabulary
        columns and rank 0 gathers the logits, instead of rank 0 computing them all while the others wait."""
        self.fused_decode = True
        """Run decode steps' softmax-routed MoE layers as one native call (`DecoderLayer.native_decode` with the
        AVX512 library, else `models.portable_decode` on AVX2); False runs every layer as modules (the same
        result, for comparisons)."""
        self._native: kernels.NativeDecode | PortableDecode | portable_decode.Dispatch | None = None
        """The fused decode dispatch, built at the first decode step after load (`_native_decode`)."""

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the loaded weights (of the activations, for FP8 or GGUF-quantized ones)."""
        return self.model.norm.weight.dtype

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

    def portable_rows(self) -> None:
        """Mark the decoder layers' norms, router and bf16 products to compute few rows through the portable kernels
        on any CPU (`Linear.portable`): for an FP8 or GGUF model, whose decode steps go through the portable one-call
        layers also where the AVX512 library runs (it takes no such layer), so that its modules (a tiered layer, a
        step with `fused_decode` off) compute the same bits as those."""
        from tilemem.layers.mla import MLAttention
        from tilemem.layers.router import Router

        self._native = None
        for layer in self.model.layers:
            for m in layer.modules():
                if isinstance(m, Linear | RMSNorm | Router | MLAttention):
                    m.portable = True

    def prepare_weights(self, codec: str = "x12", progress: bool = True) -> None:
        """Store the weights a decode step streams in `codec` now: "x12" (12 bits per weight, losslessly;
        see `kernels.X12Matrix`) for the resident experts and, where the experts are, the attention
        projections and the LM head (an FP8 model's bf16 LM head too); "none" keeps bf16 as loaded. Only
        bf16 weights mapped from the checkpoint on the CPU with the native kernels change (their file pages
        are let go); nothing changes for a tiered executor, which reads its experts from the tile store."""
        self._native = None  # the fused decode layers point at the weights: decided again
        executor = next((b.executor for b in self.moe_blocks().values()), None)
        if not isinstance(executor, ResidentExperts):
            return
        executor.compress = codec == "x12"
        # bf16 experts encoded (their Linears with them), or FP8 experts beside bf16 Linears: an FP8 checkpoint's
        # LM head is bf16, 17% of an OLMoE FP8 decode token's bytes (x12: 13%); Linear.compress takes bf16 only
        if (executor.compress_all(progress) or executor.fp8_experts()) and codec == "x12":
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
        self._native = None  # which layers fuse depends on the executor: decided again
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
        """(heads, key width, value width) one layer caches per position: MLA caches its latent and rope key as one
        head of kv_lora_rank + qk_rope_head_dim values (`layers.mla`)."""
        cfg = self.cfg
        if cfg.is_mla:
            return 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, 0
        return cfg.num_kv_heads, cfg.head_dim, cfg.head_dim

    def allocate_cache(self, slots: int, length: int, block_size: int | None = None) -> KVCache:
        """A KV cache addressed by slot: `slots` sequences of up to `length` tokens (see `allocate_paged`)."""
        bs = block_size or length
        per = -(-length // bs)
        return self._cache(slots * per, bs, per)

    def allocate_paged(self, blocks: int, block_size: int) -> KVCache:
        """A paged KV cache of `blocks` blocks of `block_size` positions: one layer per decoder layer, then one
        per MTP layer (when loaded), plus indexer keys for DSA layers."""
        return self._cache(blocks, block_size, 1)

    def _cache(self, blocks: int, block_size: int, slot_blocks: int) -> KVCache:
        cfg = self.cfg
        heads, kd, vd = self.kv_shape()
        layers = cfg.num_layers + (len(self.mtp.layers) if self.mtp is not None else 0)
        index_dim = cfg.index_head_dim if cfg.is_dsa else 0
        index_layers = [i for i in range(layers) if cfg.has_indexer(i)]
        return KVCache.paged(
            layers, blocks, block_size, heads, kd, vd, self.dtype, index_dim, index_layers, self.device, slot_blocks
        )

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes of one KV block of `block_size` positions over every layer."""
        return self._cache(1, block_size, 1).nbytes()

    def _native_decode(self, rows: int = 1) -> kernels.NativeDecode | PortableDecode | portable_decode.Dispatch | None:
        """The fused decode dispatch for a step of `rows` rows, decided once per set of weights and executor
        (`models.portable_decode.fused_layers`): `kernels.NativeDecode` (AVX512), the portable one-call layers (AVX2,
        up to `MAX_ROWS` rows) for the layers it leaves, or both; None where neither runs this model."""
        stale = isinstance(self._native, PortableDecode | portable_decode.Dispatch) and (
            self._native.key != portable_decode.key()
        )
        if self._native is None or stale:
            self._native = portable_decode.fused_layers(self.model.layers, self.rope, self.dtype, self.device)
        if rows > MAX_ROWS and isinstance(self._native, PortableDecode | portable_decode.Dispatch):
            return self._native.native if isinstance(self._native, portable_decode.Dispatch) else None
        return self._native

    def _observe_route(self, layer: int, ids: torch.Tensor) -> None:
        """Hand a fused layer's routed ids [B, K] to its MoE block's observer, as the module path does."""
        if (observer := self.model.layers[layer].mlp.on_route) is not None:
            observer(layer, ids)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        ctx: ForwardContext,
        logits_at: torch.Tensor | None = None,
        return_hidden: bool = False,
        head: bool = True,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """input_ids [B, T] -> logits [B, T, V] (or [B, V] at `logits_at` [B] token offsets).

        With `return_hidden`, also the final-normed hidden states [B, T, D] of every token (what the
        MTP head reads): (logits, hidden). Inputs may live on the CPU; outputs are on `self.device`. `head=False`
        (the ranks that follow rank 0 in expert parallelism): the layers only, for their KV cache and their
        share of the experts; nothing is returned."""
        input_ids = input_ids.to(self.device)
        x = self.model.embed_tokens(input_ids)  # [B, T, D]
        cos, sin = self.rope.table(ctx.positions, x.dtype)
        layers = self.model.layers
        # Only the logits rows are read (no MTP head wants every token's hidden state): the last layer's
        # queries and FFN, a 1/num_layers share of a prefill, run on those tokens alone.
        keep = logits_at if logits_at is not None and not return_hidden and x.shape[1] > 1 else None
        native = self._native_decode(x.shape[0]) if self.fused_decode and x.shape[1] == 1 else None
        cache = ctx.cache
        i = 0
        while i < len(layers):
            if native is not None and (n := native.run_length(i, cache, cache.keys)):  # decode: n fused layers
                positions = ctx.positions[:, 0].contiguous()  # [B]
                x = native.forward(
                    i, x, cache, cache.keys, cache.values, ctx.tables, positions, cos, sin, self._observe_route
                )
                i += n
            else:
                x = layers[i](x, ctx, self.rope, cos, sin, keep if i == len(layers) - 1 else None)
                i += 1
        split = self.head_split if self.head_split is not None and self._splittable_head() else None
        if not head and split is None:
            return None
        hidden = self.model.norm(x) if return_hidden and head else None  # [B, T, D]
        if keep is not None:
            x = x[:, 0]  # [B, D]
        elif logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at.to(x.device)]  # [B, D]
        if split is not None:  # this rank's vocabulary columns; rank 0 gathers them all
            a, b = split.span(self.cfg.vocab_size)
            part = gemm(self.model.norm(x), self.lm_head.weight[a:b]).float()  # [B, (T,) b - a]
            logits = split.gather_columns(part, self.cfg.vocab_size)  # rank 0: [B, (T,) V]; else None
            if not head:
                return None
        else:
            logits = self.lm_head(self.model.norm(x)).float()
        return (logits, hidden) if return_hidden else logits

    def _splittable_head(self) -> bool:
        """Whether the LM head's rows can be cut by vocabulary (a plain weight, not x12, FP8 or GGUF blocks)."""
        lm = self.lm_head
        return lm.qtype is None and lm.x12 is None and lm.weight.dtype != FP8


def quantized_weight_names(model: MoECausalLM, cfg: ModelConfig) -> set[str]:
    """Our names of the weights an FP8 checkpoint of `model` quantizes: every Linear's but those whose hub
    module name ends with one of `cfg.quant_skip` (transformers' `modules_to_not_convert` rule). The loader
    keeps whatever the file holds; this is what synth writes and what plans count before loading."""
    from tilemem.models.mtp import ours_to_hub
    from tilemem.models.registry import family_by_name

    fam = family_by_name(cfg.family)
    out = set()
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            hub = fam.to_hub(ours_to_hub(f"{name}.weight", cfg)).removesuffix(".weight")
            if not any(hub.endswith(k) or hub.startswith(k + ".") for k in cfg.quant_skip):
                out.add(f"{name}.weight")
    return out
