"""FP8 weights on the CPU: float8 e4m3 bytes with fp32 scales per 128x128 block (DeepSeek-V3 checkpoints),
dequantized and multiplied by native kernels.

A weight W [R, C] is `data` (torch.float8_e4m3fn [R, C], rows contiguous; a row slice of a bigger matrix
is fine) and `scale` (fp32 [ceil(R/128), ceil(C/128)]): W[i, j] = float(data[i, j]) * scale[i // 128, j // 128].

The kernels (`csrc_portable/fp8.c`) need only AVX2 + FMA + F16C, so they are a library of their own,
built by `library.build` apart from the main AVX512 one: they run on every x86-64 CPU of the last decade.
Where they cannot (CPU, compiler, `TILEMEM_KERNELS=0`), `available()` is False and callers use torch.

Shape legend: N tokens, R rows of W, C columns of W.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

from tilemem import sysinfo
from tilemem.errors import KernelError, KernelMemoryError
from tilemem.kernels import library

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc_portable")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared", "-fvisibility=hidden"]
BLOCK = 128
"""Rows and columns of W per scale."""
NT_MAX_TOKENS = 64
"""Most tokens matmul_nt streams the fp8 weights for (8 per pass); more (prefill) dequantize rows of W
`PREFILL_BYTES` at a time and run torch's fp32 GEMM on them. Where the two meet on one Zen 1 core (the
kernel: ~13 GMAC/s at any N; torch: 12 at 64 tokens, 14 at 128)."""
NN_MAX_TOKENS = 24
"""Most tokens matmul_nn streams the fp8 weights for; more go the prefill way (the kernel: ~9-11 GMAC/s on
one Zen 1 core; torch: 10 at 32 tokens)."""
PREFILL_BYTES = 8 << 20
"""fp32 bytes of W a prefill matmul dequantizes at once."""

_vp, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def cpu_supported() -> bool:
    """Whether this CPU reports the instruction sets the fp8 kernels use (AVX2, FMA, F16C)."""
    return {"avx2", "fma", "f16c"} <= sysinfo.cpu_flags()


def build(force: bool = False) -> Path:
    """Compile `csrc_portable/` (once per sources and flags) into the cached fp8 library; returns its path."""
    return library.build(force, CSRC, FLAGS, "tilemem-fp8")


@functools.cache
def lib() -> ctypes.CDLL | None:
    """The loaded fp8 library, or None where it cannot run here (CPU, compiler, `TILEMEM_KERNELS=0`)."""
    if os.environ.get("TILEMEM_KERNELS", "1") == "0" or not cpu_supported():
        return None
    try:
        out = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as exc:
        log.warning("fp8 kernels unavailable, using torch: %s", exc)
        return None
    out.tmp_fp8_dequantize.argtypes = [_vp, _i64, _vp, _i64, _i64, _i64, _i64, _vp, _i64, _int]
    matmul = [_vp, _i64, _i64, _vp, _i64, _i64, _i64, _vp, _i64, _vp, _i64, _int]
    out.tmp_fp8_matmul_nt.argtypes = out.tmp_fp8_matmul_nn.argtypes = matmul
    return out


def available() -> bool:
    """Whether the fp8 kernels can run here (CPU with AVX2 + FMA + F16C, a C compiler, not disabled)."""
    return lib() is not None


def _check_weight(data: torch.Tensor, scale: torch.Tensor, what: str) -> torch.Tensor:
    """Raise ValueError unless (data, scale) is an fp8 weight the kernels can read; returns scale, contiguous."""
    if not isinstance(data, torch.Tensor) or data.dtype != torch.float8_e4m3fn:
        got = data.dtype if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"{what}: data must be a torch.float8_e4m3fn tensor, got {got}")
    if data.dim() != 2 or data.device.type != "cpu":
        raise ValueError(f"{what}: data must be a 2-D CPU tensor [R, C], got {tuple(data.shape)} on {data.device}")
    rows, cols = data.shape
    if (cols > 1 and data.stride(1) != 1) or (rows > 1 and data.stride(0) < cols):
        raise ValueError(
            f"{what}: data's rows must be contiguous (stride(1) == 1, stride(0) >= C), got strides "
            f"{data.stride()}; pass data.contiguous()"
        )
    want = (-(-rows // BLOCK), -(-cols // BLOCK))
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.device.type != "cpu":
        got = f"{scale.dtype} on {scale.device}" if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ValueError(f"{what}: scale must be a float32 CPU tensor, got {got}")
    if tuple(scale.shape) != want:
        raise ValueError(
            f"{what}: scale has shape {tuple(scale.shape)}, but data {tuple(data.shape)} needs {want} "
            f"(one scale per {BLOCK}x{BLOCK} block)"
        )
    return scale.contiguous()


def _check_x(x: torch.Tensor, k: int, name: str, what: str) -> torch.Tensor:
    """Raise ValueError unless x is an fp32 CPU matrix [N, k]; returns it with contiguous rows."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type != "cpu":
        got = f"{x.dtype} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what}: x must be a float32 CPU tensor, got {got}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"{what}: x has shape {tuple(x.shape)}, but W needs x of shape [N, {name}={k}]")
    return x if x.stride(1) == 1 or k <= 1 else x.contiguous()


