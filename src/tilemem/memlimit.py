"""The memory this process may use, measured where it runs: the smallest of its cgroup's limit (v2
`memory.max` or v1 `memory.limit_in_bytes`, less what the cgroup already holds but the inactive page cache the
kernel reclaims first: the "working set" that Docker and the kubelet report), `RLIMIT_AS` and
`RLIMIT_DATA` (less what they already count), and the machine's `MemAvailable`; or an explicit
`--memory-limit`, which overrides them all.

limit = memory_limit()            # or memory_limit("6GiB"), memory_limit(root=fake_tree) in tests
print(limit.describe())           # memory limit 6.00 GiB (cgroup v2 memory.max 8.00 GiB, 2.00 GiB in use)

Every file is read below `root`, so tests pass a fake tree (`proc/self/cgroup`, `sys/fs/cgroup/...`,
`proc/meminfo`, `proc/self/status`); a file that is missing or unreadable is skipped, one that is malformed
is skipped with a note saying why. A base module: it imports only `sysinfo` (for `TILEMEM_FAKE_RAM`) and
`units`.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

from tilemem import sysinfo
from tilemem.units import format_bytes, parse_bytes

CGROUP_V1_UNLIMITED = 1 << 62
"""cgroup v1 writes "no limit" as a huge number (9223372036854771712 on 4 KiB pages); anything this large is none."""

V2_MAX = "cgroup v2 memory.max"
V1_LIMIT = "cgroup v1 memory.limit_in_bytes"
RLIMIT_AS = "RLIMIT_AS"
RLIMIT_DATA = "RLIMIT_DATA"
MEM_AVAILABLE = "MemAvailable"
EXPLICIT = "--memory-limit"
SOURCES = (V2_MAX, V1_LIMIT, RLIMIT_AS, RLIMIT_DATA, MEM_AVAILABLE, EXPLICIT)
"""Where a limit can come from, as `MemoryLimit.source` names it."""


@dataclass(frozen=True)
class Bound:
    """One cap on this process's memory and what already counts against it."""

    source: str
    """One of SOURCES."""
    limit: int
    """The cap, bytes (for MemAvailable: the bytes available)."""
    used: int
    """Bytes already counted against the cap (cgroup usage, VmSize, VmData, this process's RSS; 0 for MemAvailable)."""
    where: str = ""
    """The file or call it was read from."""
    reclaimable: int = 0
    """Bytes of the cap's usage not counted in `used`: a cgroup's inactive file pages (page cache the kernel
    drops before it fails a charge), from memory.stat."""

    @property
    def available(self) -> int:
        """Bytes still free under this cap."""
        return max(0, self.limit - self.used)


@dataclass(frozen=True)
class MemoryLimit:
    """The memory this process may still use, and which cap set it."""

    available: int
    """Bytes the process may still allocate (the smallest bound's, or the explicit limit's)."""
    source: str
    """The cap that set it: one of SOURCES."""
    limit: int
    """That cap's raw number, bytes."""
    used: int
    """Bytes already counted against that cap."""
    machine_available: int
    """The machine's MemAvailable (or TILEMEM_FAKE_RAM), bytes."""
    bounds: tuple[Bound, ...] = ()
    """Every cap measured, the chosen one included."""
    notes: tuple[str, ...] = ()
    """Why a file was ignored (missing files are not noted: most machines lack some)."""
    reclaimable: int = 0
    """Bytes of page cache the chosen cap holds that were not counted as in use (Bound.reclaimable)."""

    @property
    def above_machine(self) -> bool:
        """An explicit limit larger than the machine's available memory."""
        return self.source == EXPLICIT and self.available > self.machine_available

    def describe(self) -> str:
        """One line: `memory limit 6.00 GiB (cgroup v2 memory.max 8.00 GiB, 2.00 GiB in use)`."""
        if self.source == MEM_AVAILABLE:
            detail = "the machine's MemAvailable; no cgroup or rlimit below it"
        else:
            detail = f"{self.source} {format_bytes(self.limit)}, {format_bytes(self.used)} in use"
            if self.reclaimable:
                detail += f" not counting {format_bytes(self.reclaimable)} of inactive page cache"
        if self.above_machine:
            detail += f"; above the machine's {format_bytes(self.machine_available)} available"
        return f"memory limit {format_bytes(self.available)} ({detail})"


def memory_limit(explicit: str | int | None = None, root: str | Path = "/") -> MemoryLimit:
    """The memory this process may use (module docstring). `explicit` (e.g. `6GiB`): the whole process's
    cap, overriding every measured one; what the process already holds (VmRSS) counts against it."""
    root = Path(root)
    notes: list[str] = []
    machine = _machine_available(root, notes)
    bounds = [Bound(MEM_AVAILABLE, machine, 0, "/proc/meminfo")]
    bounds += _cgroup_bounds(root, notes)
    bounds += _rlimit_bounds(root, notes)
    if explicit is not None:
        cap = parse_bytes(explicit, EXPLICIT)  # a BudgetError (a ConfigError) naming the flag when unreadable
        chosen = Bound(EXPLICIT, cap, _status_kib(root, "VmRSS", notes) or 0, EXPLICIT)
        bounds.append(chosen)  # used as given, even above the machine's memory (`describe` then says so)
    else:
        chosen = min(bounds, key=lambda b: b.available)
    return MemoryLimit(
        chosen.available, chosen.source, chosen.limit, chosen.used, machine, tuple(bounds), tuple(notes),
        chosen.reclaimable,
    )  # fmt: skip


