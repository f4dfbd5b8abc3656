"""`tilemem doctor`: check the environment and say what is wrong and how to fix it.

Each check gives PASS, WARN (works, but slower or less honest than it could be) or FAIL (something
TileMEM needs is missing), and for WARN/FAIL the fix.
"""

from __future__ import annotations

import importlib.metadata as md
import mmap
import os
import platform
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tilemem import sysinfo
from tilemem.placement.store_layout import ALIGNMENT

GiB = 1 << 30


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    status: str
    """PASS, WARN or FAIL."""
    name: str
    """What was checked."""
    detail: str
    """What was found (with units)."""
    fix: str = ""
    """What to do (WARN/FAIL)."""


def _pinned(package: str) -> str | None:
    """The version tilemem's metadata pins `package` to, if any."""
    try:
        for req in md.requires("tilemem") or ():
            m = re.match(rf"^{re.escape(package)}\s*==\s*([^;\s]+)", req, re.IGNORECASE)
            if m:
                return m.group(1)
    except md.PackageNotFoundError:
        pass
    return None


def check_python() -> Check:
    return Check("PASS", "python", f"{platform.python_version()} ({sys.executable})")


def check_package(name: str, required: bool = True) -> Check:
    try:
        version = md.version(name)
    except md.PackageNotFoundError:
        status = "FAIL" if required else "WARN"
        return Check(status, name, "not installed", f"pip install -e . (installs the pinned {name})")
    pin = _pinned(name)
    if pin and version.split("+")[0] != pin:
        return Check(
            "WARN", name, f"{version} (pinned {pin})", f"pip install '{name}=={pin}' to match the tested version"
        )
    return Check("PASS", name, version + (f" (pinned {pin})" if pin else ""))


def check_threads() -> Check:
    import torch

    threads, cores = torch.get_num_threads(), sysinfo.cpu_cores()
    load = sysinfo.load_average()
    detail = f"torch {threads} threads, {cores} cores, load average {load:.2f}"
    if threads > cores:
        return Check(
            "WARN", "threads", detail, f"oversubscribed: pass --threads {cores} or set OMP_NUM_THREADS={cores}"
        )
    if load > cores:
        return Check(
            "WARN", "threads", detail,
            "the machine is busy (load above its cores): timings and probe figures will be noisy; "
            "measure when it is idle or with --threads 1",
        )  # fmt: skip
    return Check("PASS", "threads", detail)


def check_cpu_features() -> Check:
    import torch

    flags = sysinfo.cpu_flags()
    have = [f for f in sysinfo.KERNEL_FEATURES if f in flags]
    detail = f"{sysinfo.cpu_model()}: {', '.join(have) or 'none of ' + ', '.join(sysinfo.KERNEL_FEATURES)}"
    if not torch.backends.mkldnn.is_available():
        return Check("WARN", "cpu kernels", detail + "; oneDNN unavailable", "install the official torch CPU wheel")
    if not flags:
        return Check("WARN", "cpu kernels", "cannot read /proc/cpuinfo", "")
    if not ({"avx512_bf16", "amx_bf16"} & flags):
        return Check(
            "WARN", "cpu kernels", detail,
            "no native bf16 (avx512_bf16/AMX): bf16 GEMV is emulated and slow; plan and run with --dtype fp32 "
            "(twice the bytes, often faster) or use a CPU with avx512_bf16/AMX",
        )  # fmt: skip
    from tilemem import kernels

    if kernels.cpu_supported() and os.environ.get("TILEMEM_KERNELS", "1") != "0" and not kernels.available():
        return Check("WARN", "cpu kernels", detail + "; native kernels failed to build", "install gcc (or set CC)")
    if kernels.available():
        detail += "; native kernels on" + (", prefill GEMMs on AMX tiles" if kernels.amx_enabled() else "")
    return Check("PASS", "cpu kernels", detail)


