"""FP8 weights on the CPU: float8 e4m3 bytes with fp32 scales per 128x128 block (DeepSeek-V3 checkpoints),
dequantized and multiplied by native kernels.

A weight W [R, C] is `data` (torch.float8_e4m3fn [R, C], rows contiguous; a row slice of a bigger matrix
is fine) and `scale` (fp32 [ceil(R/128), ceil(C/128)]): W[i, j] = float(data[i, j]) * scale[i // 128, j // 128].

The kernels (`csrc_portable/fp8.c`) need only AVX2 + FMA + F16C: they are in the portable library
(`kernels.portable`, with the GGUF kernels), apart from the main AVX512 one: every x86-64 CPU of the last decade.
Where they cannot (CPU, compiler, `TILEMEM_KERNELS=0`), `available()` is False and callers use torch.
On CPUs with AVX512-BF16, prefill sizes (GEMM_MIN_TOKENS, FFN_GEMM_MIN_TOKENS) take `fp8_gemm.c`'s GEMM (`gemm_nt`,
`gemm_on()`): exact products, as the other paths.

`ffn_tasks` runs a MoE layer's routed experts (or tiles of them) as gated FFNs in one native call.

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

from tilemem.kernels import portable

log = logging.getLogger(__name__)

BLOCK = 128
"""Rows and columns of W per scale."""
NT_MAX_TOKENS = 64
"""Most tokens matmul_nt streams the fp8 weights for (8 per pass); more (prefill) dequantize rows of W
`PREFILL_BYTES` at a time and run torch's fp32 GEMM on them. Where the two meet on one Zen 1 core (the
kernel: ~13 GMAC/s at any N; torch: 12 at 64 tokens, 14 at 128)."""
GEMM_MIN_TOKENS = 8
"""Fewest tokens matmul_nt hands to the prefill GEMM of AVX512-BF16 CPUs (`gemm_nt`) where it runs. Zen 4, 2 threads,
2048 x 2048 and 2048 x 1024, GMAC/s: bf16-valued x (VDPBF16PS) 64-108 at 8 tokens against 24-66 streamed, 155-200
from 32 on against 49-91 (torch's bf16 GEMM: 58-97 at 8, 161-213 from 32); other x (fp32 FMAs) 39-70 at 8, 87-102
from 32 on (old: 49-91)."""
NN_MAX_TOKENS = 24
"""Most tokens matmul_nn streams the fp8 weights for; more go the prefill way (the kernel: ~9-11 GMAC/s on
one Zen 1 core; torch: 10 at 32 tokens)."""
PREFILL_BYTES = 8 << 20
"""fp32 bytes of W a prefill matmul dequantizes at once."""
FFN_MAX_TOKENS = 24
"""Most tokens an `ffn_tasks` task runs with in the fused kernel (8 per pass over its weights); a task with
more (prefill) runs as matmuls from Python (dequantized blocks + torch's GEMM where they have that many)."""
FFN_GEMM_MIN_TOKENS = 8
"""Fewest tokens a task runs with by the AVX512-BF16 GEMM (`csrc_portable/fp8_gemm.c`) where it runs, instead of the
fused kernel (FFN_MAX_TOKENS)."""
ACTS = portable.ACTS
_TORCH_ACTS = portable.TORCH_ACTS
_TASK_WORDS = 17
"""int64 words of a `tmp_fp8_ffn_task`: 3 matrices of 4, then n, down_t, ntok, tok, weight."""

_UNSUPPORTED = 3
"""TMP_EUNSUPPORTED: a kernel that does not run here or on this input (nothing written)."""
_vp, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@functools.cache
def lib() -> ctypes.CDLL | None:
    """The loaded fp8 library, or None where it cannot run here (CPU, compiler, `TILEMEM_KERNELS=0`)."""
    out = portable.load()
    if out is None:
        return None
    out.tmp_fp8_dequantize.argtypes = [_vp, _i64, _vp, _i64, _i64, _i64, _i64, _vp, _i64, _int]
    matmul = [_vp, _i64, _i64, _vp, _i64, _i64, _i64, _vp, _i64, _vp, _i64, _int]
    out.tmp_fp8_matmul_nt.argtypes = out.tmp_fp8_matmul_nn.argtypes = matmul
    out.tmp_fp8_gemm_nt.argtypes = [*matmul[:-1], _int, _int]
    ffn = [_vp, _i64, _vp, _i64, _i64, _i64, _vp, _i64, _int, _int, _int]
    out.tmp_fp8_ffn_tasks.argtypes = out.tmp_fp8_ffn_gemm.argtypes = ffn
    out.tmp_fp8_bf16_path.argtypes = out.tmp_fp8_lut_path.argtypes = [_int]
    out.tmp_fp8_ffn_task_size.restype = _i64
    if out.tmp_fp8_ffn_task_size() != 8 * _TASK_WORDS:
        log.warning("fp8 kernels unavailable, using torch: tmp_fp8_ffn_task is not %d int64 words", _TASK_WORDS)
        return None
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
    status = portable.require(lib(), "fp8 dequantize", "fp8", "use the torch path").tmp_fp8_dequantize(
        data.data_ptr(), data.stride(0), scale.data_ptr(), scale.stride(0), start, stop - start, data.shape[1],
        out.data_ptr(), out.stride(0), torch.get_num_threads(),
    )  # fmt: skip
    portable.check_status(status, "fp8 dequantize", "fp8")
    return out


def _streamed(kind: str, x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y (zeroed) = the native `tmp_fp8_<kind>` of x and W (data, scale), streaming W's fp8 bytes once."""
    r, c = data.shape
    status = getattr(portable.require(lib(), f"fp8 {kind}", "fp8", "use the torch path"), f"tmp_fp8_{kind}")(
        x.data_ptr(), x.stride(0), x.shape[0], data.data_ptr(), data.stride(0), r, c, scale.data_ptr(),
        scale.stride(0), y.data_ptr(), y.stride(0), torch.get_num_threads(),
    )  # fmt: skip
    portable.check_status(status, f"fp8 {kind}", "fp8")
    return y


def gemm_nt(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, fp32_x: bool = False) -> torch.Tensor | None:
    """y = x @ W^T, fp32 [N, R], by the prefill GEMM of AVX512-BF16 CPUs (`csrc_portable/fp8_gemm.c`: exact
    products), or None where it does not run: no avx512bf16 (or `TILEMEM_FP8_BF16=0`), or x [N, C] (fp32) is not
    all bf16 numbers (as a bf16 model's activations are: VDPBF16PS) and not `fp32_x` (then fp32 FMAs)."""
    scale = _check_weight(data, scale, "fp8 gemm_nt")
    x = _check_x(x, data.shape[1], "C", "fp8 gemm_nt")
    (n, c), r = x.shape, data.shape[0]
    y = torch.empty(n, r, dtype=torch.float32)  # [N, R]
    if y.numel() == 0 or c == 0:
        return y.zero_()
    status = portable.require(lib(), "fp8 gemm_nt", "fp8", "use the torch path").tmp_fp8_gemm_nt(
        x.data_ptr(), x.stride(0), n, data.data_ptr(), data.stride(0), r, c, scale.data_ptr(), scale.stride(0),
        y.data_ptr(), y.stride(0), int(fp32_x), torch.get_num_threads(),
    )  # fmt: skip
    if status == _UNSUPPORTED:
        return None
    portable.check_status(status, "fp8 gemm_nt", "fp8")
    return y


def matmul_nt(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = x @ W^T, fp32 [N, R], for x fp32 [N, C] (a linear layer's forward).

    Up to NT_MAX_TOKENS tokens (decode), W's fp8 rows are streamed once per 8 tokens, split over threads by
    rows; more tokens (prefill) dequantize W in row blocks and call torch's fp32 GEMM on each.
    """
    scale = _check_weight(data, scale, "fp8 matmul_nt")
    x = _check_x(x, data.shape[1], "C", "fp8 matmul_nt")
    n, (r, c) = x.shape[0], data.shape
    if n >= GEMM_MIN_TOKENS:
        y = gemm_nt(x, data, scale, fp32_x=True)
        if y is not None:
            return y
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
    return _streamed("matmul_nt", x, data, scale, y)


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
    return _streamed("matmul_nn", x, data, scale, y)


Weight = tuple[torch.Tensor, torch.Tensor]
"""An fp8 matrix as (data float8_e4m3fn [R, C] with contiguous rows, scale fp32 [ceil(R/128), ceil(C/128)])."""


@dataclass(frozen=True, eq=False)
class FfnWeights:
    """One expert's (or tile's) fp8 FFN weights, checked once here (ValueError) and packed for the kernel:
    build it when the weights are loaded or placed, and pair it with each step's tokens in an `FfnTask`."""

    gate: Weight
    """[n, D]."""
    up: Weight
    """[n, D]."""
    down: Weight
    """[D, n] (a checkpoint's down_proj), or [n, D] with `down_t` (a tile's down^T rows)."""
    down_t: bool = False
    """Whether `down` is stored transposed, [n, D]."""
    n: int = field(init=False)
    """Neurons (rows of gate and up)."""
    hidden: int = field(init=False)
    """D (columns of gate and up)."""
    words: tuple[int, ...] = field(init=False, repr=False)
    """The three `tmp_fp8_matrix` structs and n, down_t (pointers into the tensors above)."""
    _keep: tuple[torch.Tensor, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not all(isinstance(w, tuple) and len(w) == 2 for w in (self.gate, self.up, self.down)):
            raise ValueError("fp8 FfnWeights: gate, up and down must each be a (data, scale) pair of tensors")
        data = self.gate[0]
        if not isinstance(data, torch.Tensor) or data.dim() != 2:
            raise ValueError(f"fp8 FfnWeights: gate data must be a 2-D tensor [n, D], got {data!r:.80}")
        n, d = data.shape
        keep: list[torch.Tensor] = []
        words = _matrix(self.gate, n, d, "fp8 FfnWeights gate", keep)
        words += _matrix(self.up, n, d, "fp8 FfnWeights up", keep)
        words += _matrix(self.down, *((n, d) if self.down_t else (d, n)), "fp8 FfnWeights down", keep)
        for name, value in (("n", n), ("hidden", d), ("words", (*words, n, int(self.down_t))), ("_keep", tuple(keep))):
            object.__setattr__(self, name, value)

    @classmethod
    def from_tile(cls, data: torch.Tensor, scale: torch.Tensor) -> FfnWeights:
        """A tile store's block, data float8_e4m3fn [3, n, D] (gate, up and down^T rows, `down_t`) with scale
        fp32 [3, ceil(n/128), ceil(D/128)]: the same as FfnWeights of its three slices, in one check of the
        block (~2.5x cheaper, ~30 us on Zen 1: a tile cache slot's view is packed at every use)."""
        what = "fp8 FfnWeights.from_tile"
        ok = isinstance(data, torch.Tensor) and isinstance(scale, torch.Tensor)
        if not (ok and data.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and data.is_cpu):
            got = f"{data.dtype}, {scale.dtype}" if ok else f"{type(data).__name__}, {type(scale).__name__}"
            raise ValueError(f"{what}: data must be float8_e4m3fn and scale float32 CPU tensors, got {got}")
        _, n, d = data.shape if data.dim() == 3 and data.shape[0] == 3 else (0, -1, -1)
        want = (3, -(-n // BLOCK), -(-d // BLOCK))
        if n < 0 or tuple(scale.shape) != want or not scale.is_cpu:
            raise ValueError(
                f"{what}: data must be [3, n, D] with scale [3, ceil(n/128), ceil(D/128)], got data "
                f"{tuple(data.shape)} and scale {tuple(scale.shape)}"
            )
        ds, ss = data.stride(), scale.stride()
        if (d > 1 and ds[2] != 1) or (n > 1 and ds[1] < d) or (want[2] > 1 and ss[2] != 1):
            raise ValueError(f"{what}: rows of data and scale must be contiguous, got strides {ds} and {ss}")
        words: list[int] = []
        for i in range(3):
            words += [data.data_ptr() + i * ds[0], ds[1], scale.data_ptr() + 4 * i * ss[0], ss[1]]
        out = object.__new__(cls)
        (dg, du, dd), (sg, su, sd) = data.unbind(0), scale.unbind(0)  # one call each, not three slicings
        fields = {"gate": (dg, sg), "up": (du, su), "down": (dd, sd), "down_t": True}
        fields |= {"n": n, "hidden": d, "words": (*words, n, 1), "_keep": (data, scale)}
        for name, value in fields.items():
            object.__setattr__(out, name, value)
        return out


class FfnTask(NamedTuple):
    """One `ffn_tasks` task: out[tok[j]] += weight[j] * down(act(gate x) * (up x)) for x = x[tok[j]]."""

    weights: FfnWeights
    tok: torch.Tensor
    """int32 [N], contiguous: the rows of x and out, in [0, T)."""
    weight: torch.Tensor
    """fp32 [N], contiguous: the routing weights."""


def _matrix(w: Weight, rows: int, cols: int, what: str, keep: list[torch.Tensor]) -> list[int]:
    """A `tmp_fp8_matrix` (w, ldw, scale, lds) of an [rows, cols] weight; raise ValueError unless it is one."""
    data, scale = w
    _check_weight(data, scale, what)
    if tuple(data.shape) != (rows, cols):
        raise ValueError(f"{what}: shape {tuple(data.shape)}, but the task needs [{rows}, {cols}]")
    if scale.dim() == 2 and scale.shape[1] > 1 and scale.stride(1) != 1:
        scale = scale.contiguous()
    keep += [data, scale]
    return [data.data_ptr(), data.stride(0), scale.data_ptr(), scale.stride(0)]


def gemm_on() -> bool:
    """Whether the AVX512-BF16 GEMM paths run here (`gemm_nt`, prefill-sized FFN tasks): the CPU has avx512bf16 and
    `TILEMEM_FP8_BF16` is not 0."""
    native = lib()
    return native is not None and bool(native.tmp_fp8_bf16_path(-1))


def _big_tasks(x: torch.Tensor, tasks: Sequence[FfnTask], act: str, out: torch.Tensor, what: str, bf16_h: bool) -> None:
    """Prefill-sized tasks (checked): by the AVX512-BF16 GEMM in one native call where it runs (checkpoint-layout
    downs), the others as matmuls."""
    words: list[int] = []
    if gemm_on():
        rest = []
        for task in tasks:
            if task.weights.down_t:
                rest.append(task)
            else:
                words += task.weights.words
                words += (task.tok.numel(), task.tok.data_ptr(), task.weight.data_ptr())
        tasks = rest
    if words:
        packed = array("q", words)  # [tasks, _TASK_WORDS]
        fn, n = lib().tmp_fp8_ffn_gemm, len(packed) // _TASK_WORDS
        portable.run_tasks(fn, x, packed.buffer_info()[0], n, act, out, (int(bf16_h),), what, "fp8", (), ValueError)
    for task in tasks:
        _ffn_matmuls(x, task, act, out, bf16_h)


def _ffn_max_tokens() -> int:
    """Most tokens a task runs with in the fused (streaming) kernel: FFN_GEMM_MIN_TOKENS - 1 where the GEMM runs."""
    return FFN_GEMM_MIN_TOKENS - 1 if gemm_on() else FFN_MAX_TOKENS


def _ffn_matmuls(x: torch.Tensor, task: FfnTask, act: str, out: torch.Tensor, bf16_h: bool) -> None:
    """One prefill-sized task by the matmuls (their prefill paths: dequantized blocks + torch's GEMM)."""
    w, tok = task.weights, task.tok.long()
    xt = x.index_select(0, tok)  # [N, D]
    h = _TORCH_ACTS[act](matmul_nt(xt, *w.gate)) * matmul_nt(xt, *w.up)  # [N, n]
    if bf16_h:
        h = h.bfloat16().float()
    y = matmul_nn(h, *w.down) if w.down_t else matmul_nt(h, *w.down)  # [N, D]
    out.index_add_(0, tok, y * task.weight[:, None])


def ffn_tasks(x: torch.Tensor, tasks: Sequence[FfnTask], act: str, out: torch.Tensor, bf16_h: bool = False) -> None:
    """out [T, D] += every task's gated FFN of its tokens' rows of x [T, D] (both fp32 with contiguous rows).

    Tasks of up to FFN_MAX_TOKENS tokens run in one native call (one parallel region: threads split each
    task's neurons, then the checkpoint-layout downs by output rows); the others, prefill-sized, as matmuls.
    `act`: "silu", "gelu" (erf) or "relu". Tasks may share tokens; out's rows are summed into, never set.
    `bf16_h`: the hidden activations act(gate x) * (up x) (fp32 sums) are rounded to bf16 before the down, as a
    bf16 model's kernels (`kernels.moe`) round them: pass it for a bf16 model's activations; else they stay fp32.
    The weights were checked when their FfnWeights was built; per call only x, out, tok and weight are.
    """
    what = "fp8 ffn_tasks"
    words, big = portable.pack_tasks(x, tasks, act, out, what, FfnWeights, ValueError, _ffn_max_tokens())
    if words:
        packed = array("q", words)  # [tasks, _TASK_WORDS]
        _run(x, packed.buffer_info()[0], len(packed) // _TASK_WORDS, act, out, what, tasks, bf16_h)
    _big_tasks(x, big, act, out, what, bf16_h)


def ffn_routed(
    x: torch.Tensor,
    table: portable.RoutedTable,
    ids: torch.Tensor,
    weights: torch.Tensor,
    act: str,
    out: torch.Tensor,
    bf16_h: bool = False,
) -> None:
    """`ffn_tasks` with the tasks of a routing: out [T, D] += weights[t, k] * the FFN of expert ids[t, k] (a row of
    `table`, a RoutedTable of FfnWeights) of x[t], for ids, weights [T, K] (see `ggml.ffn_routed`); `bf16_h` as
    for ffn_tasks."""
    what = "fp8 ffn_routed"

    def run(packed: int, n: int) -> None:
        _run(x, packed, n, act, out, what, (), bf16_h)

    big: list[FfnTask] = []

    def matmuls(*task) -> None:
        big.append(FfnTask(*task))

    portable.run_routed(x, table, ids, weights, act, out, what, ValueError, _ffn_max_tokens(), run, matmuls)
    _big_tasks(x, big, act, out, what, bf16_h)


def _run(x: torch.Tensor, packed: int, n: int, act: str, out: torch.Tensor, what: str, tasks, bf16_h: bool) -> None:
    """The native call on n packed tasks at address `packed`; on a refusal, `tasks`' tokens say which."""
    fn = portable.require(lib(), what, "fp8", "use the torch path").tmp_fp8_ffn_tasks
    portable.run_tasks(fn, x, packed, n, act, out, (int(bf16_h),), what, "fp8", tasks, ValueError)
