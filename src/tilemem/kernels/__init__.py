"""Native CPU kernels (AVX512-BF16): fused expert FFNs, decode attention and small-batch linears.
On CPUs with AMX-BF16, the expert FFNs' prefill GEMMs run on AMX tiles (`set_amx`, `TILEMEM_AMX`).

The C source ships with the package and is compiled on first use with the system C compiler into
a per-user cache (`$TILEMEM_CACHE`, default `~/.cache/tilemem`), keyed by the source and flags;
the shared library is written to a temp file and renamed, so a crash never leaves half a library.
Where the CPU lacks AVX512-BF16, no compiler is found, or `TILEMEM_KERNELS=0`, `available()` is
False and callers keep their torch path (same results up to bf16 rounding order).

Shape legend: T tokens, K experts per token, E experts, D hidden, I expert intermediate.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from tilemem import sysinfo
from tilemem.pages import MADV_HUGEPAGE, MADV_WILLNEED, drop_file_pages, madvise, populate_write

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_bf16.c")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp", "-fPIC", "-shared"]
ABI_VERSION = 7
ACTS = {"silu": 0, "gelu": 1, "relu": 2}
MAX_ROWS = 16
"""Largest token count the dense linear kernel takes; bigger batches are compute-bound GEMMs (oneDNN)."""

_vp, _i64, _int, _fp = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_float)


class X12(ctypes.Structure):
    """A bf16 matrix in 12 bits per weight, losslessly (mirrors `tm_x12` in cpu_bf16.c)."""

    _fields_ = [*((name, _vp) for name in ("lo", "hc", "tab", "xrow", "xval")), ("N", _i64), ("K", _i64)]


class FfnTask(ctypes.Structure):
    """One gated-FFN task (mirrors `tm_ffn_task` in cpu_bf16.c)."""

    _fields_ = [
        ("gate", _vp),
        ("up", _vp),
        ("down", _vp),
        ("n", _i64),
        ("ld_gu", _i64),
        ("ld_down", _i64),
        ("down_t", ctypes.c_int32),
        ("ntok", ctypes.c_int32),
        ("tok", _vp),
        ("scale", _vp),
        ("cgate", _vp),
        ("cup", _vp),
        ("cdown", _vp),
    ]


class AttnLayer(ctypes.Structure):
    """One attention layer's weights and options for decode (mirrors `tm_attn_layer` in cpu_bf16.c)."""

    _fields_ = [
        *((name, _vp) for name in ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "q_norm", "k_norm")),
        *((name, ctypes.c_int32) for name in ("qk_norm", "H", "Hkv", "hd")),
        *((name, ctypes.c_float) for name in ("eps", "scale", "clip")),
        ("fp32_rotate", ctypes.c_int32),
        *((name, _vp) for name in ("cq", "ck", "cv", "co")),
    ]


class DecodeLayer(ctypes.Structure):
    """One MoE decoder layer's weights and routing options for a fused decode step (mirrors
    `tm_decode_layer` in cpu_bf16.c): softmax top-k routing and routed experts in checkpoint layout."""

    _fields_ = [
        ("attn", AttnLayer),
        ("ln1", _vp),
        ("ln2", _vp),
        ("eps", ctypes.c_float),
        *((name, _vp) for name in ("router", "gate", "up", "down")),
        *((name, ctypes.c_int32) for name in ("E", "K", "I", "act", "norm_topk", "weights_bf16")),
        ("routed_scale", ctypes.c_float),
        *((name, _vp) for name in ("cgate", "cup", "cdown")),
    ]


def cpu_supported() -> bool:
    """Whether this CPU reports the instruction sets the kernels use."""
    return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= sysinfo.cpu_flags()


