"""Zero-copy, memory-mapped reading of one .safetensors file, with checks that name the problem.

The format is an 8-byte little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then the raw bytes. We map the file privately (copy-on-write)
and hand out tensor views into the mapping, so loading never holds a second copy of the weights.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import mmap
import os
import struct
import threading
from pathlib import Path

import torch

from tilemem.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One safetensors file, validated on open and memory-mapped on first tensor access."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.size = self.path.stat().st_size
        fix = "re-download the file or re-run `tilemem synth`"
        if self.size < 8:
            raise CheckpointError(f"{self.path} is truncated ({self.size} bytes, no header); {fix}.")
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > MAX_HEADER or 8 + header_len > self.size:
                raise CheckpointError(
                    f"{self.path} is corrupt or truncated: header claims {header_len} bytes but the file "
                    f"has {self.size}; {fix}."
                )
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.path} has a corrupt safetensors header ({exc}); {fix}.") from None
        if not isinstance(header, dict):
            kind = type(header).__name__
            raise CheckpointError(f"{self.path} has a corrupt safetensors header (JSON {kind}, not object); {fix}.")
        self.metadata = header.pop("__metadata__", {}) or {}
        self.data_start = 8 + header_len
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: header entry for '{name}' is malformed; {fix}.") from None
            itemsize = torch.empty(0, dtype=dtype).element_size()
            if end - begin != math.prod(shape) * itemsize:
                raise CheckpointError(
                    f"{self.path}: tensor '{name}' has shape {list(shape)} but {end - begin} bytes; {fix}."
                )
            if self.data_start + end > self.size:
                raise CheckpointError(
                    f"{self.path} is truncated: tensor '{name}' ends at byte {self.data_start + end} but the "
                    f"file has {self.size} bytes; {fix}."
                )
            self.entries[name] = (dtype, shape, begin, end)
        self._check_layout(fix)
        self._storage: torch.UntypedStorage | None = None

    def _check_layout(self, fix: str) -> None:
        """Tensors must tile the data area exactly: from byte 0, each starting where the previous ends,
        the last ending at the end of the file (as the `safetensors` library requires), so no two
        tensors share bytes and none reads the header."""
        expected = 0
        prev = "the start of the data"
        for name, (_, _, begin, end) in sorted(self.entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if begin != expected:
                how = "overlaps" if begin < expected else "leaves a gap after"
                raise CheckpointError(
                    f"{self.path}: invalid offset: tensor '{name}' starts at data byte {begin}, which {how} "
                    f"{prev} (ending at {expected}); the header is corrupt; {fix}."
                )
            expected, prev = end, f"tensor '{name}'"
        if self.data_start + expected != self.size:
            raise CheckpointError(
                f"{self.path}: the tensors end at byte {self.data_start + expected} but the file has {self.size} "
                f"bytes; the header is corrupt or the file was appended to; {fix}."
            )

    def names(self) -> list[str]:
        """Tensor names in this file."""
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name`."""
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of tensor `name`."""
        return self.entries[name][0]

    def tensor(self, name: str) -> torch.Tensor:
        """A read-only-by-convention view of tensor `name` into the file mapping (no copy)."""
        dtype, shape, begin, end = self.entries[name]
        if self._storage is None:
            self._storage = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=self.size)
        offset = self.data_start + begin
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if offset % itemsize:  # unaligned: copy out (rare; safetensors aligns data)
            raw = torch.empty(0, dtype=torch.uint8).set_(self._storage, offset, (end - begin,))
            return raw.clone().view(dtype).view(shape)
        return torch.empty(0, dtype=dtype).set_(self._storage, offset // itemsize, shape)


MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
MADV_POPULATE_READ = 22  # Linux >= 5.14
MADV_POPULATE_WRITE = 23
HUGE_SHARE = 0.8
"""A file mapping of at least REREAD_MIN bytes with less of its mapped bytes in 2 MiB pages than this
is read again (see populate). A fresh read of a 1 GB shard maps 92-96% of it by 2 MiB here."""
REREAD_MIN = 512 << 20


@functools.cache
def _libc_madvise():
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def madvise(addr: int, length: int, advice: int) -> bool:
    """madvise(2) on [addr, addr + length), widened to whole pages. Best effort: False where the
    kernel refuses (too old, or not a mapping it applies to)."""
    start = addr // mmap.PAGESIZE * mmap.PAGESIZE
    return length <= 0 or _libc_madvise()(start, addr + length - start, advice) == 0


def populate_write(addr: int, length: int, threads: int) -> bool:
    """Back [addr, addr + length) of fresh anonymous memory with pages now (MADV_POPULATE_WRITE), split
    over `threads` threads: the kernel faults a range in on the calling thread, and on this machine two
    threads fault fresh memory in 3-6x as fast as one (0.7-1.4 GB/s alone). Best effort: False where
    the kernel refuses (before Linux 5.14); the pages then come on first touch."""
    part = -(-length // max(1, threads)) // mmap.PAGESIZE * mmap.PAGESIZE or length
    ranges = [(a, min(part, addr + length - a)) for a in range(addr, addr + length, part)]
    ok = [False] * len(ranges)

    def run(i: int) -> None:
        ok[i] = madvise(*ranges[i], MADV_POPULATE_WRITE)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(1, len(ranges))]
    for w in workers:
        w.start()
    run(0)
    for w in workers:
        w.join()
    return all(ok)


def mapped_paths() -> dict[int, str]:
    """This process's memory mappings by start address: the mapped file's path ("" or a `[name]` for
    anonymous memory). From /proc/self/maps, which is cheap: /proc/self/smaps walks the page tables
    (a tenth of a second with a 13 GB checkpoint mapped)."""
    out: dict[int, str] = {}
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        head = line.split(maxsplit=5)
        out[int(head[0].split("-")[0], 16)] = head[5] if len(head) > 5 else ""
    return out


def _file_storage(t: torch.Tensor, maps: dict[int, str]) -> bool:
    return maps.get(t.untyped_storage().data_ptr(), "").startswith("/")  # a shard's storage maps the whole file


def file_backed(tensors) -> bool:
    """Whether every tensor lies in a memory-mapped file (a checkpoint shard), not in anonymous memory."""
    maps = mapped_paths()
    return all(_file_storage(t, maps) for t in tensors)


def drop_file_pages(tensors) -> int:
    """Drop the resident pages of memory-mapped (file-backed) tensors from this process; they come back
    from the file if read again. Tensors not backed by a file mapping are left alone. Returns the bytes
    dropped. For weights that live on in another form (`tilemem.kernels.X12Matrix`), so that the
    process does not hold both."""
    maps = mapped_paths()
    dropped = 0
    for t in tensors:
        if _file_storage(t, maps):
            n = t.numel() * t.element_size()
            dropped += n if madvise(t.data_ptr(), n, MADV_DONTNEED) else 0
    return dropped


def file_mappings() -> dict[int, dict]:
    """This process's file mappings by start address: path, size, resident and 2 MiB-mapped bytes
    (from /proc/self/smaps; empty where there is none)."""
    out: dict[int, dict] = {}
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return out
    vma = None
    for line in text.splitlines():
        head = line.split(maxsplit=5)
        if not head:
            continue
        if "-" in head[0] and not head[0].endswith(":"):  # "start-end perms offset dev inode [path]"
            start, end = (int(a, 16) for a in head[0].split("-"))
            vma = {"path": head[5] if len(head) > 5 else "", "size": end - start, "rss": 0, "pmd": 0}
            out[start] = vma
        elif vma is not None and head[0] in ("Rss:", "FilePmdMapped:"):
            vma["rss" if head[0] == "Rss:" else "pmd"] = int(head[1]) * 1024
    return out


def populate(tensors) -> bool:
    """Map the pages behind memory-mapped tensors now (madvise POPULATE_READ), so the first forward
    pass does not take a page fault per 4 KiB of weights. Best effort: False where unsupported.

    Then a file whose mapped bytes are not mostly in 2 MiB pages is read again: the page cache keeps
    what memory pressure left of a file as small folios, each 4 KiB of which costs a TLB entry, and a
    prefill over such weights ran at half speed here. The mapping's pages are dropped, the file's
    cached pages too, and a sequential read brings the file back in 2 MiB folios (~1 s per GB from
    disk) for populating again. Call it before anything writes to the tensors: dropping a private
    mapping's pages discards what was written to them."""
    tensors = list(tensors)
    ranges = [(t.data_ptr(), t.numel() * t.element_size()) for t in tensors]
    if not all(madvise(a, n, MADV_POPULATE_READ) for a, n in ranges):
        return False  # old kernel, or not a file mapping
    maps = file_mappings()
    for base in {t.untyped_storage().data_ptr() for t in tensors}:
        vma = maps.get(base)
        if vma is None or vma["rss"] < REREAD_MIN or vma["pmd"] >= HUGE_SHARE * vma["rss"]:
            continue
        if madvise(base, vma["size"], MADV_DONTNEED):
            reread(vma["path"])  # where the file is gone, populating maps what the cache still has
            for a, n in ranges:
                if base <= a < base + vma["size"]:
                    madvise(a, n, MADV_POPULATE_READ)
    return True


def reread(path: str) -> bool:
    """Drop `path`'s unmapped pages from the page cache and read it back sequentially (readahead then
    fills the cache with large folios). False where the file is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(fd, 64 << 20):
            pass
    finally:
        os.close(fd)
    return True
