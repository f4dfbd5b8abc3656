"""A safetensors header must place every tensor in its own bytes: contiguous, disjoint, within the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tilemem.errors import CheckpointError
from tilemem.loader.safetensors_file import SafetensorsFile


def write_shard(path: Path) -> None:
    tensors = {"a": torch.arange(8, dtype=torch.float32), "b": torch.ones(8), "c": torch.full((4,), 2.0)}
    save_file(tensors, str(path))


def edit_header(path: Path, edit, extra: bytes = b"") -> None:
    """Rewrite the header of `path` with `edit(header)` applied, keeping the data bytes (plus `extra`)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :] + extra)


@pytest.fixture
def shard(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    write_shard(path)
    return path


def test_a_well_formed_shard_opens(shard):
    f = SafetensorsFile(shard)
    assert torch.equal(f.tensor("a"), torch.arange(8, dtype=torch.float32))
    assert torch.equal(f.tensor("c"), torch.full((4,), 2.0))


def test_offsets_pointing_into_another_tensor_are_refused(shard):
    def overlap(h):  # 'c' (16 bytes) now reads the last 16 bytes of 'b'
        b_end = h["b"]["data_offsets"][1]
        h["c"]["data_offsets"] = [b_end - 16, b_end]

    edit_header(shard, overlap)
    with pytest.raises(CheckpointError, match="invalid offset: tensor 'c'.*overlaps tensor 'b'"):
        SafetensorsFile(shard)


def test_two_tensors_sharing_the_same_bytes_are_refused(shard):
    def alias(h):
        h["c"]["shape"] = [8]
        h["c"]["data_offsets"] = list(h["b"]["data_offsets"])

    edit_header(shard, alias)
    with pytest.raises(CheckpointError, match="invalid offset.*overlaps"):
        SafetensorsFile(shard)


def test_a_gap_between_tensors_is_refused(shard):
    def gap(h):
        del h["b"]  # a's end and c's start are 32 bytes apart now

    edit_header(shard, gap)
    with pytest.raises(CheckpointError, match="invalid offset: tensor 'c'.*leaves a gap after tensor 'a'"):
        SafetensorsFile(shard)


def test_first_tensor_not_at_the_start_of_the_data_is_refused(shard):
    def skip(h):
        del h["a"]

    edit_header(shard, skip)
    with pytest.raises(CheckpointError, match="gap after the start of the data"):
        SafetensorsFile(shard)


def test_bytes_after_the_last_tensor_are_refused(shard):
    edit_header(shard, lambda h: None, extra=b"\0" * 4)
    with pytest.raises(CheckpointError, match="file has .* bytes; the header is corrupt or the file was appended"):
        SafetensorsFile(shard)
