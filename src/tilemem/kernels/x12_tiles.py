"""x12 tiles on AVX2 (`csrc_portable/x12.c`, `x12_ffn.c`): a bf16 tile W [R, D] (R = 3n: gate, up and down^T rows)
as one payload of ~12 bits per weight, losslessly, and gated FFNs that read such payloads directly.

The payload layout is `layers.x12`'s (the torch reference; this module's `encode` writes the same bytes):
each weight's low byte as is, its high byte as a 4-bit code into the tile's 16 most common high bytes, the
rare others as exceptions. The kernels need only AVX2 + FMA (the portable library, `kernels.portable`);
where they cannot run, `available()` is False and callers use `layers.x12`.

payload = encode(w)                        # w bf16 [R, D] -> uint8 [payload_bytes(R, D)]; X12Overflow past cap
w = decode(payload, rows, d)               # -> bf16 [rows, d], bit for bit (or rows [r0, r0 + nrows) into out)
ffn_tasks(x, [FfnTask(FfnWeights(payload, n, d), tok, weight)], "silu", out)   # out [T, D] += the FFNs

Shape legend: R rows (3n for a tile), D hidden (a multiple of 32), n neurons, T tokens.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from tilemem.errors import KernelError, X12Overflow
from tilemem.kernels import portable

log = logging.getLogger(__name__)

EXCEPTION_SHARE = 512
"""An x12 payload holds up to one exception per this many weights (at least 64): `layers.x12.tile_cap`."""
ACTS = portable.ACTS
_TASK_WORDS = 5
"""int64 words of a `tmp_x12_ffn_task`: payload, n, ntok, tok, weight."""
_OVERFLOW = 3
"""`TMP_X12_OVERFLOW` (x12.h)."""

_vp, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


class X12Error(KernelError, ValueError):
    """Bad input to the x12 tile kernels (shape, dtype, payload size, tokens); the message says what to fix."""


@functools.cache
def lib() -> ctypes.CDLL | None:
    """The portable library with the x12 functions typed, or None where it cannot run here."""
    out = portable.load()
    if out is None:
        return None
    out.tmp_x12_payload_bytes.argtypes = [_i64, _i64]
    out.tmp_x12_payload_bytes.restype = _i64
    out.tmp_x12_encode.argtypes = [_vp, _i64, _i64, _i64, _vp, ctypes.POINTER(_i64), _int]
    out.tmp_x12_decode.argtypes = [_vp, _i64, _i64, _i64, _i64, _vp, _i64, _int]
    out.tmp_x12_ffn_tasks.argtypes = [_vp, _i64, _vp, _i64, _i64, _i64, _vp, _i64, _int, _int]
    out.tmp_x12_ffn_task_size.restype = _i64
    if out.tmp_x12_ffn_task_size() != 8 * _TASK_WORDS:
        log.warning("x12 tile kernels unavailable: tmp_x12_ffn_task is not %d int64 words", _TASK_WORDS)
        return None
    return out


def available() -> bool:
    """Whether the kernels run here."""
    return lib() is not None


def supported(d: int) -> bool:
    """Whether rows of `d` weights can be x12 (a multiple of 32, below 65536)."""
    return 0 < d < 65536 and d % 32 == 0


def tile_cap(rows: int, d: int) -> int:
    """Exceptions an x12 payload of a [rows, d] matrix has room for."""
    return max(64, rows * d // EXCEPTION_SHARE)


def payload_bytes(rows: int, d: int) -> int:
    """Bytes of the x12 payload of a bf16 [rows, d] matrix (about 3/4 of its 2 * rows * d)."""
    kp = (d + 63) // 64 * 64
    return (rows * kp * 3 // 2 + 15) // 16 * 16 + 64 + 4 * (rows + 1) + 4 * tile_cap(rows, d)


def _check_d(d: int, what: str) -> None:
    if not supported(d):
        raise X12Error(f"{what}: x12 needs rows of a multiple of 32 weights below 65536, not {d}; keep the tile bf16")


def _check_payload(payload: torch.Tensor, rows: int, d: int, what: str) -> None:
    want = payload_bytes(rows, d)
    ok = isinstance(payload, torch.Tensor) and payload.dtype == torch.uint8 and payload.is_cpu
    if not (ok and payload.dim() == 1 and payload.numel() == want and payload.is_contiguous()):
        got = f"{payload.dtype} {list(payload.shape)}" if isinstance(payload, torch.Tensor) else type(payload).__name__
        raise X12Error(f"{what}: the x12 payload of a [{rows}, {d}] matrix is a contiguous uint8 CPU vector of "
                       f"{want} bytes, got {got}")  # fmt: skip


def encode(w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The x12 payload (uint8 [payload_bytes(R, D)]) of a bf16 matrix w [R, D] with contiguous rows, into `out`
    if given: the bytes `layers.x12.encode` writes. Raises X12Overflow when w has more exceptions than
    `tile_cap` allows (the tile stays bf16; a given `out` is then left part written), X12Error for a bad shape
    or dtype."""
    what = "x12 encode"
    if not isinstance(w, torch.Tensor) or w.dtype != torch.bfloat16 or w.dim() != 2 or not w.is_cpu:
        got = f"{w.dtype} {list(w.shape)} on {w.device}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise X12Error(f"{what}: expected a 2-D bfloat16 CPU matrix [R, D], got {got}")
    rows, d = w.shape
    _check_d(d, what)
    if rows > 1 and w.stride(1) != 1:
        raise X12Error(f"{what}: w's rows must be contiguous, got strides {w.stride()}; pass w.contiguous()")
    if out is None:
        out = torch.empty(payload_bytes(rows, d), dtype=torch.uint8)
    _check_payload(out, rows, d, what)
    nexc = _i64(0)
    status = portable.require(lib(), what, "x12_tiles", "use layers.x12").tmp_x12_encode(
        w.data_ptr(), max(w.stride(0), d), rows, d, out.data_ptr(), ctypes.byref(nexc), torch.get_num_threads()
    )
    if status == _OVERFLOW:
        raise X12Overflow(
            f"a [{rows}, {d}] tile has {nexc.value} weights outside its 16 most common high bytes; an x12 tile "
            f"holds {tile_cap(rows, d)}"
        )
    portable.check_status(status, what, "x12_tiles")
    return out


