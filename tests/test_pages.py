"""`tilemem.pages.file_backed`: which tensors lie in a mapped file (their pages can be let go once the weights live on
in another form, x12) and which in anonymous memory."""

from __future__ import annotations

import numpy as np
import torch

from tilemem import pages


def test_views_into_a_mapped_file_are_file_backed(tmp_path):
    """A safetensors shard's storage is a whole mapping; a GGUF file's tensors are views into one mapping of the file,
    starting anywhere in it (an x12 encoding of a BF16 GGUF file's weights was refused before)."""
    path = tmp_path / "blob.bin"
    path.write_bytes(np.arange(3 << 20, dtype=np.uint8).tobytes())
    mapped = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable, still a file mapping
    whole = torch.from_numpy(np.asarray(mapped).view(np.int16))  # the whole mapping
    inner = torch.from_numpy(np.asarray(mapped[4096 + 96 : 4096 + 96 + 2048]).view(np.int16))  # mid-file, unaligned
    anon = torch.zeros(1024, dtype=torch.int16)
    assert pages.file_backed([whole]) and pages.file_backed([inner])
    assert not pages.file_backed([anon]) and not pages.file_backed([inner, anon])
    past = torch.from_numpy(np.asarray(mapped[-2:]).view(np.int16))  # the mapping's last bytes
    assert pages.file_backed([past])
