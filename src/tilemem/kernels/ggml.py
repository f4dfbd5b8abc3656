"""llama.cpp (ggml) quantized weights on the CPU: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (blocks of 32 weights) and
Q4_K, Q5_K, Q6_K (super-blocks of 256), dequantized and multiplied by native kernels.

A weight W [R, C] of type `qtype` is `data` (torch.uint8 [R, row_bytes], rows contiguous; a row slice of a
bigger matrix is fine), each row C / BLOCK_WEIGHTS[qtype] blocks of BLOCK_BYTES[qtype] bytes laid out
exactly as ggml stores them (a GGUF tensor's bytes, one row of the tensor per row of `data`).

Two ways to multiply (`exact`):
- exact=True: every weight decoded in registers to the fp32 value `gguf.quants.dequantize` gives, fp32 FMAs
  with the fp32 activations: within ~1e-6 relative of dequantize-then-matmul;
- exact=False: llama.cpp's way: the activations quantized to int8 per block (32 values, or 256 with sums
  per 16 for the K-quants), integer dot products (maddubs / madd), fp32 scaling per block. The activations'
  rounding is the whole difference: on Gaussian activations and random blocks, 0.53% (32-weight types) and
  0.71% (K-quants) relative RMS error of the outputs, up to 1.0% of the largest output in max-abs terms
  (255 x 2048 weights, 1-8 tokens; FAST_TOL bounds it), as llama.cpp's CPU backend has. Past NT_MAX_TOKENS
  the K-quants and Q8_0 run the same arithmetic with 8 rows interleaved (`tmg_matmul_q8`), fp32 sums in another
  order.

The kernels (`csrc_portable/ggml_quant*.c`) need only AVX2 + FMA + F16C: they are in the portable library
(`kernels.portable`, with the FP8 kernels), apart from the main AVX512 one. Where they cannot run
(CPU, compiler, `TILEMEM_KERNELS=0`), `available()` is False and callers use torch.

Shape legend: N tokens, R rows of W, C columns of W; for FFNs T tokens, D hidden, n neurons of a task.
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

from tilemem.errors import KernelError
from tilemem.kernels import portable

log = logging.getLogger(__name__)

TYPE_IDS = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q4_k": 12, "q5_k": 13, "q6_k": 14}
"""Type name -> ggml's type id (GGMLQuantizationType)."""
QTYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
"""The types the kernels read."""
BLOCK_WEIGHTS = {"q8_0": 32, "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q4_k": 256, "q5_k": 256, "q6_k": 256}
"""Weights per block."""
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q4_k": 144, "q5_k": 176, "q6_k": 210}
"""Bytes per block."""
FAST_TOL = 2e-2
"""Bound on the fast path's error (max abs error / max abs output, random data) against the exact path."""
NT_MAX_TOKENS = 15
"""Most tokens matmul_nt streams the quantized weights for (8 per pass, exact or fast); more (prefill) run
`tmg_matmul_dq`: W dequantized a panel of 6 rows at a time into a per-thread buffer, fp32 FMAs on 16 tokens at
once (exact either way). Measured on this 2-thread Zen 1 (Q4_K 1024 x 2048 and Q6_K 2048 x 1024 expert
matrices): int8 streamed 26-30 G multiply-adds/s at any token count; dequantized panels 20-25 at 8-13 tokens,
28-32 at 16-24, 33-36 at 32-64, 39-41 at 256 (torch's GEMM on dequantized rows: 18 at 32 tokens, 31 at 256).
With exact=False, Q8_GEMM_TYPES run `tmg_matmul_q8` there instead."""
Q8_GEMM_TYPES = ("q4_k", "q5_k", "q6_k", "q8_0")
"""Types whose fast (exact=False) prefill, past NT_MAX_TOKENS, runs `tmg_matmul_q8`: the fast path's int8
activations, W decoded 8 rows at a time into a per-thread buffer interleaved by 4 weights, so that the 8-bit
products of a sub-block add in int16 before its scale's one multiply (the fast path's row kernel multiplies
per 32 weights). Measured on a 2-thread EPYC Zen 4 (KVM, session 20; Q4_K 1024 x 2048 and 2048 x 2048, Q5_K
1024 x 2048, Q6_K 2048 x 1024), G multiply-adds/s of tmg_matmul_dq -> tmg_matmul_q8: 16 tokens 77-86 -> 136-152,
32 tokens 92-99 -> 164-180, 64 tokens 101-104 -> 175-206, 256 tokens 105-107 -> 186-221 (from 8 tokens on it
also beats the streamed fast path there: 110-141 against 93-111). Q8_0's products cannot add in int16: one
AVX512-VNNI vpdpbusd per 8 rows x 4 weights where the CPU has it (chosen at run time), else AVX2's maddubs and
madd per vector (the same bits); same host, Q8_0 1024 x 2048 and 2048 x 1024: 16 tokens 77-82 -> 140-165 (AVX2
84-92), 32 tokens 93-95 -> 189-190 (99-100), 64 tokens 97-101 -> 206-232 (104-109), 256 tokens 100-103 ->
217-250 (106-114); OLMoE Q8_0 GGUF prefill of 256 tokens 72 -> 141 tok/s (benchmarks/decode_breakdown.py)."""
FFN_MAX_TOKENS = NT_MAX_TOKENS
"""Most tokens an `ffn_tasks` task runs with in the fused kernel (8 per pass over its weights); a task with
more (a prefill's experts: ~T * top-k / E tokens each) runs as three matmul_nt calls from Python."""
ACTS = portable.ACTS
_TORCH_ACTS = portable.TORCH_ACTS
_TASK_WORDS = 13
"""int64 words of a `tmg_ffn_task`: 3 matrices of 3, then n, ntok, tok, weight."""

