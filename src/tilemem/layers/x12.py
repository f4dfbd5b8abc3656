"""x12 tiles in torch: a bf16 matrix [R, D] (a tile's gate, up and down^T rows) as one payload of ~12 bits per
weight, losslessly. The reference of the portable kernels (`kernels.x12_tiles`) and the GPU's decoder.

The payload keeps the AVX512 library's x12 chunk layout (`kernels/csrc/x12.c`), so its decoders read a
payload as a `tm_x12`: each weight's low byte (7 mantissa bits and the exponent's lowest bit) as is; its high
byte (sign and the upper exponent bits) as a 4-bit code into the tile's 16 most common high bytes; every
other weight (the random and trained weights seen cover >99.9% with 16 codes) an exception stored whole.
An exception area of fixed capacity (`tile_cap`) keeps every tile of a store the same size.

Byte layout (KP = D rounded up to 64, A = align16(R * KP * 3/2)):
    0            lo   uint8 [R, KP]    low bytes, chunk order (below)
    R * KP       hc   uint8 [R, KP/2]  codes, chunk order
    A            tab  uint8 [64]       the 16 high bytes, 4 copies (one per 128-bit lane of vpshufb)
    A + 64       xrow int32 [R + 1]    row r's exceptions: xval[xrow[r] : xrow[r + 1]]
    A + 68 + 4R  xval int32 [cap]      column << 16 | bf16 bits, columns ascending in a row; the rest 0
Chunk order: in each row's chunks of 64 weights, byte p of the 64 low bytes is weight (p % 16 < 8 ? 0 : 32)
+ 8 * (p // 16) + p % 8 of the chunk (where vpunpck{l,h}bw take it from), and so is nibble p of the 32 code
bytes (low nibbles of bytes 0-31, then their high nibbles). Padding weights (D % 64 == 32) are zero bytes.
The table: high bytes by count descending, ties by value ascending (bytes no weight has, ascending, fill
it); a weight whose high byte is not in it takes code 0 and an exception.

Shape legend: R rows, D columns (a multiple of 32), KP = ceil(D / 64) * 64, X exceptions.
"""

from __future__ import annotations

import torch

from tilemem.errors import X12Overflow
from tilemem.kernels.x12_tiles import payload_bytes, supported, tile_cap

__all__ = ["decode", "encode", "parts", "payload_bytes", "row_bytes", "supported", "tile_cap"]

CHUNK = 64
"""Weights per chunk of a row (the layout's unit)."""
TABLE_BYTES = 64


def _kp(d: int) -> int:
    return (d + CHUNK - 1) // CHUNK * CHUNK


def row_bytes(d: int) -> int:
    """Bytes of a row's low bytes and codes (d rounded up to 64 weights, 12 bits each)."""
    return _kp(d) * 3 // 2


def _table_offset(rows: int, d: int) -> int:
    return (rows * row_bytes(d) + 15) // 16 * 16


def _check(rows: int, d: int) -> None:
    if not supported(d):
        raise ValueError(f"x12 needs rows of a multiple of 32 weights below 65536, not {d}; keep such tiles bf16")


