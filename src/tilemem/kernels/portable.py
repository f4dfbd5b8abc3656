"""The portable native library: `csrc_portable/` (the FP8 and GGUF kernels) built for AVX2 + FMA + F16C, which
every x86-64 CPU of the last decade has, AVX512 ones included, apart from the main AVX512 library.

`fp8.py` and `ggml.py` wrap its functions; this module builds and loads it once, and holds what they share.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from tilemem import sysinfo
from tilemem.errors import KernelError, KernelMemoryError
from tilemem.kernels import library

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc_portable")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared", "-fvisibility=hidden", "-ffp-contract=off"]
"""`-ffp-contract=off`: GGUF blocks decode bit for bit as numpy decodes them (no product and sum fused unasked;
the kernels' explicit FMA intrinsics stay fused)."""
NAME = "tilemem-portable"
ACTS = {"silu": 0, "gelu": 1, "relu": 2}
"""Activation name -> the kernels' code (`tmp_act` / `tmg_act` in the headers): torch's F.silu, F.gelu, F.relu."""
TORCH_ACTS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def cpu_supported() -> bool:
    """Whether this CPU reports the instruction sets the kernels use (AVX2, FMA, F16C)."""
    return {"avx2", "fma", "f16c"} <= sysinfo.cpu_flags()


def build(force: bool = False) -> Path:
    """Compile `csrc_portable/` (once per sources and flags) into the cached library; returns its path."""
    return library.build(force, CSRC, FLAGS, NAME)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The loaded library, or None where it cannot run here (CPU, compiler, `TILEMEM_KERNELS=0`)."""
    if os.environ.get("TILEMEM_KERNELS", "1") == "0" or not cpu_supported():
        return None
    try:
        return ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as exc:
        log.warning("portable kernels (FP8, GGUF) unavailable, using torch: %s", exc)
        return None


def require(native: ctypes.CDLL | None, what: str, kind: str, fallback: str) -> ctypes.CDLL:
    """`native` (a module's typed library), or KernelError naming `kind` (fp8, ggml, x12_tiles) and `fallback`."""
    if native is None:
        raise KernelError(f"{what}: the {kind} kernels cannot run here (see {kind}.available()); {fallback}")
    return native


def check_status(status: int, what: str, kind: str) -> None:
    """Raise for a kernel's nonzero status: 1 (TMP_ENOMEM) as KernelMemoryError, others as KernelError."""
    if status == 1:
        raise KernelMemoryError(f"{what}: the {kind} kernel could not allocate its working memory; free memory")
    if status != 0:
        raise KernelError(f"{what}: the {kind} kernel failed with status {status}")


def check_task(task, d: int, what: str, weights_type: type, error: type[Exception]) -> None:
    """Raise `error` unless `task` is a (weights, tok, weight) FFN task of `weights_type` for hidden size d: tok
    int32 and weight fp32, contiguous CPU vectors of one length (the detailed checks of a refused call)."""
    if not isinstance(task, tuple) or len(task) != 3 or not isinstance(task[0], weights_type):
        kind = weights_type.__module__.rsplit(".", 1)[-1]  # fp8 / ggml
        article = "an" if kind == "fp8" else "a"  # "an eff-pee-eight", "a gee-gee-em-el"
        raise error(f"{what}: expected {article} {kind}.FfnTask(FfnWeights, tok, weight), got {type(task).__name__}")
    weights, tok, weight = task
    if weights.hidden != d:
        raise error(f"{what}: its weights have hidden size {weights.hidden}, but x has {d} columns")
    for name, v, dtype in (("tok", tok, torch.int32), ("weight", weight, torch.float32)):
        if not isinstance(v, torch.Tensor) or v.dtype != dtype or not v.is_cpu:
            got = f"{v.dtype} on {v.device}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise error(f"{what}: {name} must be a {dtype} CPU tensor, got {got}")
        if v.dim() != 1 or not v.is_contiguous():
            raise error(f"{what}: {name} must be a contiguous vector, got shape {tuple(v.shape)}")
    if weight.shape != tok.shape:
        raise error(f"{what}: weight has {weight.numel()} values for {tok.numel()} tokens")


def check_tokens(tok: torch.Tensor, t: int, what: str, error: type[Exception]) -> None:
    """Raise `error` unless every token row of `tok` is in [0, t)."""
    if tok.numel() and (int(tok.min()) < 0 or int(tok.max()) >= t):
        raise error(f"{what}: token rows must be in [0, {t}) (the rows of x), got {tok.tolist()}")


def check_io(x: torch.Tensor, out: torch.Tensor, act: str, what: str, error: type[Exception]) -> None:
    """Raise `error` unless x and out are [T, D] fp32 CPU tensors with contiguous rows and `act` is known (the
    checks of a fused FFN call's arguments besides its tasks)."""
    if act not in ACTS:
        raise error(f"{what}: act must be one of {sorted(ACTS)}, got {act!r}")
    for name, v in (("x", x), ("out", out)):
        if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or not v.is_cpu or v.dim() != 2:
            got = f"{v.dtype} {tuple(v.shape)} on {v.device}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise error(f"{what}: {name} must be a 2-D float32 CPU tensor [T, D], got {got}")
        if v.shape[1] > 1 and v.stride(1) != 1:
            raise error(f"{what}: {name}'s rows must be contiguous, got strides {v.stride()}")
    if out.shape != x.shape:
        raise error(f"{what}: out has shape {tuple(out.shape)}, but x has {tuple(x.shape)}")


def pack_tasks(
    x: torch.Tensor,
    tasks,
    act: str,
    out: torch.Tensor,
    what: str,
    weights_type: type,
    error: type[Exception],
    max_tokens: int,
) -> tuple[list[int], list]:
    """The argument checks and packing an `ffn_tasks` call shares between the FP8 and GGUF kernels: x and out
    [T, D] fp32 with contiguous rows, `act` known, every task checked (the common case in a few attribute reads,
    a bad one by `check_task`). Returns (the int64 words of the tasks of up to `max_tokens` tokens, each its
    weights' `words` then ntok, tok and weight pointers; the larger tasks, for matmuls). Raises `error`."""
    check_io(x, out, act, what, error)
    t, d = x.shape
    words: list[int] = []
    big: list = []
    i32, f32 = torch.int32, torch.float32
    for q, task in enumerate(tasks):
        try:  # the common case in few attribute reads; anything else gets the detailed checks
            weights, tok, weight = task
            ok = (
                isinstance(weights, weights_type) and weights.hidden == d and tok.dtype == i32
                and weight.dtype == f32 and tok.is_cpu and weight.is_cpu and tok.dim() == 1
                and weight.shape == tok.shape and tok.is_contiguous() and weight.is_contiguous()
            )  # fmt: skip
        except (AttributeError, TypeError, ValueError):
            ok = False
        if not ok:
            check_task(task, d, f"{what} task {q}", weights_type, error)
            weights, tok, weight = task
        ntok = tok.numel()
        if ntok == 0 or weights.n == 0:
            continue
        if ntok > max_tokens:  # checked here; the kernel checks its own tasks' tokens
            check_tokens(tok, t, f"{what} task {q}", error)
            big.append(task)
            continue
        words += weights.words
        words += (ntok, tok.data_ptr(), weight.data_ptr())
    return words, big


class RoutedTable:
    """A layer's experts for a fused FFN kernel (`fp8.ffn_routed`, `ggml.ffn_routed`): their packed words, one row
    per expert, built once, so a step's tasks come from its routing in a few tensor ops instead of one `FfnTask`
    (and its conversions) per routed expert. `experts`: the layer's FfnWeights, in expert order."""

    def __init__(self, experts: list) -> None:
        self.experts = experts
        self.hidden = experts[0].hidden if experts else 0
        self.words = torch.tensor([w.words for w in experts], dtype=torch.int64)  # [E, W]

    def check(self, x: torch.Tensor, what: str, error: type[Exception]) -> None:
        """Raise `error` unless x's rows have the experts' hidden size."""
        if x.shape[1] != self.hidden:
            raise error(f"{what}: the experts have hidden size {self.hidden}, but x has {x.shape[1]} columns")

    def tasks(self, ids: torch.Tensor, weights: torch.Tensor, max_tokens: int, error: type[Exception]):
        """Routing ids [T, K] (expert indices) and weights [T, K] -> (task words [tasks, W + 3] for the kernel: each
        expert's words, then ntok and pointers to its tokens and weights; the large tasks of more than `max_tokens`
        tokens as (FfnWeights, tok, weight); the token and weight vectors the words point into, to keep alive).
        Raises `error` for an expert index outside the table."""
        e_count, width = self.words.shape
        t, k = ids.shape
        flat = ids.reshape(-1)  # [T*K]
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= e_count):
            raise error(f"routed ffn: expert ids must be in [0, {e_count}), got {sorted(set(flat.tolist()))}")
        if t == 1:  # decode: a task per routed slot (a repeated id is two tasks: both are summed into out)
            experts, counts = flat, torch.ones(k, dtype=torch.int64)
            tok = torch.zeros(k, dtype=torch.int32)
            wt = weights.reshape(-1).to(torch.float32).contiguous()
        else:
            order = torch.argsort(flat, stable=True)  # [T*K], grouped by expert
            experts, counts = torch.unique_consecutive(flat[order], return_counts=True)  # [tasks]
            tok = (order // k).to(torch.int32)
            wt = weights.reshape(-1)[order].to(torch.float32)
        starts = counts.cumsum(0) - counts  # [tasks]
        big = []
        if int(counts.max()) > max_tokens:
            for e, s, c in zip(experts.tolist(), starts.tolist(), counts.tolist(), strict=True):
                if c > max_tokens:
                    big.append((self.experts[e], tok[s : s + c], wt[s : s + c]))
            small = counts <= max_tokens
            experts, counts, starts = experts[small], counts[small], starts[small]
        words = torch.empty(experts.numel(), width + 3, dtype=torch.int64)  # [tasks, W + 3]
        words[:, :width] = self.words[experts]
        words[:, width] = counts
        words[:, width + 1] = tok.data_ptr() + 4 * starts
        words[:, width + 2] = wt.data_ptr() + 4 * starts
        return words, big, (tok, wt)


def run_routed(
    x: torch.Tensor,
    table: RoutedTable,
    ids: torch.Tensor,
    weights: torch.Tensor,
    act: str,
    out: torch.Tensor,
    what: str,
    error: type[Exception],
    max_tokens: int,
    run,
    matmuls,
) -> None:
    """An `ffn_routed` call of a fused FFN kernel module: x, out and `act` checked, the routing's tasks (`table.tasks`)
    of up to `max_tokens` tokens to `run(address, count)` (the module's native call), the larger ones to
    `matmuls(weights, tok, weight)`. Raises `error` for bad input."""
    check_io(x, out, act, what, error)
    table.check(x, what, error)
    words, big, _keep = table.tasks(ids, weights, max_tokens, error)  # _keep: what words point into
    if words.shape[0]:
        run(words.data_ptr(), words.shape[0])
    for task in big:
        matmuls(*task)


def run_tasks(
    fn,
    x: torch.Tensor,
    packed: int,
    n: int,
    act: str,
    out: torch.Tensor,
    extra: tuple,
    what: str,
    kind: str,
    tasks,
    error: type[Exception],
) -> None:
    """The native fused FFN call `fn` (a module's `*_ffn_tasks`) on n packed tasks at address `packed` for x and out
    [T, D] (`extra`: the kernel's arguments between the activation and the thread count); on a refusal (status 2,
    nothing written) `tasks`' tokens say which task was wrong; other failures as `check_status`."""
    t, d = x.shape
    status = fn(
        x.data_ptr(), max(x.stride(0), d), out.data_ptr(), max(out.stride(0), d), t, d, packed, n, ACTS[act], *extra,
        torch.get_num_threads(),
    )  # fmt: skip
    if status == 2:
        for q, task in enumerate(tasks):
            check_tokens(task.tok, t, f"{what} task {q}", error)
    check_status(status, what, kind)
