"""llama.cpp's quantized weights (GGUF files) as they are stored: blocks of weights with their scales.

A quantized matrix W [R, C] is `data` (uint8 [R, row_bytes], each row C / block weights blocks laid out as
ggml lays them out) and its `qtype`. `dequantize` is the reference decoding (torch, every block type at once,
fp32 exactly as ggml computes it); `ggml_gemm` multiplies by such a matrix without holding it wider than a
bounded range of rows: through the native kernels where they run (`kernels.ggml`), else by the reference.

The native kernels have two paths: `exact` (the fp32 activations times the weights decoded in registers: the
reference's numbers up to the order of fp32 sums) and the fast one llama.cpp uses (activations quantized to
8 bits per block, integer dot products); `FAST` picks the fast one (`TILEMEM_GGML_EXACT=1` turns it off).
The README's "Run a GGUF model" states how far its logits are from the reference.

Block layouts (ggml-common.h), per block of `weights` weights in `nbytes` bytes (d, dmin, m: fp16):
  q8_0 [d, int8 q[32]]                         w = d * q
  q4_0 [d, 16 bytes of nibbles]                w = d * (q - 8); byte j holds weights j (low) and j + 16 (high)
  q4_1 [d, m, 16 bytes of nibbles]             w = d * q + m
  q5_0 [d, uint32 qh, 16 bytes of nibbles]     w = d * (q - 16); bit j of qh is the 5th bit of weight j
  q5_1 [d, m, uint32 qh, 16 bytes]             w = d * q + m
  q4_k [d, dmin, 12 bytes of 6-bit scales/mins for 8 sub-blocks of 32, 128 bytes of nibbles]
  q5_k [d, dmin, 12 bytes scales/mins, 32 bytes qh, 128 bytes of nibbles]
  q6_k [128 bytes low nibbles, 64 bytes 2-bit highs, int8 scales[16], d]   w = d * scale * (q - 32)

Shape legend: N activation rows, R matrix rows (outputs), C matrix columns (inputs), B blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tilemem.kernels import ggml as native

QK_K = 256
"""Weights per K-quant super-block."""


@dataclass(frozen=True)
class QuantType:
    """One ggml block type."""

    name: str
    """Lower-case name: `q4_k`."""
    ggml_type: int
    """Its number in GGUF's tensor table (`ggml_type`)."""
    weights: int
    """Weights per block."""
    nbytes: int
    """Bytes per block."""

    def row_bytes(self, cols: int) -> int:
        """Bytes of one row of `cols` weights (a multiple of `weights`)."""
        return cols // self.weights * self.nbytes


QUANT_TYPES = {
    q.name: q
    for q in (
        QuantType("q4_0", 2, 32, 18),
        QuantType("q4_1", 3, 32, 20),
        QuantType("q5_0", 6, 32, 22),
        QuantType("q5_1", 7, 32, 24),
        QuantType("q8_0", 8, 32, 34),
        QuantType("q4_k", 12, QK_K, 144),
        QuantType("q5_k", 13, QK_K, 176),
        QuantType("q6_k", 14, QK_K, 210),
    )
}
"""The block types TileMEM computes as they are stored (those of the Q4_0 .. Q8_0, Q4_K_M, Q5_K_M and Q6_K files
people download; llama-quantize falls back to q4_1/q5_0/q5_1 on rows that are not a multiple of 256)."""
BY_GGML_TYPE = {q.ggml_type: q for q in QUANT_TYPES.values()}
DEQUANT_CHUNK_BYTES = 8 << 20
"""fp32 bytes of W the reference path decodes at once: no LM-head-sized temporary (the native kernels decode a few
rows at a time into per-thread buffers)."""
FAST = os.environ.get("TILEMEM_GGML_EXACT", "0") != "1"
"""Whether the native kernels use llama.cpp's 8-bit-activation integer path (the default) or the exact one."""


