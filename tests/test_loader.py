"""Memory-mapped weights: what `populate` leaves behind the mapping."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from tilemem import pages
from tilemem.loader import safetensors_file as sf


def map_and_populate(path) -> tuple[dict, torch.Tensor]:
    """Map the file's tensor, populate it; (its mapping's smaps figures, a copy of the tensor)."""
    t = sf.SafetensorsFile(path).tensor("w")
    assert pages.populate([t])
    return pages.file_mappings()[t.untyped_storage().data_ptr()], t.clone()  # the mapping goes with t


def test_populate_rereads_a_file_the_page_cache_holds_in_small_pages(tmp_path, monkeypatch):
    """A file whose cached pages are small folios (what memory pressure leaves) is read back in large
    folios by populate: as much of it mapped by 2 MiB entries as after a fresh read, same bytes."""
    path = tmp_path / "w.safetensors"
    w = torch.randint(-(2**15), 2**15, (40, 2**20), generator=torch.Generator().manual_seed(0), dtype=torch.int16)
    save_file({"w": w}, str(path))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # written back, so the cache can drop it
    assert pages.reread(str(path))
    monkeypatch.setattr(pages, "HUGE_SHARE", 0.0)  # no re-read: what a fresh read maps by 2 MiB
    fresh, _ = map_and_populate(path)
    if fresh["pmd"] == 0:
        pytest.skip("this filesystem or kernel maps no file pages by 2 MiB")
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: one 4 KiB folio per read
        for off in range(0, os.fstat(fd).st_size, 4096):
            os.pread(fd, 4096, off)
    finally:
        os.close(fd)
    monkeypatch.setattr(pages, "HUGE_SHARE", 0.9 * fresh["pmd"] / fresh["rss"])
    monkeypatch.setattr(pages, "REREAD_MIN", 0)  # a small file stands in for a shard
    vma, t = map_and_populate(path)
    assert vma["pmd"] >= 0.9 * fresh["pmd"]
    assert torch.equal(t, w)