def check_gpu() -> Check:
    import torch

    driver = sysinfo.nvidia_driver()
    g = sysinfo.gpu()
    if g is None:
        if driver:
            return Check(
                "WARN", "gpu", f"NVIDIA driver {driver} but torch {torch.__version__} has no CUDA",
                "install a CUDA build of torch matching the driver (pip install torch --index-url .../cu12x)",
            )  # fmt: skip
        return Check("PASS", "gpu", "none (CPU-only: plan with cpu/disk budgets)")
    detail = f"{g.name}, {g.memory_bytes / GiB:.1f} GiB ({g.free_bytes / GiB:.1f} GiB free), CUDA {g.cuda}, " \
             f"driver {driver or '?'}, sm {g.capability}"  # fmt: skip
    return Check("PASS", "gpu", detail)


def check_memory(minimum: int = 2 * GiB) -> Check:
    mem = sysinfo.memory()
    detail = f"{mem.available / GiB:.1f} GiB free of {mem.total / GiB:.1f} GiB"
    if mem.available < minimum:
        return Check("WARN", "dram", detail, "little free RAM: close other programs or plan with --budget auto")
    return Check("PASS", "dram", detail)


def check_disk(directory: Path, minimum: int = 5 * GiB) -> Check:
    free = sysinfo.disk_free(directory)
    detail = f"{free / GiB:.1f} GiB free at {directory}"
    if free < minimum:
        return Check("WARN", "disk space", detail, "tile stores need about the model's size: free space or use --store")
    return Check("PASS", "disk space", detail)


def check_o_direct(directory: Path) -> Check:
    """Whether the filesystem under `directory` serves O_DIRECT reads (the disk tier must be real disk)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".tilemem-doctor-", dir=directory)
    except OSError as exc:
        return Check("FAIL", "o_direct", f"cannot write in {directory}: {exc}", "run from a writable directory")
    try:
        os.write(fd, b"\0" * 8192)
        os.fsync(fd)
        os.close(fd)
        dfd = os.open(name, os.O_RDONLY | os.O_DIRECT)
        try:
            with mmap.mmap(-1, ALIGNMENT) as buf:
                os.preadv(dfd, [buf], 0)
        finally:
            os.close(dfd)
        return Check("PASS", "o_direct", f"supported at {directory}")
    except OSError as exc:
        return Check(
            "WARN", "o_direct", f"refused at {directory} ({exc.strerror})",
            "tile reads fall back to buffered reads + fadvise; keep tile stores on ext4/xfs (not tmpfs/overlay) "
            "with --store",
        )  # fmt: skip
    finally:
        Path(name).unlink(missing_ok=True)


def check_page_cache() -> Check:
    path = Path("/proc/sys/vm/drop_caches")
    if os.access(path, os.W_OK):
        return Check("PASS", "page cache", "can drop it before benchmark runs")
    return Check(
        "WARN", "page cache", "cannot drop it (not root)",
        "benchmarks still read disk tiles with O_DIRECT, but run `tilemem bench` as root for fully cold runs",
    )  # fmt: skip


def run_checks(directory: str | Path = ".") -> list[Check]:
    """Every check, in report order."""
    d = Path(directory)
    checks: list[Callable[[], Check]] = [
        check_python,
        lambda: check_package("torch"),
        lambda: check_package("safetensors"),
        lambda: check_package("tokenizers"),
        lambda: check_package("numpy"),
        lambda: check_package("psutil"),
        check_threads,
        check_cpu_features,
        check_gpu,
        check_memory,
        lambda: check_disk(d),
        lambda: check_o_direct(d),
        check_page_cache,
    ]
    out = []
    for c in checks:
        try:
            out.append(c())
        except Exception as exc:  # a broken check must not hide the others
            out.append(Check("FAIL", getattr(c, "__name__", "check"), f"{type(exc).__name__}: {exc}", "report this"))
    return out


def format_checks(checks: list[Check]) -> str:
    """`PASS  name  detail` lines, each WARN/FAIL followed by its fix."""
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status:4s}  {c.name:<{width}}  {c.detail}")
        if c.status != "PASS" and c.fix:
            lines.append(f"{'':4s}  {'':<{width}}  fix: {c.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in ("PASS", "WARN", "FAIL")}
    lines.append(f"doctor: {counts['PASS']} PASS, {counts['WARN']} WARN, {counts['FAIL']} FAIL")
    return "\n".join(lines)