_vp, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@functools.cache
def lib() -> ctypes.CDLL | None:
    """The loaded ggml library, or None where it cannot run here (CPU, compiler, `TILEMEM_KERNELS=0`)."""
    out = portable.load()
    if out is None:
        return None
    out.tmg_block_bytes.argtypes = out.tmg_block_weights.argtypes = [_int]
    out.tmg_block_bytes.restype = out.tmg_block_weights.restype = _i64
    for name, t in TYPE_IDS.items():
        if (out.tmg_block_bytes(t), out.tmg_block_weights(t)) != (BLOCK_BYTES[name], BLOCK_WEIGHTS[name]):
            log.warning("ggml kernels unavailable, using torch: the library's %s blocks differ from ggml.py's", name)
            return None
    out.tmg_dequantize.argtypes = [_int, _vp, _i64, _i64, _i64, _i64, _vp, _i64, _int]
    out.tmg_matmul_nt.argtypes = [_int, _int, _vp, _i64, _i64, _vp, _i64, _i64, _i64, _vp, _i64, _int]
    out.tmg_matmul_dq.argtypes = [_int, _vp, _i64, _i64, _vp, _i64, _i64, _i64, _vp, _i64, _int]
    out.tmg_matmul_q8.argtypes = [_int, _vp, _i64, _i64, _vp, _i64, _i64, _i64, _vp, _i64, _int]
    out.tmg_ffn_tasks.argtypes = [_vp, _i64, _vp, _i64, _i64, _i64, _vp, _i64, _int, _int, _int]
    out.tmg_ffn_task_size.restype = _i64
    if out.tmg_ffn_task_size() != 8 * _TASK_WORDS:
        log.warning("ggml kernels unavailable, using torch: tmg_ffn_task is not %d int64 words", _TASK_WORDS)
        return None
    return out


def available() -> bool:
    """Whether the ggml kernels can run here (CPU with AVX2 + FMA + F16C, a C compiler, not disabled)."""
    return lib() is not None


