"""The kernels' shared library: compiled from `csrc/` on first use, loaded with ctypes, checked against
the interface Python expects, and switched on or off.

The C sources ship with the package and are compiled with the system C compiler into a per-user cache
(`$TILEMEM_CACHE`, default `~/.cache/tilemem`), keyed by every source and header file and the flags; the
library is written to a temp file and renamed, so a crash never leaves half a library. At load, the
library's `tm_abi_version()` must equal `TM_ABI_VERSION` in `csrc/tilemem.h` (the one place the number
lives) and its `tm_struct_size` of every struct must equal its ctypes mirror's size (`structs.py`); a
mismatch, like a failed build, leaves the kernels off (with a warning) and callers keep their torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from tilemem import sysinfo
from tilemem.errors import KernelABIError, KernelError, KernelMemoryError
from tilemem.kernels.structs import STRUCTS, X12, AttnLayer, DecodeLayer, FfnTask

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
HEADER = CSRC / "tilemem.h"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp", "-fPIC", "-shared"]
FLAGS += ["-fvisibility=hidden"]  # only the TM_API functions of tilemem.h are exported


def sources(csrc: Path | None = None) -> list[Path]:
    """The C files of `csrc` (default: the main library's, `CSRC` as it is now) compiled into the library, in
    a fixed order."""
    return sorted((csrc or CSRC).glob("*.c"))


def header_constant(name: str) -> int:
    """An integer constant of `csrc/tilemem.h` (`#define NAME n` or an enumerator `NAME = n`)."""
    text = HEADER.read_text()
    m = re.search(rf"^#define {name} (\d+)\b", text, re.M) or re.search(rf"\b{name} = (\d+)\b", text)
    if m is None:
        raise KernelABIError(f"{HEADER} defines no {name}: the kernel sources are incomplete; reinstall tilemem")
    return int(m.group(1))


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


def library_path(cc: str, csrc: Path | None = None, flags: list[str] | None = None, name: str = "tilemem") -> Path:
    """Where the library `name` built by compiler `cc` from `csrc` (default `CSRC`) with `flags` (default `FLAGS`,
    both as they are when called) is cached: named by a hash of the compiler, the flags and every source and
    header file of `csrc` (names and bytes)."""
    csrc, flags = csrc or CSRC, FLAGS if flags is None else flags
    digest = hashlib.sha256(" ".join([cc, *flags]).encode())
    for path in sorted(csrc.glob("*.[ch]")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return cache_dir() / f"{name}-{digest.hexdigest()[:16]}.so"


def build(force: bool = False, csrc: Path | None = None, flags: list[str] | None = None, name: str = "tilemem") -> Path:
    """Compile the C files of `csrc` (once per sources and flags) into one shared library; returns its
    path. The defaults build the main (AVX512) library; `fp8.py` builds its portable one from here too."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (install gcc or set CC)")
    flags = FLAGS if flags is None else flags
    out = library_path(cc, csrc, flags, name)
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(dir=out.parent) as objdir:  # one object per file, all cores at once
            objs = [str(Path(objdir) / f"{src.stem}.o") for src in sources(csrc)]
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                jobs = [[cc, *flags, "-c", str(src), "-o", obj] for src, obj in zip(sources(csrc), objs, strict=True)]
                list(pool.map(_run, jobs))
            _run([cc, *flags, *objs, "-o", tmp, "-lm"])
        os.replace(tmp, out)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"compiling the kernels in {csrc or CSRC} failed:\n{exc.stderr}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def check_abi(lib: Any, where: str = "the kernel library") -> None:
    """Raise KernelABIError unless `lib` has the interface version of `csrc/tilemem.h` and the sizes of
    the ctypes mirrors of its structs (`lib`: a loaded library, its ABI functions declared by
    `declare_abi`)."""
    want = header_constant("TM_ABI_VERSION")
    if (got := lib.tm_abi_version()) != want:
        raise KernelABIError(
            f"{where} has interface version {got}, but tilemem expects {want} (csrc/tilemem.h): a stale or "
            f"foreign build; delete it (or {cache_dir()}) to rebuild"
        )
    for struct in STRUCTS:
        size, mirror = lib.tm_struct_size(struct.c_name.encode()), ctypes.sizeof(struct)
        if size != mirror:
            raise KernelABIError(
                f"struct {struct.c_name} is {size} bytes in {where} but {mirror} in its ctypes mirror "
                f"{struct.__name__} (tilemem/kernels/structs.py): make the mirror match csrc/tilemem.h"
            )


_vp, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def declare_abi(lib: ctypes.CDLL) -> None:
    """Argument and result types of the library's ABI functions (`abi.c`)."""
    lib.tm_abi_version.restype = _int
    lib.tm_struct_size.argtypes, lib.tm_struct_size.restype = [ctypes.c_char_p], _i64


