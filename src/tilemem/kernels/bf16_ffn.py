"""A MoE layer's routed bf16 experts as gated FFNs in one native call (`csrc_portable/bf16_ffn.c`, AVX2 + FMA): what
the all-resident engine runs them with on CPUs without AVX512, where the main library's fused kernel cannot run.

The weights are read where they lie, in the checkpoint's layout (gate and up [n, D], down [D, n], rows contiguous),
decoded exactly in registers and multiplied in fp32. As `kernels.fp8.ffn_tasks`:

packed = [FfnWeights(gate, up, down) for each expert]                   # once per layer
ffn_tasks(x, [FfnTask(packed[e], tok, weight), ...], "silu", out)       # every step: out [T, D] += ...
ffn_routed(x, portable.RoutedTable(packed), ids, weights, "silu", out)  # the same, tasks from a routing [T, K]

Shape legend: T tokens, D hidden, n neurons of an expert, N tokens of a task.
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

FFN_MAX_TOKENS = 128
"""Most tokens a task runs with in the fused kernel (passes of 8 over each block of 64 rows, from the cache); a task
with more (prefill) runs as torch's fp32 GEMMs on its weights upcast (exact). Where they meet for a 1024 x 2048
expert on 2 Zen 1 cores: the kernel ~0.24 ms per token, torch ~12 ms (the upcast) + 0.13 ms per token: 7.5 vs 16
ms at 32 tokens, 15 vs 20 at 64, 30 vs 32 at 128."""
ACTS = portable.ACTS
_TORCH_ACTS = portable.TORCH_ACTS
_TASK_WORDS = 10
"""int64 words of a `tmp_bf16_ffn_task`: gate, ldg, up, ldu, down, ldd, n, then ntok, tok, weight."""

_vp, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@functools.cache
def lib() -> ctypes.CDLL | None:
    """The loaded portable library with the bf16 FFN typed, or None where it cannot run here (CPU, compiler,
    `TILEMEM_KERNELS=0`)."""
    out = portable.load()
    if out is None:
        return None
    out.tmp_bf16_ffn_tasks.argtypes = [_vp, _i64, _vp, _i64, _i64, _i64, _vp, _i64, _int, _int]
    out.tmp_bf16_ffn_task_size.restype = _i64
    if out.tmp_bf16_ffn_task_size() != 8 * _TASK_WORDS:
        log.warning("bf16 FFN kernel unavailable: tmp_bf16_ffn_task is not %d int64 words", _TASK_WORDS)
        return None
    return out


def available() -> bool:
    """Whether the fused bf16 FFN kernel can run here (CPU with AVX2 + FMA + F16C, a C compiler, not disabled)."""
    return lib() is not None


def _matrix(w: torch.Tensor, rows: int, cols: int, what: str) -> list[int]:
    """(pointer, row stride) of a bf16 CPU matrix [rows, cols] with contiguous rows; KernelError unless it is one."""
    if not isinstance(w, torch.Tensor) or w.dtype != torch.bfloat16 or w.device.type != "cpu":
        got = f"{w.dtype} on {w.device}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise KernelError(f"{what}: must be a bfloat16 CPU tensor, got {got}")
    if tuple(w.shape) != (rows, cols):
        raise KernelError(f"{what}: shape {tuple(w.shape)}, but the expert needs [{rows}, {cols}]")
    if (cols > 1 and w.stride(1) != 1) or (rows > 1 and w.stride(0) < cols):
        raise KernelError(
            f"{what}: rows must be contiguous (stride(1) == 1, stride(0) >= columns), got strides {w.stride()}; "
            "pass w.contiguous()"
        )
    return [w.data_ptr(), max(w.stride(0), cols)]


@dataclass(frozen=True, eq=False)
class FfnWeights:
    """One expert's bf16 FFN weights, checked once here (KernelError) and packed for the kernel: build it when the
    weights are loaded, and pair it with each step's tokens in an `FfnTask`. Holds the tensors (no copy)."""

    gate: torch.Tensor
    """bf16 [n, D]."""
    up: torch.Tensor
    """bf16 [n, D]."""
    down: torch.Tensor
    """bf16 [D, n] (a checkpoint's down_proj)."""
    n: int = field(init=False)
    """Neurons (rows of gate and up)."""
    hidden: int = field(init=False)
    """D (columns of gate and up)."""
    words: tuple[int, ...] = field(init=False, repr=False)
    """gate, ldg, up, ldu, down, ldd, n of the `tmp_bf16_ffn_task` (pointers into the tensors above)."""

    def __post_init__(self) -> None:
        if not isinstance(self.gate, torch.Tensor) or self.gate.dim() != 2:
            raise KernelError(f"bf16 FfnWeights: gate must be a 2-D tensor [n, D], got {self.gate!r:.80}")
        n, d = self.gate.shape
        words = _matrix(self.gate, n, d, "bf16 FfnWeights gate")
        words += _matrix(self.up, n, d, "bf16 FfnWeights up")
        words += _matrix(self.down, d, n, "bf16 FfnWeights down")
        for name, value in (("n", n), ("hidden", d), ("words", (*words, n))):
            object.__setattr__(self, name, value)


