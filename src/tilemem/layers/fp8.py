"""FP8 weights as published (DeepSeek-V3, GLM-5, Qwen3-FP8): e4m3 bytes plus one scale per 128x128 block.

A quantized matrix W [R, C] is `data` (torch.float8_e4m3fn [R, C], one byte per weight) and `scale`
(fp32 [ceil(R/128), ceil(C/128)]; checkpoints store it as `weight_scale_inv`, fp32 or ue8m0 powers of two);
W[i, j] = float(data[i, j]) * scale[i // 128, j // 128]. Shapes that are not multiples of the block were
zero-padded per block before quantization, so the last block row/column is cropped.

`fp8_gemm` multiplies by such a matrix without ever holding it in a wider dtype: through the portable
native kernels (`kernels.fp8`, AVX2 + FMA): a few rows (decode) stream the e4m3 bytes, decoded in
registers; more rows (prefill) run a GEMM on bf16-decoded panels where the CPU has AVX512-BF16 (exact products),
else multiply fp32 row blocks dequantized a bounded range at a time. The
reference path (`TILEMEM_KERNELS=0`, or no kernel) dequantizes with torch, block by block, and multiplies
in fp32. Activations are multiplied in fp32 and the result rounded to their dtype once.

Shape legend: N activation rows, R matrix rows (outputs), C matrix columns (inputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tilemem.kernels import fp8 as native

FP8 = torch.float8_e4m3fn
E8M0 = getattr(torch, "float8_e8m0fnu", None)
BLOCK = 128
"""Rows and columns per scale block (`weight_block_size` [128, 128], the only size published)."""
FP8_MAX = 448.0
"""Largest finite e4m3fn value."""
DEQUANT_CHUNK_BYTES = 8 << 20
"""fp32 rows dequantized at once by the prefill and reference paths: bounded, so an LM-head-sized matrix
adds no large temporary."""


@dataclass(frozen=True)
class Fp8Matrix:
    """One FP8 matrix with its block scales; `t()` is the transposed matrix (a view, no copy)."""

    data: torch.Tensor
    """float8_e4m3fn [R, C] (possibly a transposed view)."""
    scale: torch.Tensor
    """fp32 [ceil(R/128), ceil(C/128)]."""

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        """Bytes of the weights and their scales."""
        return self.data.numel() + self.scale.numel() * self.scale.element_size()

    @property
    def transposed(self) -> bool:
        """Whether the bytes are stored column-major (a `t()` of a row-major matrix)."""
        return self.data.dim() == 2 and self.data.stride(0) == 1 and self.data.stride(1) != 1

    def t(self) -> Fp8Matrix:
        return Fp8Matrix(self.data.t(), self.scale.t())

    def dequantize(self) -> torch.Tensor:
        """The whole matrix in fp32 [R, C] (reference decoding)."""
        return dequantize(self.data, self.scale)

    def rows(self, start: int, stop: int) -> Fp8Matrix:
        """Rows start:stop (`start` on a block boundary) with their scale rows."""
        if start % BLOCK:
            raise ValueError(f"FP8 row slices start on a {BLOCK}-row block boundary, not at row {start}")
        return Fp8Matrix(self.data[start:stop], self.scale[start // BLOCK : math.ceil(stop / BLOCK)])


def scale_shape(rows: int, cols: int, block: tuple[int, int] = (BLOCK, BLOCK)) -> tuple[int, int]:
    """Shape of the scale grid of an [rows, cols] matrix."""
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def expand_scale(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The block scales repeated to one per element, cropped: [rows, cols] fp32."""
    return scale.float().repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]


def dequantize(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Reference dequantization: float(data) * scale of each element's block, fp32 [R, C]."""
    rows, cols = data.shape
    return data.float() * expand_scale(scale, rows, cols)


def quantize(weight: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize a float matrix as DeepSeek's converter does: per 128x128 block, scale = amax / 448
    (with `ue8m0`, rounded up to a power of two, as V3.1+ store it), data = round_to_e4m3(w / scale).
    Returns (data float8_e4m3fn [R, C], scale fp32 [ceil(R/128), ceil(C/128)])."""
    rows, cols = weight.shape
    sr, sc = scale_shape(rows, cols)
    padded = torch.zeros(sr * BLOCK, sc * BLOCK, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(sr, BLOCK, sc, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12)  # [sr, sc]
    scale = amax / FP8_MAX
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    data = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(sr * BLOCK, sc * BLOCK).to(FP8)
    return data[:rows, :cols].contiguous(), scale.contiguous()


def _native():
    """The native FP8 kernels where they run here, else None (the reference path)."""
    return native if native.available() else None


def fp8_gemm(x: torch.Tensor, w: Fp8Matrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, W, bias)` for an FP8 matrix W [R, C] (row-major, or `t()` of one): x [..., C] -> [..., R]
    in x's dtype, computed in fp32: through the native kernel on the CPU where it runs (`kernels.fp8`),
    else the reference path (torch dequantizes a bounded range of whole blocks at a time)."""
    rows = x.numel() // x.shape[-1]
    xf = x.reshape(rows, x.shape[-1]).float()  # [N, C]
    native = _native() if x.device.type == "cpu" and w.data.device.type == "cpu" else None
    if native is None:
        y = _blocked(xf, w)
    elif w.transposed:
        y = native.matmul_nn(xf, w.data.t(), w.scale.t())
    else:
        y = native.matmul_nt(xf, w.data, w.scale)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], w.shape[0])


def _blocked(xf: torch.Tensor, w: Fp8Matrix) -> torch.Tensor:
    """xf [N, C] fp32 times W^T, W dequantized to fp32 a bounded range of whole scale blocks at a time."""
    rows_out, cols = w.shape
    if w.transposed:  # W = S^T for row-major S [C, R]: y = xf @ S, S's rows (W's columns) a range at a time
        s = w.t()
        step = max(BLOCK, DEQUANT_CHUNK_BYTES // (4 * rows_out) // BLOCK * BLOCK)
        y = torch.zeros(xf.shape[0], rows_out, dtype=torch.float32, device=xf.device)
        for i in range(0, cols, step):
            part = s.rows(i, min(cols, i + step))
            y.addmm_(xf[:, i : i + step], dequantize(part.data, part.scale))
        return y
    step = max(BLOCK, DEQUANT_CHUNK_BYTES // (4 * cols) // BLOCK * BLOCK)
    y = torch.empty(xf.shape[0], rows_out, dtype=torch.float32, device=xf.device)
    for i in range(0, rows_out, step):
        part = w.rows(i, min(rows_out, i + step))
        y[:, i : i + step] = F.linear(xf, dequantize(part.data, part.scale))
    return y
