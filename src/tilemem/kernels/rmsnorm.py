"""RMSNorm of token rows on AVX2 (`csrc_portable/norm.c`): what a decode step's norms need on CPUs without AVX512,
where the torch module spends six small ops (~0.15 ms) on a row of a few thousand values.

y = rms_norm(x, w, eps)   # x [..., D] and w [D], both bf16 or both fp32 -> y like x
"""

from __future__ import annotations

import ctypes
import functools

import torch

from tilemem.errors import KernelError
from tilemem.kernels import portable

_vp, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
DTYPES = (torch.bfloat16, torch.float32)


@functools.cache
def lib() -> ctypes.CDLL | None:
    """The loaded portable library with `tmp_rms_norm` typed, or None where it cannot run here."""
    out = portable.load()
    if out is None:
        return None
    out.tmp_rms_norm.argtypes = [_vp, _i64, _i64, _i64, _vp, _int, ctypes.c_float, _vp, _i64, _int]
    return out


def available() -> bool:
    """Whether the kernel runs here."""
    return lib() is not None


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `rms_norm` takes these: CPU tensors of one dtype (bf16 or fp32), no autograd, and the kernel here."""
    return (
        x.dtype == w.dtype and x.dtype in DTYPES and x.device.type == "cpu" and w.device.type == "cpu"
        and not (x.requires_grad or w.requires_grad) and available()
    )  # fmt: skip


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """w * to_dtype(x * rsqrt(mean(x^2, -1) + eps)), computed in fp32 as `layers.norm.RMSNorm`: x [..., D], w [D],
    both bf16 or both fp32 CPU tensors -> [..., D] in that dtype. Raises KernelError for other input."""
    if x.dtype != w.dtype or x.dtype not in DTYPES or not (x.is_cpu and w.is_cpu):
        raise KernelError(f"rms_norm: x and w must be CPU tensors of one dtype, bf16 or fp32; got x {x.dtype} on "
                          f"{x.device}, w {w.dtype} on {w.device}")  # fmt: skip
    d = x.shape[-1] if x.dim() else 0
    if w.dim() != 1 or w.shape[0] != d:
        raise KernelError(f"rms_norm: w must be a vector of x's last size {d}, got shape {tuple(w.shape)}")
    native = portable.require(lib(), "rms_norm", "rmsnorm", "use layers.norm.RMSNorm's torch path")
    rows = x.reshape(-1, d)
    if d > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    w = w.contiguous()
    y = torch.empty(rows.shape, dtype=x.dtype)
    if y.numel():
        status = native.tmp_rms_norm(
            rows.data_ptr(), max(rows.stride(0), d), rows.shape[0], d, w.data_ptr(), int(x.dtype == torch.bfloat16),
            eps, y.data_ptr(), d, torch.get_num_threads(),
        )  # fmt: skip
        portable.check_status(status, "rms_norm", "rmsnorm")
    return y.view(x.shape)
