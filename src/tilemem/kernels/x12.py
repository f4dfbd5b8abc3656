"""x12: bf16 matrices in 12 bits per weight, losslessly (`csrc/x12.c`): encoding, decoding, and the
layout of a layer's experts in one buffer."""

from __future__ import annotations

import ctypes
import threading

import torch

from tilemem.kernels.library import lib
from tilemem.kernels.structs import X12
from tilemem.kernels.workspace import threads
from tilemem.pages import MADV_HUGEPAGE, MADV_WILLNEED, madvise, populate_write

X12_SAMPLE_ROWS = 64
"""Rows an X12Matrix samples to pick its 16 high bytes (a miss costs an exception, never a wrong bit)."""
X12_SPILL = 32
"""Elements the decoder may write past a decoded matrix's end (rows of 32 weights padded to 64)."""


def x12_supported(w: torch.Tensor) -> bool:
    """Whether `w` can be stored as an X12Matrix: a contiguous bf16 matrix with rows of a multiple of 32
    weights, below 65536."""
    return (
        w.dtype == torch.bfloat16
        and w.dim() == 2
        and w.is_contiguous()
        and 0 < w.shape[1] < 65536
        and (w.shape[1] % 32 == 0)
    )


def x12_row_bytes(k: int) -> int:
    """Bytes an X12Matrix row of k weights takes, exceptions aside: a low byte and a 4-bit code per weight,
    rows padded to 64 weights."""
    return (k + 63) // 64 * 64 * 3 // 2


class X12Matrix:
    """A bf16 matrix [N, K] in 12 bits per weight, losslessly (`tm_x12` in csrc/tilemem.h): each weight's low
    byte (`lo`), its high byte (sign and upper exponent bits) as a 4-bit code (`hc`) into the 16 most
    common high bytes of a sample of rows (`tab`), and every weight whose high byte has no code as an
    exception (`xrow` [N+1] offsets into `xval`: column << 16 | bits). `buf` (uint8, x12_row_bytes(K) * N
    bytes) may be given to hold `lo` and `hc`."""

    def __init__(self, w: torch.Tensor, buf: torch.Tensor | None = None) -> None:
        if not x12_supported(w):
            raise ValueError(
                f"x12 needs a contiguous bf16 matrix with rows of a multiple of 32 weights (got {w.dtype} "
                f"{list(w.shape)}); keep such weights in bf16"
            )
        n, k = w.shape
        kp = (k + 63) // 64 * 64
        native, nthreads = lib(), threads()
        self.tab = torch.empty(64, dtype=torch.uint8)  # the 16 high bytes, one copy per 128-bit lane (vpshufb)
        native.tm_x12_table(w.data_ptr(), n, k, max(1, n // X12_SAMPLE_ROWS), self.tab.data_ptr())
        if buf is None:
            buf = torch.empty(x12_row_bytes(k) * n, dtype=torch.uint8)
        self.lo = buf[: n * kp].view(n, kp)
        self.hc = buf[n * kp : n * kp * 3 // 2].view(n, kp // 2)
        cnt = torch.empty(n, dtype=torch.int32)
        native.tm_x12_encode(
            w.data_ptr(), n, k, self.tab.data_ptr(), self.lo.data_ptr(), self.hc.data_ptr(), cnt.data_ptr(), nthreads
        )
        self.xrow = torch.zeros(n + 1, dtype=torch.int32)
        torch.cumsum(cnt, 0, out=self.xrow[1:])
        self.xval = torch.empty(int(self.xrow[-1]), dtype=torch.int32)
        if self.xval.numel():
            native.tm_x12_exceptions(
                w.data_ptr(), n, k, self.tab.data_ptr(), self.xrow.data_ptr(), self.xval.data_ptr(), nthreads
            )
        ptrs = (t.data_ptr() for t in (self.lo, self.hc, self.tab, self.xrow, self.xval))
        self.struct = X12(*ptrs, n, k)
        self.shape = (n, k)

    @property
    def nbytes(self) -> int:
        """Bytes this matrix takes (the bf16 matrix: 2 * N * K)."""
        return sum(t.numel() * t.element_size() for t in (self.lo, self.hc, self.tab, self.xrow, self.xval))

    @property
    def exceptions(self) -> int:
        """Weights stored whole because their high byte has no code."""
        return self.xval.numel()

    def decode(self, buf: torch.Tensor | None = None) -> torch.Tensor:
        """The bf16 matrix, bit for bit: in `buf` (flat bf16, N * K + X12_SPILL elements or more) if given."""
        n, k = self.shape
        if buf is None:
            buf = torch.empty(n * k + X12_SPILL, dtype=torch.bfloat16)
        lib().tm_x12_decode(ctypes.byref(self.struct), 0, n, buf.data_ptr(), threads())
        return buf[: n * k].view(n, k)


def x12_all(mats: list[torch.Tensor]) -> list[X12Matrix]:
    """X12Matrix of each matrix, their sign/mantissa and code bytes in one buffer (in 2 MiB pages where
    the kernel gives them: decode streams it, and 4 KiB pages cost a TLB miss each)."""
    sizes = [x12_row_bytes(w.shape[1]) * w.shape[0] for w in mats]
    buf = torch.empty(sum(sizes) + (2 << 20), dtype=torch.uint8)
    start = -buf.data_ptr() % (2 << 20)  # 2 MiB-aligned, before anything touches it
    madvise(buf.data_ptr() + start, sum(sizes), MADV_HUGEPAGE)
    populate_write(buf.data_ptr() + start, sum(sizes), threads())  # not a fault per page on first touch
    for w in mats:  # read ahead (a mapped file's pages not yet in memory), while the first ones encode
        madvise(w.data_ptr(), w.numel() * w.element_size(), MADV_WILLNEED)
    out = []
    for w, size in zip(mats, sizes, strict=True):
        out.append(X12Matrix(w, buf[start : start + size]))
        start += size
    return out


_decoded = threading.local()


def decoded(m: X12Matrix) -> torch.Tensor:
    """m's bf16 matrix in a buffer of the calling thread, reused by its next call (for one GEMM: a
    prefill's projection)."""
    n, k = m.shape
    buf = getattr(_decoded, "buf", None)
    if buf is None or buf.numel() < n * k + X12_SPILL:
        buf = _decoded.buf = torch.empty(n * k + X12_SPILL, dtype=torch.bfloat16)
    return m.decode(buf)