def _declare(lib: ctypes.CDLL) -> None:
    """Argument and result types of the library's kernels (see csrc/tilemem.h)."""
    lib.tm_linear_bf16.argtypes = [_vp, _i64, _i64, _i64, _vp, _i64, _i64, _vp, _vp, _i64, _int, _int]
    lib.tm_ffn_tasks_bf16.argtypes = [_vp, _vp, _i64, _i64, ctypes.POINTER(FfnTask), _i64, _int, _int, _vp, _vp]
    lib.tm_rmsnorm_bf16.argtypes = [_vp, _i64, _i64, _vp, ctypes.c_float, _vp, _int]
    attn = [ctypes.POINTER(AttnLayer), _vp, _i64, _i64, _vp, _vp, _vp, _vp, _i64, _i64, _vp, _i64, _vp, _vp, _int]
    lib.tm_attn_decode_bf16.argtypes = [*attn, _vp, _vp]
    lib.tm_attn_prefill_bf16.argtypes = [_vp, _i64, _i64, _i64, _vp, _vp, _i64, _i64, _i64, _vp, *[_i64] * 5]
    lib.tm_attn_prefill_bf16.argtypes += [ctypes.c_float, _int]
    lib.tm_decode_layers_bf16.argtypes = [ctypes.POINTER(DecodeLayer), _i64, _vp, _i64, _i64, _vp, _vp, _vp, _vp]
    lib.tm_decode_layers_bf16.argtypes += [_i64, _i64, _vp, _i64, _vp, _int, _vp, _vp, _vp, _vp, _vp]
    lib.tm_moe_bf16.argtypes = [_vp, _vp, _i64, _i64, _i64, _vp, _vp, _i64, _i64, *[_vp] * 6, _int, _int, _vp, _vp]
    lib.tm_x12_table.argtypes = [_vp, _i64, _i64, _i64, _vp]
    lib.tm_x12_encode.argtypes = [_vp, _i64, _i64, _vp, _vp, _vp, _vp, _int]
    lib.tm_x12_exceptions.argtypes = [_vp, _i64, _i64, _vp, _vp, _vp, _int]
    lib.tm_x12_decode.argtypes = [ctypes.POINTER(X12), _i64, _i64, _vp, _int]
    lib.tm_amx_enable.argtypes = [_int]


def load(path: Path | None = None) -> ctypes.CDLL:
    """The library at `path` (default: `build()`), declared and checked (`check_abi`). Runs none of its
    kernels, so it loads on any CPU."""
    path = build() if path is None else path
    lib = ctypes.CDLL(str(path))
    declare_abi(lib)
    check_abi(lib, str(path))
    _declare(lib)
    return lib


@functools.cache
def lib() -> ctypes.CDLL | None:
    """The loaded library, or None where the kernels cannot run (CPU, compiler, ABI, `TILEMEM_KERNELS=0`)."""
    if os.environ.get("TILEMEM_KERNELS", "1") == "0" or not cpu_supported():
        return None
    try:
        out = load()
    except (RuntimeError, OSError, KernelError) as exc:
        log.warning("native kernels unavailable, using torch: %s", exc)
        return None
    out.tm_amx_enable(int(amx_supported() and os.environ.get("TILEMEM_AMX", "1") != "0"))
    return out


def available() -> bool:
    """Whether the native kernels can run here (CPU, compiler, not disabled)."""
    return lib() is not None


def usable(x: torch.Tensor) -> bool:
    """Whether `x` (an activation) can go through the kernels: bf16 on the CPU."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and available()


def set_amx(on: bool) -> bool:
    """Routes the prefill GEMMs through AMX tiles (where the CPU and kernel allow) or AVX512-BF16;
    returns whether AMX is now on. On by default where supported; `TILEMEM_AMX=0` turns it off."""
    return bool(lib().tm_amx_enable(int(on and amx_supported())))


def amx_enabled() -> bool:
    """Whether the prefill GEMMs run on AMX tiles (a process-wide switch in the library)."""
    return available() and bool(lib().tm_amx_enabled())


def check(status: int, what: str) -> None:
    """Raise for a kernel's failed `tm_status`: KernelMemoryError where it could not allocate, KernelError
    naming the block tables where a paged KV cache's tables did not fit its pool."""
    if status == header_status("TM_OK"):
        return
    if status == header_status("TM_ENOMEM"):
        raise KernelMemoryError(
            f"{what}: the native kernel could not allocate its working memory; free memory (fewer rows, a "
            "shorter prompt or a smaller budget) or run on torch with TILEMEM_KERNELS=0"
        )
    if status == header_status("TM_EINVAL"):
        raise KernelError(
            f"{what}: a row's position is past its block table, or a block table entry it reads is outside "
            "the KV cache's pool of blocks; the caller's block tables or positions are wrong"
        )
    raise KernelError(f"{what}: the native kernel failed with status {status}")


@functools.cache
def header_status(name: str) -> int:
    """A `tm_status` value of csrc/tilemem.h (read once)."""
    return header_constant(name)
