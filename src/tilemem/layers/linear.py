"""Linear layer that sends small bf16 batches (decode) to the native GEMV kernel.

Decode multiplies a few token rows by each weight matrix once, so it is bound by how fast the
weights stream from memory; torch's bf16 path reaches about half the bandwidth there. Larger
batches (prefill) are compute-bound GEMMs and stay on torch (oneDNN). Same parameters and state
dict as `nn.Linear`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tilemem import kernels, sysinfo
from tilemem.kernels import bf16 as bf16_kernels
from tilemem.layers.fp8 import FP8, Fp8Matrix, fp8_gemm
from tilemem.layers.ggml import GgmlMatrix, embedding_rows, ggml_gemm
from tilemem.pages import drop_file_pages, file_backed

_NATIVE_HALF = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}
SLOW_HALF_GEMM = {dt: not set(flags) & sysinfo.cpu_flags() for dt, flags in _NATIVE_HALF.items()}
"""Per half dtype: whether this CPU lacks the instructions oneDNN needs for a fast GEMM in it. Without them
torch multiplies bf16/fp16 matrices by a reference path: a [1, n] x [n, D] product takes ~24x a GEMV of the
same bytes, and 256 rows ~5x an fp32 GEMM plus the upcast (measured on a 2-core EPYC with AVX2 only)."""
UPCAST_MIN_ROWS = 8
"""From this many rows (and for any row count with a weight whose rows are not contiguous) `gemm` upcasts
to fp32 on such CPUs; fewer rows run as torch's GEMV, row by row at its speed."""
UPCAST_CHUNK_BYTES = 8 << 20
"""fp32 copy of the weight made at once: bounded, so a large matrix (an LM head) adds no large temporary."""