def row_bytes(qtype: str, cols: int) -> int:
    """Bytes of one row of C = `cols` weights of `qtype` (KernelError unless cols is a multiple of its block)."""
    if qtype not in TYPE_IDS:
        raise KernelError(f"unknown ggml quant type {qtype!r}: the kernels read {', '.join(QTYPES)}")
    if not isinstance(cols, int) or cols <= 0 or cols % BLOCK_WEIGHTS[qtype]:
        raise KernelError(
            f"{qtype}: a row of {cols} weights is not a whole number of {BLOCK_WEIGHTS[qtype]}-weight blocks; "
            "pass the tensor's true column count (ggml quantizes rows in whole blocks)"
        )
    return cols // BLOCK_WEIGHTS[qtype] * BLOCK_BYTES[qtype]


def check_weight(qtype: str, data: torch.Tensor, cols: int, what: str) -> None:
    """Raise KernelError unless `data` is a [R, row_bytes] uint8 CPU tensor of `qtype` rows of `cols` weights
    with contiguous rows."""
    nbytes = row_bytes(qtype, cols)
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or not data.is_cpu or data.dim() != 2:
        got = f"{data.dtype} {tuple(data.shape)}" if isinstance(data, torch.Tensor) else type(data).__name__
        raise KernelError(f"{what}: data must be a 2-D torch.uint8 CPU tensor [R, row_bytes], got {got}")
    if data.shape[1] != nbytes:
        raise KernelError(
            f"{what}: rows of {data.shape[1]} bytes, but {cols} {qtype} weights take {nbytes} bytes a row; "
            "check the type and the column count"
        )
    if data.stride(1) != 1 or (data.shape[0] > 1 and data.stride(0) < nbytes):
        raise KernelError(f"{what}: data's rows must be contiguous bytes, got strides {data.stride()}")