def _order(device: torch.device) -> torch.Tensor:
    """[64]: the weight of a chunk that byte (and nibble) p holds."""
    p = torch.arange(CHUNK, device=device)
    return torch.where(p % 16 < 8, 0, 32) + 8 * (p // 16) + p % 8


def parts(payload: torch.Tensor, rows: int, d: int) -> tuple[torch.Tensor, ...]:
    """Views of a payload: lo [R, KP], hc [R, KP/2], tab [64], xrow int32 [R+1], xval int32 [cap]."""
    kp, a = _kp(d), _table_offset(rows, d)
    if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() < payload_bytes(rows, d):
        raise ValueError(
            f"an x12 payload of a [{rows}, {d}] matrix is {payload_bytes(rows, d)} uint8 bytes, got "
            f"{payload.dtype} {list(payload.shape)}"
        )
    lo = payload[: rows * kp].view(rows, kp)
    hc = payload[rows * kp : rows * kp * 3 // 2].view(rows, kp // 2)
    tab = payload[a : a + TABLE_BYTES]
    x0 = a + TABLE_BYTES
    xrow = payload[x0 : x0 + 4 * (rows + 1)].view(torch.int32)
    x1 = x0 + 4 * (rows + 1)
    xval = payload[x1 : x1 + 4 * tile_cap(rows, d)].view(torch.int32)
    return lo, hc, tab, xrow, xval


def encode(w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The x12 payload (uint8 [payload_bytes(R, D)]) of a bf16 matrix w [R, D], into `out` if given.
    Raises X12Overflow when it has more exceptions than `tile_cap` allows."""
    if w.dtype != torch.bfloat16 or w.dim() != 2:
        raise ValueError(f"x12 encodes a bf16 matrix, got {w.dtype} {list(w.shape)}")
    rows, d = w.shape
    _check(rows, d)
    kp, dev = _kp(d), w.device
    bits = w.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF  # [R, D]
    high, low = bits >> 8, bits & 0xFF
    counts = torch.bincount(high.reshape(-1), minlength=256)  # [256]
    table = torch.sort(-counts, stable=True).indices[:16]  # count descending, ties by value ascending
    lookup = torch.full((256,), -1, dtype=torch.int64, device=dev)
    lookup[table] = torch.arange(16, device=dev)
    codes = lookup[high]  # [R, D]
    missing = codes < 0
    codes[missing] = 0
    xr, xc = missing.nonzero(as_tuple=True)  # [X], rows ascending, columns ascending within a row
    cap = tile_cap(rows, d)
    if xr.numel() > cap:
        raise X12Overflow(
            f"a [{rows}, {d}] tile has {xr.numel()} weights outside its 16 most common high bytes; an x12 "
            f"tile holds {cap}"
        )
    if out is None:
        out = torch.zeros(payload_bytes(rows, d), dtype=torch.uint8, device=dev)
    lo, hc, tab, xrow, xval = parts(out, rows, d)
    order = _order(dev)
    padded = torch.zeros(rows, kp, dtype=torch.int64, device=dev)
    padded[:, :d] = low
    lo.copy_(padded.view(rows, kp // CHUNK, CHUNK)[:, :, order].reshape(rows, kp))
    padded.zero_()
    padded[:, :d] = codes
    nib = padded.view(rows, kp // CHUNK, CHUNK)[:, :, order]  # [R, KP/64, 64]
    hc.copy_((nib[:, :, :32] | nib[:, :, 32:] << 4).reshape(rows, kp // 2))
    out[rows * row_bytes(d) : _table_offset(rows, d)].zero_()  # the alignment gap, as the kernel writes it
    tab.copy_(table.repeat(TABLE_BYTES // 16))
    xrow.zero_()
    xrow[1:] = torch.cumsum(torch.bincount(xr, minlength=rows), 0)
    xval.zero_()
    xval[: xr.numel()] = (xc << 16 | bits[xr, xc]).to(torch.int32)
    return out


def decode(payload: torch.Tensor, rows: int, d: int) -> torch.Tensor:
    """The bf16 matrix [rows, d] an x12 payload holds, bit for bit (on the payload's device)."""
    _check(rows, d)
    lo, hc, tab, xrow, xval = parts(payload, rows, d)
    kp, dev = _kp(d), payload.device
    order = _order(dev)
    low = torch.empty(rows, kp // CHUNK, CHUNK, dtype=torch.int32, device=dev)
    low[:, :, order] = lo.view(rows, kp // CHUNK, CHUNK).to(torch.int32)
    h = hc.view(rows, kp // CHUNK, 32).to(torch.int64)
    nib = torch.cat([h & 0xF, h >> 4], dim=2)  # [R, KP/64, 64], chunk order
    codes = torch.empty_like(nib)
    codes[:, :, order] = nib
    bits = (tab[:16].to(torch.int32)[codes] << 8 | low).view(rows, kp)[:, :d].contiguous()  # [R, D]
    counts = (xrow[1:] - xrow[:-1]).to(torch.int64)
    n = int(xrow[-1])
    if n:
        r = torch.repeat_interleave(torch.arange(rows, device=dev), counts)
        v = xval[:n].to(torch.int64) & 0xFFFFFFFF  # columns >= 32768 set the sign bit
        bits[r, v >> 16] = (v & 0xFFFF).to(torch.int32)
    return bits.to(torch.int16).view(torch.bfloat16)