def amx_supported() -> bool:
    """Whether this CPU reports AMX with bf16 tiles (Intel Sapphire Rapids and later)."""
    return {"amx_tile", "amx_bf16"} <= sysinfo.cpu_flags()


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    return Path(os.environ.get("TILEMEM_CACHE", Path.home() / ".cache" / "tilemem")) / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def build(force: bool = False) -> Path:
    """Compile the kernels (once per source and flags); returns the shared library's path."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (install gcc or set CC)")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    out = cache_dir() / f"cpu_bf16-{key}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
        os.replace(tmp, out)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"compiling {SOURCE.name} failed:\n{exc.stderr}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _lib() -> ctypes.CDLL | None:
    if os.environ.get("TILEMEM_KERNELS", "1") == "0" or not cpu_supported():
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as exc:
        log.warning("native kernels unavailable, using torch: %s", exc)
        return None
    if lib.tm_abi_version() != ABI_VERSION:
        log.warning("native kernel ABI mismatch; using torch")
        return None
    lib.tm_linear_bf16.argtypes = [_vp, _i64, _i64, _i64, _vp, _i64, _i64, _vp, _vp, _i64, _int, _int]
    lib.tm_ffn_tasks_bf16.argtypes = [_vp, _vp, _i64, _i64, ctypes.POINTER(FfnTask), _i64, _int, _int, _vp, _vp]
    lib.tm_rmsnorm_bf16.argtypes = [_vp, _i64, _i64, _vp, ctypes.c_float, _vp, _int]
    attn = [ctypes.POINTER(AttnLayer), _vp, _i64, _i64, _vp, _vp, _vp, _vp, _i64, _vp, _vp, _vp, _int, _vp, _vp]
    lib.tm_attn_decode_bf16.argtypes = attn
    lib.tm_attn_prefill_bf16.argtypes = [_vp, _i64, _i64, _i64, _vp, _vp, _i64, _i64, _i64, _vp, *[_i64] * 5]
    lib.tm_attn_prefill_bf16.argtypes += [ctypes.c_float, _int]
    lib.tm_decode_layers_bf16.argtypes = [ctypes.POINTER(DecodeLayer), _i64, _vp, _i64, _i64, _vp, _vp, _vp, _vp]
    lib.tm_decode_layers_bf16.argtypes += [_i64, _vp, _vp, _int, _vp, _vp, _vp, _vp, _vp]
    lib.tm_moe_bf16.argtypes = [_vp, _vp, _i64, _i64, _i64, _vp, _vp, _i64, _i64, *[_vp] * 6, _int, _int, _vp, _vp]
    lib.tm_x12_table.argtypes = [_vp, _i64, _i64, _i64, _vp]
    lib.tm_x12_encode.argtypes = [_vp, _i64, _i64, _vp, _vp, _vp, _vp, _int]
    lib.tm_x12_exceptions.argtypes = [_vp, _i64, _i64, _vp, _vp, _vp, _int]
    lib.tm_x12_decode.argtypes = [ctypes.POINTER(X12), _i64, _i64, _vp, _int]
    lib.tm_amx_enable.argtypes = [_int]
    lib.tm_amx_enable(int(amx_supported() and os.environ.get("TILEMEM_AMX", "1") != "0"))
    return lib


def set_amx(on: bool) -> bool:
    """Routes the prefill GEMMs through AMX tiles (where the CPU and kernel allow) or AVX512-BF16;
    returns whether AMX is now on. On by default where supported; `TILEMEM_AMX=0` turns it off."""
    return bool(_lib().tm_amx_enable(int(on and amx_supported())))


def amx_enabled() -> bool:
    """Whether the prefill GEMMs run on AMX tiles (a process-wide switch in the library)."""
    return available() and bool(_lib().tm_amx_enabled())


def available() -> bool:
    """Whether the native kernels can run here (CPU, compiler, not disabled)."""
    return _lib() is not None


def usable(x: torch.Tensor) -> bool:
    """Whether `x` (an activation) can go through the kernels: bf16 on the CPU."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and available()


