"""Grouped-query attention with the per-family options (qkv bias, q/k norm, clip) and MLA's cousin
in `mla.py`. Both read and write the KV cache through a ForwardContext."""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from tilemem import kernels
from tilemem.config import ModelConfig
from tilemem.kernels import paged, paged_decode
from tilemem.layers.kv_cache import ForwardContext
from tilemem.layers.linear import Linear
from tilemem.layers.norm import RMSNorm
from tilemem.layers.rope import RotaryEmbedding


class Attention(nn.Module):
    """Multi-head attention with H query heads and Hkv key/value heads of width hd."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.h, self.hkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d = cfg.hidden_size
        bias = cfg.attention_bias
        self.q_proj = Linear(d, self.h * self.hd, bias)
        self.k_proj = Linear(d, self.hkv * self.hd, bias)
        self.v_proj = Linear(d, self.hkv * self.hd, bias)
        self.o_proj = Linear(self.h * self.hd, d, cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "full":  # OLMoE: over all heads at once
            self.q_norm = RMSNorm(self.h * self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hkv * self.hd, cfg.rms_norm_eps)
        elif cfg.qk_norm == "head":  # Qwen3: per head
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.clip = cfg.clip_qkv
        self.scale = self.hd**-0.5
        self._native: kernels.AttnLayer | None = None
        self._native_ptr = (0, 0)  # q_proj's (data pointer, X12Matrix id) when `_native` was built
        self._ws = kernels.Workspace()

    def native(self) -> kernels.AttnLayer | None:
        """The layer for the native decode kernel, or None where it cannot run (not bf16 contiguous)."""
        w = self.q_proj.weight
        if self._native is not None and self._native_ptr == (w.data_ptr(), id(self.q_proj.x12)):
            return self._native
        linears = (self.q_proj, self.k_proj, self.v_proj, self.o_proj)
        norms = (self.q_norm, self.k_norm) if self.qk_norm != "none" else ()
        params = [t for m in (*linears, *norms) for t in m.parameters()]
        if any(t.dtype != torch.bfloat16 or not t.is_contiguous() or t.device.type != "cpu" for t in params):
            return None

        def ptr(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        def x12(m: Linear) -> int | None:
            return None if m.x12 is None else ctypes.addressof(m.x12.struct)

        self._native = kernels.AttnLayer(
            *(ptr(m.weight) for m in linears),
            *(ptr(m.bias) for m in linears),
            *(ptr(m.weight) for m in norms),
            *([None, None] if not norms else []),
            {"none": 0, "full": 1, "head": 2}[self.qk_norm],
            self.h,
            self.hkv,
            self.hd,
            norms[0].eps if norms else 0.0,
            self.scale,
            self.clip or 0.0,
            0,
            *(x12(m) for m in linears),
        )
        self._native_ptr = (w.data_ptr(), id(self.q_proj.x12))
        return self._native

    def _block_fits(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cos: torch.Tensor, rope: RotaryEmbedding
    ) -> bool:
        """Whether the native decode block (`kernels.paged_decode`) takes this decode step: CPU tensors of one
        dtype (bf16 or fp32), the cache's too, halves rope (not DeepSeek's interleaved pairs) over whole heads."""
        dt = q.dtype
        norms = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm != "none" else ()
        return (
            q.device.type == "cpu" and not rope.interleave and dt in paged_decode.DTYPES and keys.dtype == dt
            and values.dtype == dt and cos.dtype == (torch.float32 if rope.fp32_rotate else dt)
            and cos.shape[-1] == self.hd == keys.shape[-1] == values.shape[-1] and self.hd % 2 == 0
            and all(w.dtype == dt for w in norms) and paged_decode.available()
        )  # fmt: skip

    def _decode_block(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: ForwardContext,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """q [B, 1, H*hd], k, v [B, 1, Hkv*hd] (the projections) -> o [B, H*hd]: q/k norm, clip, rope, the write
        of k and v into the cache and the paged attention, as the torch path below computes them."""
        b = q.shape[0]
        norms = (self.q_norm, self.k_norm) if self.qk_norm != "none" else ()
        return paged_decode.decode_block(
            q.reshape(b, -1), k.reshape(b, -1), v.reshape(b, -1), cos.reshape(b, -1), sin.reshape(b, -1),
            ctx.cache.keys[self.layer], ctx.cache.values[self.layer], ctx.tables, ctx.positions[:, 0], self.scale,
            self.qk_norm, *(m.weight for m in norms), eps=norms[0].eps if norms else 0.0, clip=self.clip,
        )  # fmt: skip

    def forward(
        self,
        x: torch.Tensor,
        ctx: ForwardContext,
        rope: RotaryEmbedding,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]. With `keep` [B] token offsets, [B, 1, D]: every token's keys and values
        go to the cache, but only the kept token of each row queries them (see DecoderLayer)."""
        b, t, _ = x.shape
        keys, values = ctx.cache.keys[self.layer], ctx.cache.values[self.layer]
        decode = t == 1 and not rope.interleave and kernels.usable(x) and keys.dtype == torch.bfloat16
        if decode and (native := self.native()) is not None:  # decode: the whole block in one native call
            native.fp32_rotate = int(cos.dtype == torch.float32)
            out = kernels.attn_decode(
                native, x.reshape(b, -1).contiguous(), cos.reshape(b, -1), sin.reshape(b, -1), keys, values, ctx.tables,
                ctx.positions[:, 0].contiguous(), self._ws,
            )  # fmt: skip
            return out.view(b, 1, -1)
        rows = None if keep is None else torch.arange(b, device=x.device)  # (none to make for a decode step)
        xq = x if keep is None else x[rows, keep].unsqueeze(1)  # [B, Tq, D]: the querying tokens
        tq = xq.shape[1]
        q, k, v = self.q_proj(xq), self.k_proj(x), self.v_proj(x)  # [B, Tq, H*hd], [B, T, Hkv*hd] x2
        if t == 1 and keep is None and self._block_fits(q, keys, values, cos, rope):
            # decode on AVX2: norms, clip, rope, the cache write and the paged attention in one native call
            o = self._decode_block(q, k, v, ctx, cos, sin)  # [B, H*hd]
            return self.o_proj(o.view(b, 1, self.h * self.hd))
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (z.clamp(-self.clip, self.clip) for z in (q, k, v))
        q = q.view(b, tq, self.h, self.hd)
        k = k.view(b, t, self.hkv, self.hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, Tq, hd], [B, Hkv, T, hd]
        v = v.view(b, t, self.hkv, self.hd).transpose(1, 2)
        qcos, qsin = (cos, sin) if keep is None else (cos[rows, :, keep].unsqueeze(2), sin[rows, :, keep].unsqueeze(2))
        q, k = rope.apply(q, qcos, qsin), rope.apply(k, cos, sin)
        if t == 1 and keep is None and q.device.type == "cpu" and paged.available():
            # decode: attend the paged cache in place (no gather of every cached position)
            kc, vc = ctx.cache.keys[self.layer], ctx.cache.values[self.layer]  # [N, Hkv, bs, hd]
            ctx.write(kc, k)
            ctx.write(vc, v)
            o = paged.paged_attention(
                q[:, :, 0].contiguous(), kc, vc, ctx.tables, ctx.lengths, self.scale
            )  # [B, H, hd]
            return self.o_proj(o.reshape(b, 1, self.h * self.hd))
        keys, values = ctx.store(self.layer, k, v)  # [B, Hkv, L, hd]
        gqa = self.h != self.hkv
        if keep is not None:  # one query per row, at its kept token: its row of the mask
            o = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=ctx.mask[rows, :, keep].unsqueeze(2), scale=self.scale, enable_gqa=gqa
            )
            return self.o_proj(o.transpose(1, 2).reshape(b, 1, self.h * self.hd))
        # The native kernel takes 1/3-1/2 of SDPA's time on AVX512-BF16; with AMX, SDPA's tiles win (7%).
        native = ctx.causal and t > 1 and kernels.usable(q) and not kernels.amx_enabled()
        if native and keys.dtype == torch.bfloat16 and self.hd % 2 == 0 and keys.stride() == values.stride():
            o = kernels.attn_prefill(q, keys, values, self.scale)  # [B, T, H, hd]
            return self.o_proj(o.view(b, t, self.h * self.hd))
        o = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=ctx.attn_mask, is_causal=ctx.causal, scale=self.scale, enable_gqa=gqa
        )  # [B, H, T, hd]
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.h * self.hd))