@dataclass(frozen=True)
class GgmlMatrix:
    """One quantized matrix: its blocks, type and column count."""

    data: torch.Tensor
    """uint8 [R, row_bytes], rows contiguous."""
    qtype: str
    cols: int

    @property
    def quant(self) -> QuantType:
        return QUANT_TYPES[self.qtype]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.data.shape[0], self.cols))

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def rows(self, start: int, stop: int) -> GgmlMatrix:
        """Rows start:stop (a view)."""
        return GgmlMatrix(self.data[start:stop], self.qtype, self.cols)

    def dequantize(self) -> torch.Tensor:
        """The whole matrix in fp32 [R, C] (reference decoding)."""
        return dequantize(self.qtype, self.data, self.cols)


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """fp16 at byte offset `at` of each block: b [B, nbytes] uint8 -> [B, 1] fp32."""
    return b[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Bytes [B, n] -> [B, 2n]: the n low nibbles, then the n high nibbles (ggml's order within 32 weights)."""
    return torch.cat([qs & 0xF, qs >> 4], dim=1)


def _bits(b: torch.Tensor, at: int) -> torch.Tensor:
    """The 32 bits of the little-endian uint32 at byte `at` of each block: [B, 32] (bit j of weight j)."""
    qh = b[:, at : at + 4].to(torch.int64)  # [B, 4]
    word = qh[:, 0] | (qh[:, 1] << 8) | (qh[:, 2] << 16) | (qh[:, 3] << 24)  # [B]
    return (word[:, None] >> torch.arange(32, device=b.device)) & 1


def _scale_min_k4(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (K-quants' get_scale_min_k4): [B, 12] -> 2 x [B, 8]."""
    s = sc.to(torch.int32)
    low_s, low_m = s[:, 0:4] & 63, s[:, 4:8] & 63
    high_s = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    high_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([low_s, high_s], 1), torch.cat([low_m, high_m], 1)


def _dequant_blocks(qtype: str, b: torch.Tensor) -> torch.Tensor:
    """Blocks b [B, nbytes] uint8 -> their weights [B, weights] fp32."""
    if qtype == "q8_0":
        return _f16(b, 0) * b[:, 2:].contiguous().view(torch.int8).float()
    if qtype == "q4_0":
        return _f16(b, 0) * (_nibbles(b[:, 2:]).float() - 8)
    if qtype == "q4_1":
        return _f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2)
    if qtype in ("q5_0", "q5_1"):
        at = 2 if qtype == "q5_0" else 4
        q = (_nibbles(b[:, at + 4 :]).to(torch.int64) | (_bits(b, at) << 4)).float()
        return _f16(b, 0) * (q - 16) if qtype == "q5_0" else _f16(b, 0) * q + _f16(b, 2)
    if qtype in ("q4_k", "q5_k"):
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, mn = _scale_min_k4(b[:, 4:16])  # [B, 8] each
        ql = b[:, 16:144] if qtype == "q4_k" else b[:, 48:176]
        q = torch.cat([_nibbles(ql[:, 32 * c : 32 * c + 32]) for c in range(4)], 1).to(torch.int32)  # [B, 256]
        if qtype == "q5_k":  # sub-block j takes bit j of each of the 32 qh bytes
            qh = b[:, 16:48].to(torch.int32)  # [B, 32]
            q = q | torch.cat([((qh >> j) & 1) << 4 for j in range(8)], 1)
        scale = (d * sc.float()).repeat_interleave(32, 1)  # [B, 256]
        low = (dmin * mn.float()).repeat_interleave(32, 1)
        return scale * q.float() - low
    if qtype == "q6_k":
        ql, qh = b[:, 0:128].to(torch.int32), b[:, 128:192].to(torch.int32)
        sc = b[:, 192:208].contiguous().view(torch.int8).float()  # [B, 16]
        d = _f16(b, 208)
        parts = []
        for half in range(2):  # 128 weights each: ql 64 bytes, qh 32 bytes, 8 scales
            lo, hi = ql[:, 64 * half : 64 * half + 64], qh[:, 32 * half : 32 * half + 32]
            parts += [
                (lo[:, 0:32] & 0xF) | (((hi >> 0) & 3) << 4),
                (lo[:, 32:64] & 0xF) | (((hi >> 2) & 3) << 4),
                (lo[:, 0:32] >> 4) | (((hi >> 4) & 3) << 4),
                (lo[:, 32:64] >> 4) | (((hi >> 6) & 3) << 4),
            ]
        q = torch.cat(parts, 1).float() - 32  # [B, 256]
        return (d * sc).repeat_interleave(16, 1) * q
    raise ValueError(f"no reference decoding for {qtype}")


def dequantize(qtype: str, data: torch.Tensor, cols: int) -> torch.Tensor:
    """Reference decoding of quantized rows: data uint8 [..., R, row_bytes] -> fp32 [..., R, cols]; torch only, on
    data's device (a GPU's blocks decode there, with no host copy)."""
    q = QUANT_TYPES[qtype]
    blocks = data.reshape(-1, q.nbytes)  # [B, nbytes]
    return _dequant_blocks(qtype, blocks).reshape(*data.shape[:-1], cols)


def _native():
    """The native GGML kernels where they run here, else None (the reference path)."""
    return native if native.available() else None


def ggml_gemm(x: torch.Tensor, w: GgmlMatrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, W, bias)` for a quantized matrix W [R, C]: x [..., C] -> [..., R] in x's dtype, computed in
    fp32: through the native kernels on the CPU where they run (`FAST` picks their path), else the reference."""
    rows = x.numel() // x.shape[-1]
    xf = x.reshape(rows, x.shape[-1]).float().contiguous()  # [N, C]
    kernels = _native() if x.device.type == "cpu" and w.data.device.type == "cpu" else None
    if kernels is not None and w.qtype in kernels.QTYPES:
        y = kernels.matmul_nt(xf, w.qtype, w.data, w.cols, exact=not FAST)
    else:
        y = reference_gemm(xf, w)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], w.shape[0])


def reference_gemm(xf: torch.Tensor, w: GgmlMatrix) -> torch.Tensor:
    """xf [N, C] fp32 times W^T, W decoded to fp32 a bounded range of rows at a time -> [N, R] fp32."""
    rows_out = w.shape[0]
    step = max(1, DEQUANT_CHUNK_BYTES // (4 * w.cols))
    y = torch.empty(xf.shape[0], rows_out, dtype=torch.float32, device=xf.device)
    for i in range(0, rows_out, step):
        y[:, i : i + step] = F.linear(xf, w.rows(i, min(rows_out, i + step)).dequantize())
    return y


def embedding_rows(w: GgmlMatrix, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of a quantized embedding table, decoded: ids [...] -> [..., C] in `dtype` (by the native
    kernels where they run: the same values bit for bit, without torch's per-block temporaries)."""
    rows = w.data[ids.reshape(-1)]  # [N, row_bytes]
    kernels = _native() if rows.device.type == "cpu" else None
    if kernels is not None and w.qtype in kernels.QTYPES:
        out = kernels.dequantize(w.qtype, rows, w.cols)
    else:
        out = dequantize(w.qtype, rows, w.cols)
    return out.to(dtype).view(*ids.shape, w.cols)