def _check_x(x: torch.Tensor, cols: int, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or not x.is_cpu or x.dim() != 2:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise KernelError(f"{what}: x must be a 2-D float32 CPU tensor [N, C], got {got}")
    if x.shape[1] != cols:
        raise KernelError(f"{what}: x has shape {tuple(x.shape)}, but W has {cols} columns")
    return x if x.stride(1) == 1 or cols <= 1 else x.contiguous()


def dequantize(qtype: str, data: torch.Tensor, cols: int, rows: slice | None = None) -> torch.Tensor:
    """W[rows] as fp32 [r, cols] (`rows`: a slice with step 1; default all): bit for bit the values of
    `gguf.quants.dequantize`."""
    what = f"ggml dequantize {qtype}"
    check_weight(qtype, data, cols, what)
    start, stop, step = (rows or slice(None)).indices(data.shape[0])
    if step != 1:
        raise KernelError(f"{what}: rows must be a slice with step 1, got {rows}")
    out = torch.empty(max(0, stop - start), cols, dtype=torch.float32)  # [r, C]
    return _dequantize_into(qtype, data, cols, start, out, what)


def _dequantize_into(
    qtype: str, data: torch.Tensor, cols: int, start: int, out: torch.Tensor, what: str
) -> torch.Tensor:
    """out [r, C] = W[start : start + r] (out: fp32 with contiguous rows)."""
    if out.numel():
        status = portable.require(lib(), what, "ggml", "use the torch path").tmg_dequantize(
            TYPE_IDS[qtype], data.data_ptr(), data.stride(0), start, out.shape[0], cols, out.data_ptr(),
            out.stride(0), torch.get_num_threads(),
        )  # fmt: skip
        portable.check_status(status, what, "ggml")
    return out


def matmul_nt(x: torch.Tensor, qtype: str, data: torch.Tensor, cols: int, exact: bool = True) -> torch.Tensor:
    """y = x @ W^T, fp32 [N, R], for x fp32 [N, C] (a linear layer's forward); W `qtype` rows of `cols` weights.

    Up to NT_MAX_TOKENS tokens (decode), W's blocks are streamed once per 8 tokens, split over threads by rows,
    exact or fast (see the module docstring); more tokens (prefill) dequantize W a few rows at a time into a
    per-thread buffer and multiply them by fp32 FMAs (`tmg_matmul_dq`), exact, or, fast on Q8_GEMM_TYPES, decode
    them 8 rows interleaved into one and multiply them by 8-bit integer products (`tmg_matmul_q8`).
    """
    what = f"ggml matmul_nt {qtype}"
    check_weight(qtype, data, cols, what)
    x = _check_x(x, cols, what)
    n, r = x.shape[0], data.shape[0]
    y = torch.empty(n, r, dtype=torch.float32)  # [N, R]
    if y.numel() == 0:
        return y
    native = portable.require(lib(), what, "ggml", "use the torch path")
    if n > NT_MAX_TOKENS:
        fn = native.tmg_matmul_dq if exact or qtype not in Q8_GEMM_TYPES else native.tmg_matmul_q8
        status = fn(
            TYPE_IDS[qtype], x.data_ptr(), x.stride(0), n, data.data_ptr(), data.stride(0), r, cols, y.data_ptr(),
            y.stride(0), torch.get_num_threads(),
        )  # fmt: skip
        portable.check_status(status, what, "ggml")
        return y
    status = native.tmg_matmul_nt(
        TYPE_IDS[qtype], int(exact), x.data_ptr(), x.stride(0), n, data.data_ptr(), data.stride(0), r, cols,
        y.data_ptr(), y.stride(0), torch.get_num_threads(),
    )  # fmt: skip
    portable.check_status(status, what, "ggml")
    return y


QuantWeight = tuple[str, torch.Tensor]
"""A ggml matrix as (qtype, data uint8 [R, row_bytes] with contiguous rows); its columns follow from the bytes."""


def weight_cols(w: QuantWeight, what: str) -> int:
    """Columns of the ggml matrix w (KernelError unless it is one: a known type, whole blocks a row)."""
    if not (isinstance(w, tuple) and len(w) == 2 and isinstance(w[1], torch.Tensor)):
        raise KernelError(f"{what}: expected a (qtype, data) pair, got {type(w).__name__}")
    qtype, data = w
    row_bytes(qtype, BLOCK_WEIGHTS.get(qtype, 1))  # the type's check
    nbytes = data.shape[1] if data.dim() == 2 else -1
    if nbytes <= 0 or nbytes % BLOCK_BYTES[qtype]:
        raise KernelError(
            f"{what}: data of shape {tuple(data.shape)} is not rows of whole {qtype} blocks "
            f"({BLOCK_BYTES[qtype]} bytes each)"
        )
    cols = nbytes // BLOCK_BYTES[qtype] * BLOCK_WEIGHTS[qtype]
    check_weight(qtype, data, cols, what)
    return cols


@dataclass(frozen=True, eq=False)
class FfnWeights:
    """One expert's ggml FFN weights, checked once here (KernelError) and packed for the kernel: build it when
    the weights are loaded, and pair it with each step's tokens in an `FfnTask`. The three matrices may be of
    different types (a Q4_K_M file keeps some downs in Q6_K)."""

    gate: QuantWeight
    """[n, D]."""
    up: QuantWeight
    """[n, D]."""
    down: QuantWeight
    """[D, n] (a checkpoint's ffn_down): n is a multiple of its type's block."""
    n: int = field(init=False)
    """Neurons (rows of gate and up)."""
    hidden: int = field(init=False)
    """D (columns of gate and up)."""
    words: tuple[int, ...] = field(init=False, repr=False)
    """The three `tmg_matrix` structs and n (pointers into the tensors above)."""

    def __post_init__(self) -> None:
        what = "ggml FfnWeights"
        d = weight_cols(self.gate, f"{what} gate")
        n = self.gate[1].shape[0]
        words: list[int] = []
        for name, w, want in (("gate", self.gate, (n, d)), ("up", self.up, (n, d)), ("down", self.down, (d, n))):
            cols = weight_cols(w, f"{what} {name}")
            got = (w[1].shape[0], cols)
            if got != want:
                raise KernelError(
                    f"{what} {name}: [{got[0]}, {got[1]}] weights, but the task needs [{want[0]}, {want[1]}] "
                    "(gate, up: [n, D]; down: [D, n])"
                )
            words += [w[1].data_ptr(), w[1].stride(0), TYPE_IDS[w[0]]]
        for attr, value in (("n", n), ("hidden", d), ("words", (*words, n))):
            object.__setattr__(self, attr, value)


class FfnTask(NamedTuple):
    """One `ffn_tasks` task: out[tok[j]] += weight[j] * down(act(gate x) * (up x)) for x = x[tok[j]]."""

    weights: FfnWeights
    tok: torch.Tensor
    """int32 [N], contiguous: the rows of x and out, in [0, T)."""
    weight: torch.Tensor
    """fp32 [N], contiguous: the routing weights."""


def _ffn_matmuls(x: torch.Tensor, task: FfnTask, act: str, out: torch.Tensor, exact: bool) -> None:
    """One prefill-sized task by the matmuls."""
    w, tok = task.weights, task.tok.long()
    xt = x.index_select(0, tok)  # [N, D]
    gate = matmul_nt(xt, w.gate[0], w.gate[1], w.hidden, exact)  # [N, n]
    h = _TORCH_ACTS[act](gate) * matmul_nt(xt, w.up[0], w.up[1], w.hidden, exact)  # [N, n]
    y = matmul_nt(h, w.down[0], w.down[1], w.n, exact)  # [N, D]
    out.index_add_(0, tok, y * task.weight[:, None])


def ffn_tasks(x: torch.Tensor, tasks: Sequence[FfnTask], act: str, out: torch.Tensor, exact: bool = True) -> None:
    """out [T, D] += every task's gated FFN of its tokens' rows of x [T, D] (both fp32 with contiguous rows).

    Tasks of up to FFN_MAX_TOKENS tokens run in one native call (one parallel region: threads split each
    task's neurons, then the downs' output rows); the others, prefill-sized, as matmuls. `act`: "silu",
    "gelu" (erf) or "relu"; `exact` as for matmul_nt. Tasks may share tokens; out's rows are summed into.
    Nothing is written when an argument is refused (KernelError).
    """
    what = "ggml ffn_tasks"
    words, big = portable.pack_tasks(x, tasks, act, out, what, FfnWeights, KernelError, FFN_MAX_TOKENS)
    if words:
        packed = array("q", words)  # [tasks, _TASK_WORDS]
        _run(x, packed.buffer_info()[0], len(packed) // _TASK_WORDS, act, out, exact, what, tasks)
    for task in big:
        _ffn_matmuls(x, task, act, out, exact)


def ffn_routed(
    x: torch.Tensor,
    table: portable.RoutedTable,
    ids: torch.Tensor,
    weights: torch.Tensor,
    act: str,
    out: torch.Tensor,
    exact: bool = True,
) -> None:
    """`ffn_tasks` with the tasks of a routing: out [T, D] += weights[t, k] * the FFN of expert ids[t, k] (a row of
    `table`, a RoutedTable of FfnWeights) of x[t], for ids, weights [T, K]. The tasks come from the routing in a few
    tensor ops (a decode step's per-expert task objects cost more than its kernel's own overhead)."""
    what = "ggml ffn_routed"

    def run(packed: int, n: int) -> None:
        _run(x, packed, n, act, out, exact, what, ())

    def matmuls(*task) -> None:
        _ffn_matmuls(x, FfnTask(*task), act, out, exact)

    portable.run_routed(x, table, ids, weights, act, out, what, KernelError, FFN_MAX_TOKENS, run, matmuls)


def _run(x: torch.Tensor, packed: int, n: int, act: str, out: torch.Tensor, exact: bool, what: str, tasks) -> None:
    """The native call on n packed tasks at address `packed`; on a refusal, `tasks`' tokens say which."""
    fn = portable.require(lib(), what, "ggml", "use the torch path").tmg_ffn_tasks
    portable.run_tasks(fn, x, packed, n, act, out, (int(exact),), what, "ggml", tasks, KernelError)