def linear(x: torch.Tensor, weight: torch.Tensor, x12: X12Matrix | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T -> [M, N] bf16 (fp32 accumulation); M <= MAX_ROWS, bf16 inputs. With
    `x12` (the same weights), the kernel reads that instead of `weight`."""
    x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    if weight.stride(1) != 1 and x12 is None:
        weight = weight.contiguous()
    y = torch.empty(m, n, dtype=torch.bfloat16)
    c = None if x12 is None else ctypes.byref(x12.struct)
    _lib().tm_linear_bf16(
        x.data_ptr(), m, k, k, weight.data_ptr(), n, weight.stride(0), c, y.data_ptr(), n, 0, _threads()
    )
    return y


_decoded = threading.local()


def decoded(m: X12Matrix) -> torch.Tensor:
    """m's bf16 matrix in a buffer of the calling thread, reused by its next call (for one GEMM: a
    prefill's projection)."""
    n, k = m.shape
    buf = getattr(_decoded, "buf", None)
    if buf is None or buf.numel() < n * k + X12_SPILL:
        buf = _decoded.buf = torch.empty(n * k + X12_SPILL, dtype=torch.bfloat16)
    return m.decode(buf)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of bf16 `x` with a bf16 weight (rows over threads when many)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    d = x.shape[-1]
    _lib().tm_rmsnorm_bf16(x.data_ptr(), x.numel() // d, d, weight.data_ptr(), eps, y.data_ptr(), _threads())
    return y


def _threads() -> int:
    return torch.get_num_threads()


class Workspace:
    """Reusable scratch buffers of one executor (per-thread partial sums, activations)."""

    def __init__(self) -> None:
        self.scratch = torch.empty(0, dtype=torch.float32)
        self.h = torch.empty(0, dtype=torch.bfloat16)

    def get(self, scratch: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers of at least `scratch` fp32 and `h` bf16 elements."""
        if self.scratch.numel() < scratch:
            self.scratch = torch.empty(scratch, dtype=torch.float32)
        if self.h.numel() < h:
            self.h = torch.empty(h, dtype=torch.bfloat16)
        return self.scratch, self.h


X12_SAMPLE_ROWS = 64
X12_SPILL = 32
"""Elements the decoder may write past a decoded matrix's end (rows of 32 weights padded to 64)."""
"""Rows an X12Matrix samples to pick its 16 high bytes (a miss costs an exception, never a wrong bit)."""


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
    """A bf16 matrix [N, K] in 12 bits per weight, losslessly (`tm_x12` in cpu_bf16.c): each weight's low
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
        lib, threads = _lib(), _threads()
        self.tab = torch.empty(64, dtype=torch.uint8)  # the 16 high bytes, one copy per 128-bit lane (vpshufb)
        lib.tm_x12_table(w.data_ptr(), n, k, max(1, n // X12_SAMPLE_ROWS), self.tab.data_ptr())
        if buf is None:
            buf = torch.empty(x12_row_bytes(k) * n, dtype=torch.uint8)
        self.lo = buf[: n * kp].view(n, kp)
        self.hc = buf[n * kp : n * kp * 3 // 2].view(n, kp // 2)
        cnt = torch.empty(n, dtype=torch.int32)
        lib.tm_x12_encode(
            w.data_ptr(), n, k, self.tab.data_ptr(), self.lo.data_ptr(), self.hc.data_ptr(), cnt.data_ptr(), threads
        )
        self.xrow = torch.zeros(n + 1, dtype=torch.int32)
        torch.cumsum(cnt, 0, out=self.xrow[1:])
        self.xval = torch.empty(int(self.xrow[-1]), dtype=torch.int32)
        if self.xval.numel():
            lib.tm_x12_exceptions(
                w.data_ptr(), n, k, self.tab.data_ptr(), self.xrow.data_ptr(), self.xval.data_ptr(), threads
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
        _lib().tm_x12_decode(ctypes.byref(self.struct), 0, n, buf.data_ptr(), _threads())
        return buf[: n * k].view(n, k)


def _x12_all(mats: list[torch.Tensor]) -> list[X12Matrix]:
    """X12Matrix of each matrix, their sign/mantissa and code bytes in one buffer (in 2 MiB pages where
    the kernel gives them: decode streams it, and 4 KiB pages cost a TLB miss each)."""
    sizes = [x12_row_bytes(w.shape[1]) * w.shape[0] for w in mats]
    buf = torch.empty(sum(sizes) + (2 << 20), dtype=torch.uint8)
    start = -buf.data_ptr() % (2 << 20)  # 2 MiB-aligned, before anything touches it
    madvise(buf.data_ptr() + start, sum(sizes), MADV_HUGEPAGE)
    populate_write(buf.data_ptr() + start, sum(sizes), _threads())  # not a fault per page on first touch
    for w in mats:  # read ahead (a mapped file's pages not yet in memory), while the first ones encode
        madvise(w.data_ptr(), w.numel() * w.element_size(), MADV_WILLNEED)
    out = []
    for w, size in zip(mats, sizes, strict=True):
        out.append(X12Matrix(w, buf[start : start + size]))
        start += size
    return out


class ExpertTable:
    """Data pointers of one MoE layer's experts in checkpoint layout, for `moe`. With `compress`, the
    experts are stored as X12Matrix (where every matrix allows it) and the kernels read those: 25%
    fewer bytes per token, the same bits. The bf16 tensors' pages in a mapped checkpoint file are
    then dropped (they come back from the file if anything reads them)."""

    def __init__(
        self, gate: list[torch.Tensor], up: list[torch.Tensor], down: list[torch.Tensor], compress: bool = False
    ) -> None:
        for t in (*gate, *up, *down):
            if not t.is_contiguous() or t.dtype != torch.bfloat16:
                raise ValueError("expert weights must be contiguous bf16 for the native kernels")
        self.intermediate, self.hidden = gate[0].shape
        self.tensors = (gate, up, down)  # keep the storages alive
        ptrs = (torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64) for ts in self.tensors)
        self.gate, self.up, self.down = ptrs
        self.x12: list[list[X12Matrix]] | None = None
        self.codec_ptrs: tuple[int | None, int | None, int | None] = (None, None, None)
        if compress and all(x12_supported(t) for t in (*gate, *up, *down)):
            e = len(gate)
            flat = _x12_all([*gate, *up, *down])
            self.x12 = [flat[:e], flat[e : 2 * e], flat[2 * e :]]
            self._structs = [
                torch.tensor([ctypes.addressof(m.struct) for m in ms], dtype=torch.int64) for ms in self.x12
            ]
            self.codec_ptrs = tuple(t.data_ptr() for t in self._structs)
            drop_file_pages((*gate, *up, *down))

    @property
    def nbytes(self) -> int:
        """Bytes the kernels read for all the experts (stored as X12Matrix or as bf16)."""
        if self.x12 is not None:
            return sum(m.nbytes for ms in self.x12 for m in ms)
        return sum(t.numel() * t.element_size() for ts in self.tensors for t in ts)


def moe(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, table: ExpertTable, act: str, ws: Workspace
) -> torch.Tensor:
    """sum_k weights[t, k] * expert[ids[t, k]](x[t]) -> [T, D] fp32; x [T, D] bf16, ids/weights [T, K]."""
    x = x.contiguous()
    t, d = x.shape
    ids = ids.to(torch.int64).contiguous()
    w = weights.to(torch.float32).contiguous()
    threads = _threads()
    scratch, h = ws.get(0, ids.numel() * table.intermediate)
    out = torch.zeros(t, d, dtype=torch.float32)
    _lib().tm_moe_bf16(
        x.data_ptr(), out.data_ptr(), t, d, table.intermediate, ids.data_ptr(), w.data_ptr(), ids.shape[1],
        table.gate.numel(), table.gate.data_ptr(), table.up.data_ptr(), table.down.data_ptr(), *table.codec_ptrs,
        ACTS[act], threads, scratch.data_ptr(), h.data_ptr(),
    )  # fmt: skip
    return out


def ffn_tasks(x: torch.Tensor, tasks: list[tuple], act: str, ws: Workspace, out: torch.Tensor) -> None:
    """out [T, D] fp32 += each task's partial FFN. A task: (block [3, n, D] bf16 with gate, up and
    transposed down rows, token indices [N] int32, scales [N] fp32)."""
    x = x.contiguous()
    t, d = x.shape
    arr = (FfnTask * len(tasks))()
    total = 0
    for q, (block, tok, scale) in enumerate(tasks):
        n = block.shape[1]
        arr[q] = FfnTask(block[0].data_ptr(), block[1].data_ptr(), block[2].data_ptr(), n, d, d, 1, tok.numel(),
                         tok.data_ptr(), scale.data_ptr())  # fmt: skip
        total += n * tok.numel()
    threads = _threads()
    scratch, h = ws.get((threads - 1) * t * d, total)
    _lib().tm_ffn_tasks_bf16(
        x.data_ptr(), out.data_ptr(), t, d, arr, len(tasks), ACTS[act], threads, scratch.data_ptr(), h.data_ptr()
    )


def attn_prefill(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of a prefill with no cached prefix (query i attends keys 0..i), as
    scaled_dot_product_attention(is_causal=True) computes it for bf16 (fp32 scores and softmax, bf16
    probabilities times values in fp32). q [B, H, T, hd], keys/values [B, Hkv, T, hd] bf16, each with
    unit stride along hd -> [B, T, H, hd] bf16, contiguous (the layout the o projection reads)."""
    b, h, t, hd = q.shape
    hkv = keys.shape[1]
    if keys.stride() != values.stride() or q.stride(3) != 1 or keys.stride(3) != 1:
        raise ValueError("attn_prefill needs unit stride along hd and the same strides for keys and values")
    out = torch.empty(b, t, h, hd, dtype=torch.bfloat16)
    _lib().tm_attn_prefill_bf16(
        q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), keys.data_ptr(), values.data_ptr(), keys.stride(0),
        keys.stride(1), keys.stride(2), out.data_ptr(), b, h, hkv, t, hd, scale, _threads(),
    )  # fmt: skip
    return out


def attn_decode(
    layer: AttnLayer,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    ws: Workspace,
) -> torch.Tensor:
    """One decode step of attention for x [B, D] bf16 -> [B, D] bf16 (see `tm_attn_decode_bf16`).

    cos/sin [B, hd] (fp32 when `layer.fp32_rotate`, else bf16); keys/values: the layer's cache
    [S, Hkv, L, hd], written at (slots[b], positions[b]); attention covers positions 0..positions[b]."""
    b, d = x.shape
    nq, nk = layer.H * layer.hd, layer.Hkv * layer.hd
    threads = _threads()
    scratch, buf = ws.get(threads * keys.shape[2], b * (2 * nq + 2 * nk))
    out = torch.empty(b, d, dtype=torch.bfloat16)
    _lib().tm_attn_decode_bf16(
        ctypes.byref(layer), x.data_ptr(), b, d, cos.data_ptr(), sin.data_ptr(), keys.data_ptr(), values.data_ptr(),
        keys.shape[2], slots.data_ptr(), positions.data_ptr(), out.data_ptr(), threads, buf.data_ptr(),
        scratch.data_ptr(),
    )  # fmt: skip
    return out


class DecodeStack:
    """Consecutive MoE decoder layers for `decode_layers`: their `DecodeLayer`s and KV cache layers, as
    the native call takes them (built once per run of layers and cache). It keeps the `DecodeLayer`s
    alive but not the cache: the caller rebuilds it when the cache is replaced."""

    def __init__(self, layers: list[DecodeLayer], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.sources = layers
        self.n = len(layers)
        self.layers = (DecodeLayer * self.n)(*layers)
        self.keys = (ctypes.c_void_p * self.n)(*(k.data_ptr() for k in keys))
        self.values = (ctypes.c_void_p * self.n)(*(v.data_ptr() for v in values))
        self.length = keys[0].shape[2]
        self.top_k = layers[0].K
        self.ws_per_row = max(lay.E + 2 * (lay.attn.H + lay.attn.Hkv) * lay.attn.hd for lay in layers)
        self.h_per_row = max(lay.K * lay.I for lay in layers)


def decode_layers(
    stack: DecodeStack,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    ws: Workspace,
) -> torch.Tensor:
    """The stack's decoder layers for one new token per row, in place on the residual stream x [B, D] bf16
    (see `tm_decode_layers_bf16`); cos/sin [B, hd], slots/positions as in `attn_decode`. Returns the
    routed expert ids [layers, B, K]."""
    b, d = x.shape
    threads = _threads()
    sc_n, ws_n = threads * stack.length, b * (2 * d + stack.ws_per_row)
    scratch, buf = ws.get(sc_n + b * (d + stack.top_k), ws_n + b * stack.h_per_row)
    ids = torch.empty(stack.n, b, stack.top_k, dtype=torch.int64)
    _lib().tm_decode_layers_bf16(
        stack.layers, stack.n, x.data_ptr(), b, d, cos.data_ptr(), sin.data_ptr(), stack.keys, stack.values,
        stack.length, slots.data_ptr(), positions.data_ptr(), threads, buf.data_ptr(), scratch.data_ptr(),
        scratch.data_ptr() + 4 * sc_n, buf.data_ptr() + 2 * ws_n, ids.data_ptr(),
    )  # fmt: skip
    return ids
