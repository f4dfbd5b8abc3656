"""Attention (`csrc/attention.c`): a decode step's whole attention block, and a prefill's causal attention.

Shape legend: B rows, T tokens, H query heads, Hkv key/value heads, hd head width, S cache slots, L cache
length, D hidden.
"""

from __future__ import annotations

import ctypes

import torch

from tilemem.kernels.library import check, lib
from tilemem.kernels.structs import AttnLayer
from tilemem.kernels.workspace import Workspace, threads


def attn_prefill(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of a prefill with no cached prefix (query i attends keys 0..i), as
    scaled_dot_product_attention(is_causal=True) computes it for bf16 (fp32 scores and softmax, bf16
    probabilities times values in fp32). q [B, H, T, hd], keys/values [B, Hkv, T, hd] bf16, each with
    unit stride along hd -> [B, T, H, hd] bf16, contiguous (the layout the o projection reads)."""
    b, h, t, hd = q.shape
    hkv = keys.shape[1]
    if keys.stride() != values.stride() or q.stride(3) != 1 or keys.stride(3) != 1:
        raise ValueError("attn_prefill needs unit stride along hd and the same strides for keys and values")
    out = torch.empty(b, t, h, hd, dtype=torch.bfloat16)
    status = lib().tm_attn_prefill_bf16(
        q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), keys.data_ptr(), values.data_ptr(), keys.stride(0),
        keys.stride(1), keys.stride(2), out.data_ptr(), b, h, hkv, t, hd, scale, threads(),
    )  # fmt: skip
    check(status, f"prefill attention of {b} x {t} tokens")
    return out


def attn_decode(
    layer: AttnLayer,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    ws: Workspace,
) -> torch.Tensor:
    """One decode step of attention for x [B, D] bf16 -> [B, D] bf16 (see `tm_attn_decode_bf16`).

    cos/sin [B, hd] (fp32 when `layer.fp32_rotate`, else bf16); keys/values: the layer's cache
    [S, Hkv, L, hd], written at (slots[b], positions[b]); attention covers positions 0..positions[b]."""
    b, d = x.shape
    nq, nk = layer.H * layer.hd, layer.Hkv * layer.hd
    nthreads = threads()
    scratch, buf = ws.get(nthreads * keys.shape[2], b * (2 * nq + 2 * nk))
    out = torch.empty(b, d, dtype=torch.bfloat16)
    status = lib().tm_attn_decode_bf16(
        ctypes.byref(layer), x.data_ptr(), b, d, cos.data_ptr(), sin.data_ptr(), keys.data_ptr(), values.data_ptr(),
        keys.shape[2], slots.data_ptr(), positions.data_ptr(), out.data_ptr(), nthreads, buf.data_ptr(),
        scratch.data_ptr(),
    )  # fmt: skip
    check(status, f"decode attention of {b} rows")
    return out