def exceptions(payload: torch.Tensor, rows: int, d: int) -> int:
    """The exceptions an x12 payload of a [rows, d] matrix holds (its xrow[rows])."""
    _check_payload(payload, rows, d, "x12 exceptions")
    at = payload_bytes(rows, d) - 4 * tile_cap(rows, d) - 4
    return int(payload[at : at + 4].view(torch.int32)[0])


def decode(
    payload: torch.Tensor, rows: int, d: int, r0: int = 0, nrows: int | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows [r0, r0 + nrows) (all by default) of the bf16 [rows, d] matrix an x12 payload holds, bit for bit,
    into `out` (bf16 [nrows, d], rows contiguous, any row stride: e.g. a slice of a bigger buffer) if given.
    Raises X12Error for a bad payload size, row range or out, or a corrupt payload's exception entries."""
    what = "x12 decode"
    _check_d(d, what)
    _check_payload(payload, rows, d, what)
    nrows = rows - r0 if nrows is None else nrows
    if r0 < 0 or nrows < 0 or r0 + nrows > rows:
        raise X12Error(f"{what}: rows [{r0}, {r0 + nrows}) are not within the matrix's {rows} rows")
    if out is None:
        out = torch.empty(nrows, d, dtype=torch.bfloat16)
    ok = isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 and out.is_cpu and out.dim() == 2
    if not (ok and tuple(out.shape) == (nrows, d) and (d == 1 or out.stride(1) == 1)):
        got = f"{out.dtype} {list(out.shape)} strides {out.stride()}" if isinstance(out, torch.Tensor) else out
        raise X12Error(f"{what}: out must be a bfloat16 CPU matrix [{nrows}, {d}] with contiguous rows, got {got}")
    if nrows == 0:
        return out
    status = portable.require(lib(), what, "x12_tiles", "use layers.x12").tmp_x12_decode(
        payload.data_ptr(), rows, d, r0, nrows, out.data_ptr(), max(out.stride(0), d), torch.get_num_threads()
    )
    if status == 2:
        raise X12Error(f"{what}: the payload's exception entries are out of place (a corrupt payload); re-encode it")
    portable.check_status(status, what, "x12_tiles")
    return out


@dataclass(frozen=True, eq=False)
class FfnWeights:
    """One x12 tile's FFN weights: a payload of W [3n, D] (gate rows, up rows, down^T rows), checked once here
    (X12Error); pair it with each step's tokens in an `FfnTask`."""

    payload: torch.Tensor
    """uint8 [payload_bytes(3n, D)], contiguous."""
    n: int
    """Neurons."""
    hidden: int
    """D."""
    words: tuple[int, ...] = field(init=False, repr=False)
    """The task's payload pointer and n."""

    def __post_init__(self) -> None:
        what = "x12 FfnWeights"
        if not isinstance(self.n, int) or self.n < 0:
            raise X12Error(f"{what}: n must be a count of neurons, got {self.n!r}")
        _check_d(self.hidden, what)
        _check_payload(self.payload, 3 * self.n, self.hidden, what)
        object.__setattr__(self, "words", (self.payload.data_ptr(), self.n))


class FfnTask(NamedTuple):
    """One `ffn_tasks` task: out[tok[j]] += weight[j] * down(act(gate x) * (up x)) for x = x[tok[j]]."""

    weights: FfnWeights
    tok: torch.Tensor
    """int32 [N], contiguous: the rows of x and out, in [0, T)."""
    weight: torch.Tensor
    """fp32 [N], contiguous: the routing weights."""


def ffn_tasks(x: torch.Tensor, tasks: Sequence[FfnTask], act: str, out: torch.Tensor) -> None:
    """out [T, D] += every task's gated FFN of its tokens' rows of x [T, D] (both fp32 with contiguous rows).

    One native call: threads split each task's neurons, every weight decoded in registers (8 tokens per pass
    over a tile's payload: the kernel is meant for decode-sized tasks). `act`: "silu", "gelu" (erf) or "relu".
    Tasks may share tokens; out's rows are summed into, never set. Raises X12Error for bad input.
    """
    what = "x12 ffn_tasks"
    words, _ = portable.pack_tasks(x, tasks, act, out, what, FfnWeights, X12Error, 1 << 62)
    if not words:
        return
    t, d = x.shape
    _check_d(d, what)
    packed = array("q", words)  # [tasks, _TASK_WORDS]
    status = portable.require(lib(), what, "x12_tiles", "use layers.x12").tmp_x12_ffn_tasks(
        x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), t, d, packed.buffer_info()[0],
        len(packed) // _TASK_WORDS, ACTS[act], torch.get_num_threads(),
    )  # fmt: skip
    if status == 2:
        for q, task in enumerate(tasks):
            portable.check_tokens(task.tok, t, f"{what} task {q}", X12Error)
        raise X12Error(f"{what}: a task's payload has its exception entries out of place (a corrupt payload)")
    portable.check_status(status, what, "x12_tiles")
