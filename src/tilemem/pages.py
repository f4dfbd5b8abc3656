"""Memory pages of mapped files and fresh buffers: madvise, populate, drop (Linux; best effort elsewhere).

A base module: the loader maps checkpoint shards with it, the kernels back x12 buffers with it, and the
layers ask whether weights are still file-backed.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import mmap
import os
import threading
from pathlib import Path

import torch

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


def file_ranges() -> list[tuple[int, int]]:
    """This process's mappings of files (a checkpoint shard, a GGUF file) as sorted [start, end) address ranges.
    From /proc/self/maps, which is cheap: /proc/self/smaps walks the page tables (a tenth of a second with a
    13 GB checkpoint mapped)."""
    out = []
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        head = line.split(maxsplit=5)
        if len(head) > 5 and head[5].startswith("/"):
            start, end = (int(a, 16) for a in head[0].split("-"))
            out.append((start, end))
    return sorted(out)


def _file_storage(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Whether t's storage lies in a mapped file: a safetensors shard's storage is a whole mapping, a GGUF file's
    tensors are views into one mapping of the file (their storages start anywhere in it)."""
    ptr = t.untyped_storage().data_ptr()
    i = bisect.bisect_right(ranges, (ptr, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= ptr < ranges[i][1]


def file_backed(tensors) -> bool:
    """Whether every tensor lies in a memory-mapped file (a checkpoint shard), not in anonymous memory."""
    ranges = file_ranges()
    return all(_file_storage(t, ranges) for t in tensors)


def drop_file_pages(tensors) -> int:
    """Drop the resident pages of memory-mapped (file-backed) tensors from this process; they come back
    from the file if read again. Tensors not backed by a file mapping are left alone. Returns the bytes
    dropped. For weights that live on in another form (`tilemem.kernels.X12Matrix`), so that the
    process does not hold both."""
    ranges = file_ranges()
    dropped = 0
    for t in tensors:
        if _file_storage(t, ranges):
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