def gemm(
    x: torch.Tensor, weight: torch.Tensor | Fp8Matrix | GgmlMatrix, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a weight [out, in] of any strides (an FP8 matrix: `fp8_gemm`), fast on
    CPUs whose torch bf16/fp16 GEMM is slow (`SLOW_HALF_GEMM`): up to `kernels.bf16.MAX_ROWS` bf16 rows run
    through the portable AVX2 kernels (the weights widened in registers, 2-2.5x torch's bf16 GEMV on one core),
    one fp16 row as a GEMV (`torch.mv`); more rows, or a transposed weight, are multiplied in fp32 on the
    weight upcast a chunk of rows at a time (bf16 and fp16 convert to fp32 exactly; fp32 accumulation, as
    torch's own half GEMM), and the result is rounded to x's dtype once. Elsewhere, or in fp32, it is `F.linear`."""
    if isinstance(weight, Fp8Matrix):
        return fp8_gemm(x, weight, bias)
    if isinstance(weight, GgmlMatrix):
        return ggml_gemm(x, weight, bias)
    if x.device.type != "cpu" or not SLOW_HALF_GEMM.get(x.dtype, False) or weight.dtype != x.dtype:
        return F.linear(x, weight, bias)
    if (y := portable_rows(x, weight, bias)) is not None:
        return y
    rows = x.numel() // x.shape[-1]
    if rows == 1:
        y = torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    if rows < UPCAST_MIN_ROWS and weight.stride(-1) == 1:
        return F.linear(x, weight, bias)
    xf = x.reshape(rows, x.shape[-1]).float()
    out = torch.empty(rows, weight.shape[0], dtype=x.dtype)
    step = max(1, UPCAST_CHUNK_BYTES // (4 * weight.shape[1]))
    for i in range(0, weight.shape[0], step):
        block = F.linear(xf, weight[i : i + step].float(), None if bias is None else bias[i : i + step].float())
        out[:, i : i + step] = block
    return out.view(*x.shape[:-1], weight.shape[0])


def portable_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`F.linear` of up to `kernels.bf16.MAX_ROWS` bf16 CPU rows through the portable AVX2 kernel (fp32 products
    and sums, the bf16 weight widened in registers, rounded to bf16 once: what the portable one-call decode layers
    compute), or None where it does not take them (more rows, other dtypes or strides, the kernel unavailable)."""
    rows = x.numel() // x.shape[-1]
    few = rows <= bf16_kernels.MAX_ROWS and x.device.type == "cpu" and weight.device.type == "cpu"
    if not (few and x.dtype == weight.dtype == torch.bfloat16 and bf16_kernels.available()):
        return None
    flat = x.reshape(rows, x.shape[-1]).float()  # [rows, in]
    if weight.stride(-1) == 1:  # [out, in] rows: y = x @ W^T
        y = bf16_kernels.matmul_nt(flat, weight)
    elif weight.stride(0) == 1:  # a transposed [in, out] matrix (a tile's down^T rows): y = x @ W^T = x @ W.t()
        y = bf16_kernels.matmul_nn(flat, weight.t())
    else:
        return None
    y = y if bias is None else y + bias.float()  # [rows, out] fp32, rounded once as torch's half GEMV rounds
    return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """`nn.Linear` on `meta` (the loader assigns the weights) with the decode fast path, and optionally
    its weight in x12 (`compress`), or in FP8: `weight` float8_e4m3fn [out, in] with the buffer
    `weight_scale_inv` (fp32 block scales, `layers.fp8`), as FP8 checkpoints name them, or in a GGUF block type
    (`qtype`, `layers.ggml`): `weight` uint8 [out, row bytes], the blocks as the file stores them."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.x12: kernels.X12Matrix | None = None
        self.register_buffer("weight_scale_inv", None)
        self.qtype: str | None = None
        self.portable = False
        """A bf16 weight's few-row products through the portable kernel on any CPU (`portable_rows`): set for the
        layers of an FP8 or GGUF model, which decode through the portable one-call layers (`MoECausalLM.
        portable_rows`), so that their modules compute what those compute."""

    def set_quantized(self, m: GgmlMatrix) -> None:
        """Take a GGUF quantized weight (its blocks, not a copy)."""
        self.weight = nn.Parameter(m.data, requires_grad=False)
        self.qtype = m.qtype

    @property
    def matrix(self) -> torch.Tensor | Fp8Matrix | GgmlMatrix:
        """The weight as `gemm` takes it: the tensor, an `Fp8Matrix` for an FP8 weight, a `GgmlMatrix` for a
        GGUF-quantized one."""
        if self.qtype is not None:
            return GgmlMatrix(self.weight, self.qtype, self.in_features)
        if self.weight.dtype == FP8:
            return Fp8Matrix(self.weight, self.weight_scale_inv)
        return self.weight

    def compress(self) -> bool:
        """Keep the weight as a `kernels.X12Matrix` (12 bits per weight, the same bits) and let go of its
        pages in the mapped checkpoint, where it is a bf16 CPU matrix of such a file that x12 can store.
        Every forward then reads the X12Matrix: a few rows through the native kernel, more (prefill)
        through torch on the matrix decoded into a reused buffer. Returns whether it did."""
        w = self.weight
        if self.x12 is not None or not (kernels.available() and kernels.x12_supported(w) and file_backed([w])):
            return self.x12 is not None
        self.x12 = kernels.X12Matrix(w)
        drop_file_pages([w])
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qtype is not None:
            return ggml_gemm(x, self.matrix, self.bias)
        if self.weight.dtype == FP8:
            return fp8_gemm(x, self.matrix, self.bias)
        return linear(x, self.weight, self.bias, self.x12, self.portable)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    x12: kernels.X12Matrix | None = None,
    portable: bool = False,
) -> torch.Tensor:
    """`F.linear`, through the native kernel for a few bf16 rows. With `x12` (the weight stored as x12),
    bf16 CPU rows read that: up to 4 * MAX_ROWS through the kernel, MAX_ROWS at a time, more through
    torch on the matrix decoded once. `portable`: a few rows through the portable kernel (`portable_rows`)."""
    if portable and x12 is None and (y := portable_rows(x, weight, bias)) is not None:
        return y
    rows = x.numel() // x.shape[-1]
    step = kernels.MAX_ROWS
    if x12 is not None and x.device.type == "cpu" and x.dtype == torch.bfloat16:
        if rows > 4 * step:  # a GEMM
            return gemm(x, kernels.decoded(x12), bias)
    elif not (rows <= step and weight.dtype == torch.bfloat16 and weight.stride(1) == 1 and kernels.usable(x)):
        return gemm(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    parts = [kernels.linear(flat[i : i + step], weight, x12) for i in range(0, rows, step)]
    y = parts[0] if len(parts) == 1 else torch.cat(parts)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


class Embedding(nn.Embedding):
    """`nn.Embedding` on `meta`, whose table may also be GGUF-quantized (`set_quantized`): then only the rows
    looked up are decoded, into `dtype`."""

    def __init__(self, num: int, dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__(num, dim, device="meta")
        self.qtype: str | None = None
        self.out_dtype = dtype

    def set_quantized(self, m: GgmlMatrix) -> None:
        """Take a GGUF quantized table (its blocks, not a copy)."""
        self.weight = nn.Parameter(m.data, requires_grad=False)
        self.qtype = m.qtype

    @property
    def matrix(self) -> torch.Tensor | GgmlMatrix:
        """The table as `gemm` takes it (a tied LM head)."""
        return GgmlMatrix(self.weight, self.qtype, self.embedding_dim) if self.qtype is not None else self.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.qtype is not None:
            return embedding_rows(self.matrix, ids, self.out_dtype or torch.float32)
        return super().forward(ids)
