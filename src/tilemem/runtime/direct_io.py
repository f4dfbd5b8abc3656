"""O_DIRECT reads into page-aligned buffers, so the page cache never hides the disk.

Falls back to buffered reads (with posix_fadvise DONTNEED after each read, so repeated runs still
come from the device) where the filesystem refuses O_DIRECT (tmpfs, some overlays).
"""

from __future__ import annotations

import mmap
import os

import torch

from tilemem.placement.store_layout import ALIGNMENT, align


class AlignedSlab:
    """One anonymous, page-aligned region split into equal slots (the DRAM tile cache's memory)."""

    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.slot_bytes = slot_bytes
        self.slots = slots
        self.mem = mmap.mmap(-1, max(1, slots * slot_bytes))
        self.view = memoryview(self.mem)
        self.free = list(range(slots - 1, -1, -1))

    def buffer(self, slot: int) -> memoryview:
        """The writable bytes of `slot`."""
        return self.view[slot * self.slot_bytes : (slot + 1) * self.slot_bytes]

    def tensor(self, slot: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        """A tensor view of the first `nbytes` of `slot` (no copy)."""
        return torch.frombuffer(self.mem, dtype=dtype, count=nbytes // dtype.itemsize, offset=slot * self.slot_bytes)

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return self.slots * self.slot_bytes


class DirectReader:
    """Positional reads of a file with O_DIRECT when the filesystem supports it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self.direct = True
        fd = -1
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            with mmap.mmap(-1, ALIGNMENT) as probe:
                os.preadv(fd, [probe], 0)
        except OSError:
            if fd >= 0:
                os.close(fd)  # the filesystem opened it but refuses direct reads: do not leak it
            self.direct = False
            fd = os.open(self.path, os.O_RDONLY)
        self.fd = fd

    def read_into(self, buf: memoryview, offset: int, nbytes: int) -> int:
        """Read `nbytes` (rounded up to 4 KiB when direct) at `offset` into `buf`; returns bytes read."""
        if self.direct:
            length = align(nbytes)
            n = os.preadv(self.fd, [buf[:length]], offset)
        else:
            n = os.preadv(self.fd, [buf[:nbytes]], offset)
            os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        if n < nbytes:
            raise OSError(f"short read of {self.path}: {n} of {nbytes} bytes at offset {offset}")
        return n

    def close(self) -> None:
        """Close the file."""
        os.close(self.fd)
