"""What a tile store was built from: a crc32 of every source tensor, checked when the store is opened.

`tilemem convert` records, in `store.json` under `sources`, the crc32 of each weight tensor it packed
(by hub name) and the size, mtime and inode of each weight file. Opening the store against a
checkpoint stats those files: an unchanged file costs nothing; a changed one has its recorded
tensors read and checksummed again, and any difference makes the store stale. A file that only
moved or was touched, bytes unchanged, is remembered in `source_stat.json` so the next open is
cheap again.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import torch

from tilemem.loader.checkpoint import Checkpoint

STAT_CACHE = "source_stat.json"
"""File beside store.json: weight-file stats last seen with unchanged tensors (a cache, safe to delete)."""


def tensor_crc(t: torch.Tensor) -> int:
    """zlib.crc32 of a tensor's bytes as stored."""
    return zlib.crc32(t.contiguous().view(-1).view(torch.uint8).numpy())  # [nbytes]


def file_stat(path: Path) -> list[int]:
    """[size, mtime_ns, inode] of `path`: equal stats mean unchanged bytes (for files nobody forges)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def record_sources(ckpt: Checkpoint, crcs: dict[str, int]) -> dict:
    """The `sources` entry of store.json for tensors `crcs` ({hub name: crc32}) of `ckpt`."""
    files = sorted({ckpt.weight_map[name] for name in crcs})
    return {"tensors": dict(sorted(crcs.items())), "files": {f: file_stat(ckpt.files[f].path) for f in files}}


def stale_tensors(store: Path, sources: dict, ckpt: Checkpoint) -> list[str]:
    """Hub names of source tensors whose bytes in `ckpt` differ from those the store was built from
    (or that `ckpt` no longer has); empty when the store is current."""
    cache = _read_cache(store)
    by_file: dict[str, list[str]] = {}
    missing = []
    for name in sources["tensors"]:
        fname = ckpt.weight_map.get(name)
        if fname is None:
            missing.append(name)
        else:
            by_file.setdefault(fname, []).append(name)
    changed, seen = [], {}
    for fname, names in sorted(by_file.items()):
        stat = file_stat(ckpt.files[fname].path)
        if stat in (sources["files"].get(fname), cache.get(fname)):
            continue
        bad = [n for n in names if tensor_crc(ckpt.tensor(n)) != sources["tensors"][n]]
        changed += bad
        if not bad:
            seen[fname] = stat
    if seen and not changed and not missing:
        _write_cache(store, {**cache, **seen})
    return missing + changed


def _read_cache(store: Path) -> dict[str, list[int]]:
    try:
        data = json.loads((store / STAT_CACHE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(store: Path, cache: dict[str, list[int]]) -> None:
    """Best effort: a read-only store just checksums the changed files again next time."""
    tmp = store / (STAT_CACHE + ".tmp")
    try:
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, store / STAT_CACHE)
    except OSError:
        pass