# -- the machine ---------------------------------------------------------------------------------
def _machine_available(root: Path, notes: list[str]) -> int:
    """MemAvailable from `root`/proc/meminfo; TILEMEM_FAKE_RAM wins (a smaller machine, faked)."""
    if os.environ.get("TILEMEM_FAKE_RAM"):
        return sysinfo.memory().available
    text = _read(root / "proc/meminfo")
    if text is not None:
        for line in text.splitlines():
            if line.startswith("MemAvailable:"):
                value = _kib(line.split(":", 1)[1])
                if value is not None:
                    return value
                notes.append(f"ignored {root / 'proc/meminfo'}: cannot read {line.strip()!r} as a size in kB")
                break
        else:
            notes.append(f"ignored {root / 'proc/meminfo'}: it has no MemAvailable line")
    return sysinfo.memory().available


def _kib(text: str) -> int | None:
    """`   8048576 kB` -> bytes; None when malformed."""
    parts = text.split()
    if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
        return int(parts[0]) * 1024
    return None


# -- cgroups -------------------------------------------------------------------------------------
def _cgroup_bounds(root: Path, notes: list[str]) -> list[Bound]:
    """The tightest cgroup limit on this process, from /proc/self/cgroup: v2 (`0::/path`) and v1 (a line
    whose controllers include `memory`), each walked from the process's cgroup up to the mount's root."""
    text = _read(root / "proc/self/cgroup")
    if text is None:
        return []
    found = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            if line.strip():
                notes.append(f"ignored a line of {root / 'proc/self/cgroup'}: {line!r} is not ID:CONTROLLERS:PATH")
            continue
        _, controllers, path = parts
        if controllers == "":
            found += _walk(root / "sys/fs/cgroup", path, V2_MAX, "memory.max", "memory.current", "inactive_file", notes)
        elif "memory" in controllers.split(","):
            found += _walk(
                root / "sys/fs/cgroup/memory", path, V1_LIMIT, "memory.limit_in_bytes", "memory.usage_in_bytes",
                "total_inactive_file", notes,
            )  # fmt: skip
    return [min(found, key=lambda b: b.available)] if found else []


def _walk(
    mount: Path, path: str, source: str, limit_file: str, usage_file: str, inactive_key: str, notes: list[str]
) -> list[Bound]:
    """Bounds at every level from `mount`/`path` up to `mount` (a parent's limit holds its children too).
    Inside a container the path may name a cgroup outside the mount; its missing levels are skipped. Usage
    counts page cache too; the level's inactive file pages (`inactive_key` in its memory.stat) are not
    counted as in use: the kernel reclaims them before it fails a charge (a cold start's reads of torch's
    libraries and the checkpoint would otherwise look like memory the process holds)."""
    rel = Path(path.strip().lstrip("/"))
    levels = [mount / rel, *(mount / p for p in rel.parents)] if str(rel) not in ("", ".") else [mount]
    bounds = []
    for level in dict.fromkeys(levels):
        limit_text = _read(level / limit_file)
        if limit_text is None:
            continue
        limit_text = limit_text.strip()
        if limit_text == "max":
            continue
        if not limit_text.isdigit():
            notes.append(f"ignored {level / limit_file}: {limit_text[:40]!r} is neither a number nor 'max'")
            continue
        limit = int(limit_text)
        if limit >= CGROUP_V1_UNLIMITED:
            continue
        usage_text = (_read(level / usage_file) or "").strip()
        if not usage_text.isdigit():
            notes.append(f"ignored {level / usage_file}: {usage_text[:40]!r} is not a number; counting 0 in use")
            usage_text = "0"
        usage = int(usage_text)
        inactive = min(usage, _stat_field(level / "memory.stat", inactive_key, notes))
        bounds.append(Bound(source, limit, usage - inactive, str(level / limit_file), inactive))
    return bounds


def _stat_field(path: Path, key: str, notes: list[str]) -> int:
    """A `key value` line of a cgroup's memory.stat, bytes; 0 where the file or line is missing or malformed."""
    text = _read(path)
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            if value.strip().isdigit():
                return int(value)
            notes.append(f"ignored {key} in {path}: {value.strip()[:40]!r} is not a number; counting 0")
            break
    return 0


# -- rlimits -------------------------------------------------------------------------------------
def _rlimit_bounds(root: Path, notes: list[str]) -> list[Bound]:
    """RLIMIT_AS less VmSize (the address space it bounds), RLIMIT_DATA less VmData, where set."""
    bounds = []
    kinds = ((RLIMIT_AS, resource.RLIMIT_AS, "VmSize"), (RLIMIT_DATA, resource.RLIMIT_DATA, "VmData"))
    for source, which, field in kinds:
        soft, _hard = resource.getrlimit(which)
        if soft == resource.RLIM_INFINITY or soft < 0:
            continue
        used = _status_kib(root, field, notes)
        bounds.append(Bound(source, int(soft), used or 0, f"getrlimit({source}), {field}"))
    return bounds


def _status_kib(root: Path, field: str, notes: list[str]) -> int | None:
    """A `kB` field of `root`/proc/self/status (VmRSS, VmSize, VmData), bytes; None where absent."""
    path = root / "proc/self/status"
    text = _read(path)
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            value = _kib(line.split(":", 1)[1])
            if value is None:
                notes.append(f"ignored {field} in {path}: cannot read {line.strip()!r} as a size in kB")
            return value
    return None


def _read(path: Path) -> str | None:
    """A small text file's contents, None when missing or unreadable."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