class FfnTask(NamedTuple):
    """One `ffn_tasks` task: out[tok[j]] += weight[j] * down(act(gate x) * (up x)) for x = x[tok[j]]."""

    weights: FfnWeights
    tok: torch.Tensor
    """int32 [N], contiguous: the rows of x and out, in [0, T)."""
    weight: torch.Tensor
    """fp32 [N], contiguous: the routing weights."""


def _ffn_matmuls(x: torch.Tensor, task: FfnTask, act: str, out: torch.Tensor) -> None:
    """One prefill-sized task by torch's fp32 GEMMs on the weights upcast (bf16 -> fp32 is exact)."""
    w, tok = task.weights, task.tok.long()
    xt = x.index_select(0, tok)  # [N, D]
    h = _TORCH_ACTS[act](xt @ w.gate.float().t()) * (xt @ w.up.float().t())  # [N, n]
    out.index_add_(0, tok, (h @ w.down.float().t()) * task.weight[:, None])  # [N, D]


def ffn_tasks(x: torch.Tensor, tasks: Sequence[FfnTask], act: str, out: torch.Tensor) -> None:
    """out [T, D] += every task's gated FFN of its tokens' rows of x [T, D] (both fp32 with contiguous rows).

    Tasks of up to FFN_MAX_TOKENS tokens run in one native call (one parallel region: threads split each task's
    neurons, then the downs by output rows); the others, prefill-sized, as torch's fp32 GEMMs.
    `act`: "silu", "gelu" (erf) or "relu". Tasks may share tokens; out's rows are summed into, never set.
    The weights were checked when their FfnWeights was built; per call only x, out, tok and weight are.
    Raises KernelError for bad input.
    """
    what = "bf16 ffn_tasks"
    words, big = portable.pack_tasks(x, tasks, act, out, what, FfnWeights, KernelError, FFN_MAX_TOKENS)
    if words:
        packed = array("q", words)  # [tasks, _TASK_WORDS]
        _run(x, packed.buffer_info()[0], len(packed) // _TASK_WORDS, act, out, what, tasks)
    for task in big:
        _ffn_matmuls(x, task, act, out)


def ffn_routed(
    x: torch.Tensor, table: portable.RoutedTable, ids: torch.Tensor, weights: torch.Tensor, act: str, out: torch.Tensor
) -> None:
    """`ffn_tasks` with the tasks of a routing: out [T, D] += weights[t, k] * the FFN of expert ids[t, k] (a row of
    `table`, a RoutedTable of FfnWeights) of x[t], for ids, weights [T, K]: a step's tasks in a few tensor ops."""
    what = "bf16 ffn_routed"

    def run(packed: int, n: int) -> None:
        _run(x, packed, n, act, out, what, ())

    def matmuls(*task) -> None:
        _ffn_matmuls(x, FfnTask(*task), act, out)

    portable.run_routed(x, table, ids, weights, act, out, what, KernelError, FFN_MAX_TOKENS, run, matmuls)


def _run(x: torch.Tensor, packed: int, n: int, act: str, out: torch.Tensor, what: str, tasks) -> None:
    """The native call on n packed tasks at address `packed`; on a refusal, `tasks`' tokens say which."""
    fn = portable.require(lib(), what, "bf16 FFN", "use the per-expert path").tmp_bf16_ffn_tasks
    portable.run_tasks(fn, x, packed, n, act, out, (), what, "bf16 FFN", tasks, KernelError)
