"""Zero-copy, memory-mapped reading of one .safetensors file, with checks that name the problem.

The format is an 8-byte little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then the raw bytes. We map the file privately (copy-on-write)
and hand out tensor views into the mapping, so loading never holds a second copy of the weights.
"""

from __future__ import annotations

import json
import math
import struct
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
    "F8_E4M3": torch.float8_e4m3fn,
}
if hasattr(torch, "float8_e8m0fnu"):
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu

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
            if isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] not in DTYPES:
                raise CheckpointError(
                    f"{self.path}: tensor '{name}' is stored as {info['dtype']}, which TileMEM does not read "
                    f"(it reads {', '.join(DTYPES)}); a checkpoint quantized another way needs its bf16 or FP8 "
                    "release."
                )
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
