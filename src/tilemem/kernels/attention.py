"""Attention (`csrc/attention.c`): a decode step's whole attention block, and a prefill's causal attention.

Shape legend: B rows, T tokens, H query heads, Hkv key/value heads, hd head width, N cache blocks, bs
positions per block, M blocks per row's table, D hidden.
"""

from __future__ import annotations

import ctypes

import torch

from tilemem.errors import KernelError
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
    tables: torch.Tensor,
    positions: torch.Tensor,
    ws: Workspace,
) -> torch.Tensor:
    """One decode step of attention for x [B, D] bf16 -> [B, D] bf16 (see `tm_attn_decode_bf16`).

    cos/sin [B, hd] (fp32 when `layer.fp32_rotate`, else bf16); keys/values: the layer's paged cache, pools
    [N, Hkv, bs, hd] bf16 (contiguous); tables [B, M] int64: row b's position p lives in block
    tables[b, p // bs] at offset p % bs (the slot cache [S, Hkv, L, hd] is bs = L, tables = slots.view(B, 1)).
    The new key and value go to position positions[b] [B] int64; attention covers positions 0..positions[b].
    KernelError for tables or positions that do not fit the pools."""
    b, d = x.shape
    tables = block_tables(tables, positions, b)
    check_pools(keys, values)
    nq, nk = layer.H * layer.hd, layer.Hkv * layer.hd
    n, bs, m = keys.shape[0], keys.shape[2], tables.shape[1]
    nthreads = threads()
    scratch, buf = ws.get(nthreads * m * bs, b * (2 * nq + 2 * nk))
    out = torch.empty(b, d, dtype=torch.bfloat16)
    status = lib().tm_attn_decode_bf16(
        ctypes.byref(layer), x.data_ptr(), b, d, cos.data_ptr(), sin.data_ptr(), keys.data_ptr(), values.data_ptr(),
        n, bs, tables.data_ptr(), m, positions.data_ptr(), out.data_ptr(), nthreads, buf.data_ptr(),
        scratch.data_ptr(),
    )  # fmt: skip
    check(status, f"decode attention of {b} rows")
    return out


def block_tables(tables: torch.Tensor, positions: torch.Tensor, rows: int) -> torch.Tensor:
    """The block tables of a native decode step as the kernels read them, [B, M] int64 contiguous; a [B]
    tensor is the slot cache's (one block per row, [B, 1]). Raises KernelError for the wrong dtypes or
    shapes; the kernel itself checks each row's position and the table entries it reads against the pools
    (TM_EINVAL: a KernelError from `check`), which costs no torch op per call."""
    if tables.dtype != torch.int64 or positions.dtype != torch.int64:
        raise KernelError(
            f"native decode needs int64 block tables and positions, got {tables.dtype} and {positions.dtype}"
        )
    if tables.dim() == 1:
        tables = tables.view(-1, 1)  # [B, 1]: one block (a slot) per row
    if tables.dim() != 2 or tables.shape[0] != rows or positions.shape != (rows,):
        raise KernelError(
            f"native decode of {rows} rows needs block tables [{rows}, M] and positions [{rows}], got "
            f"{list(tables.shape)} and {list(positions.shape)}"
        )
    if not positions.is_contiguous():
        raise KernelError("native decode needs contiguous positions")
    return tables.contiguous()


def check_pools(keys: torch.Tensor, values: torch.Tensor) -> None:
    """Raise KernelError unless keys/values are one layer's paged cache as the native decode reads it:
    contiguous bf16 pools [N, Hkv, bs, hd] of the same blocks."""
    if (
        keys.dim() != 4
        or keys.shape != values.shape
        or keys.dtype != torch.bfloat16
        or values.dtype != torch.bfloat16
        or not (keys.is_contiguous() and values.is_contiguous())
    ):
        raise KernelError(
            f"native decode needs contiguous bf16 KV pools [N, Hkv, bs, hd] of the same shape, got keys "
            f"{list(keys.shape)} {keys.dtype} and values {list(values.shape)} {values.dtype}"
        )
