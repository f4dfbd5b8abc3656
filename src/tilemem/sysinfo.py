"""Platform facts: what the machine has (memory, disk, CPU features, GPU). A base module: the kernels, `--budget
auto`, `doctor` and the probe read it; it imports nothing of TileMEM but `units`."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tilemem.units import parse_bytes

KERNEL_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma", "f16c")
"""CPU flags that decide which GEMV/GEMM paths torch can take."""


@dataclass(frozen=True)
class MemoryInfo:
    """Host memory, bytes."""

    total: int
    """Installed (visible to this process)."""
    available: int
    """Free for new allocations without swapping (page cache counted as free)."""


def memory() -> MemoryInfo:
    """Host memory; honours `TILEMEM_FAKE_RAM` (e.g. `2GiB`) so tests and users can plan for a smaller machine."""
    fake = os.environ.get("TILEMEM_FAKE_RAM")
    if fake:
        n = parse_bytes(fake, "TILEMEM_FAKE_RAM")
        return MemoryInfo(n, n)
    try:
        import psutil

        vm = psutil.virtual_memory()
        return MemoryInfo(int(vm.total), int(vm.available))
    except ImportError:  # pragma: no cover - psutil is a dependency
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return MemoryInfo(pages, avail)


def cpu_cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def cpu_flags() -> set[str]:
    """ISA flags from /proc/cpuinfo (empty where unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """CPU model name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def disk_free(path: str | Path) -> int:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def load_average() -> float:
    """1-minute load average (0 where unknown)."""
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return 0.0


@dataclass(frozen=True)
class GpuInfo:
    """The first CUDA device, if any."""

    name: str
    """Device name."""
    memory_bytes: int
    """Total device memory."""
    free_bytes: int
    """Free device memory."""
    cuda: str
    """CUDA runtime torch was built with."""
    capability: str
    """Compute capability, e.g. 9.0."""


def gpu() -> GpuInfo | None:
    """The first CUDA GPU torch can use, else None."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    return GpuInfo(props.name, int(total), int(free), str(torch.version.cuda), f"{props.major}.{props.minor}")


def nvidia_driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None."""
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None