def _check_status(status: int, what: str) -> None:
    if status == 1:
        raise KernelMemoryError(f"{what}: the fp8 kernel could not allocate its working memory; free memory")
    if status != 0:
        raise KernelError(f"{what}: the fp8 kernel failed with status {status}")


def _kernels(what: str) -> ctypes.CDLL:
    out = lib()
    if out is None:
        raise KernelError(f"{what}: the fp8 kernels cannot run here (see fp8.available()); use the torch path")
    return out


def _rows(data: torch.Tensor) -> int:
    """Rows of W dequantized at once on the prefill path: a multiple of 128, about PREFILL_BYTES of fp32."""
    return max(BLOCK, PREFILL_BYTES // (4 * max(data.shape[1], 1)) // BLOCK * BLOCK)


def dequantize(
    data: torch.Tensor, scale: torch.Tensor, rows: slice | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """W[rows] as fp32 [r, C] (`rows`: a slice with step 1, any start; default all R rows), written into
    `out` where given (fp32 [r, C] with contiguous rows: reusing a buffer saves its page faults)."""
    scale = _check_weight(data, scale, "fp8 dequantize")
    start, stop, step = (rows or slice(None)).indices(data.shape[0])
    if step != 1:
        raise ValueError(f"fp8 dequantize: rows must be a slice with step 1, got {rows}")
    stop = max(start, stop)
    shape = (stop - start, data.shape[1])
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)  # [r, C]
    elif out.dtype != torch.float32 or tuple(out.shape) != shape or (shape[1] > 1 and out.stride(1) != 1):
        raise ValueError(
            f"fp8 dequantize: out must be a float32 tensor of shape {shape} with contiguous rows, got "
            f"{out.dtype} {tuple(out.shape)} with strides {out.stride()}"
        )
    if out.numel() == 0:
        return out
    status = _kernels("fp8 dequantize").tmp_fp8_dequantize(
        data.data_ptr(), data.stride(0), scale.data_ptr(), scale.stride(0), start, stop - start, data.shape[1],
        out.data_ptr(), out.stride(0), torch.get_num_threads(),
    )  # fmt: skip
    _check_status(status, "fp8 dequantize")
    return out


def matmul_nt(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = x @ W^T, fp32 [N, R], for x fp32 [N, C] (a linear layer's forward).

    Up to NT_MAX_TOKENS tokens (decode), W's fp8 rows are streamed once per 8 tokens, split over threads by
    rows; more tokens (prefill) dequantize W in row blocks and call torch's fp32 GEMM on each.
    """
    scale = _check_weight(data, scale, "fp8 matmul_nt")
    x = _check_x(x, data.shape[1], "C", "fp8 matmul_nt")
    n, (r, c) = x.shape[0], data.shape
    if n > NT_MAX_TOKENS:
        y = torch.empty(n, r, dtype=torch.float32)  # [N, R]
        step = _rows(data)
        buf = torch.empty(min(step, r), c, dtype=torch.float32)  # [rows, C], reused
        for r0 in range(0, r, step):
            w = dequantize(data, scale, slice(r0, r0 + step), buf[: min(step, r - r0)])  # [rows, C]
            y[:, r0 : r0 + step] = torch.nn.functional.linear(x, w)
        return y
    y = torch.zeros(n, r, dtype=torch.float32)  # [N, R]
    if y.numel() == 0 or c == 0:
        return y
    status = _kernels("fp8 matmul_nt").tmp_fp8_matmul_nt(
        x.data_ptr(), x.stride(0), n, data.data_ptr(), data.stride(0), r, c, scale.data_ptr(), scale.stride(0),
        y.data_ptr(), y.stride(0), torch.get_num_threads(),
    )  # fmt: skip
    _check_status(status, "fp8 matmul_nt")
    return y


def matmul_nn(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = x @ W, fp32 [N, C], for x fp32 [N, R] (e.g. an FFN's down projection stored as [neurons, D]).

    Up to NN_MAX_TOKENS tokens (decode), threads split W's columns and each runs over all R rows, 8 tokens
    per pass; more tokens (prefill) dequantize W in row blocks and accumulate torch's fp32 GEMMs.
    """
    scale = _check_weight(data, scale, "fp8 matmul_nn")
    x = _check_x(x, data.shape[0], "R", "fp8 matmul_nn")
    n, (r, c) = x.shape[0], data.shape
    y = torch.zeros(n, c, dtype=torch.float32)  # [N, C]
    if n > NN_MAX_TOKENS:
        step = _rows(data)
        buf = torch.empty(min(step, r), c, dtype=torch.float32)  # [rows, C], reused
        for r0 in range(0, r, step):
            w = dequantize(data, scale, slice(r0, r0 + step), buf[: min(step, r - r0)])  # [rows, C]
            y.addmm_(x[:, r0 : r0 + step], w)
        return y
    if y.numel() == 0 or r == 0:
        return y
    status = _kernels("fp8 matmul_nn").tmp_fp8_matmul_nn(
        x.data_ptr(), x.stride(0), n, data.data_ptr(), data.stride(0), r, c, scale.data_ptr(), scale.stride(0),
        y.data_ptr(), y.stride(0), torch.get_num_threads(),
    )  # fmt: skip
    _check_status(status, "fp8 matmul_nn")
    return y
