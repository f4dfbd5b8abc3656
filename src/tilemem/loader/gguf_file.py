"""GGUF files (llama.cpp's format): metadata and a table of memory-mapped tensors, one file or a split set.

The `gguf` package parses the header (key-value metadata, tensor infos); tensor bytes are the file's mapped
pages, handed to torch without a copy: F32/F16/BF16 tensors as float tensors, quantized ones as `GgmlMatrix`
blocks (`layers.ggml`). Shapes here are torch's order ([rows, cols] for a matrix: ggml's `ne` reversed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tilemem.errors import CheckpointError, WeightError
from tilemem.layers.ggml import BY_GGML_TYPE, QUANT_TYPES, GgmlMatrix

SUPPORTED_VERSIONS = (2, 3)
FLOAT_TYPES = {0: ("f32", torch.float32), 1: ("f16", torch.float16), 30: ("bf16", torch.bfloat16)}
"""ggml_type -> (name, torch dtype) of the unquantized types."""
SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
SUPPORTED_NAMES = ", ".join(["f32", "f16", "bf16", *QUANT_TYPES])


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the table."""

    name: str
    type_name: str
    """f32, f16, bf16 or a block type (`q4_k`, ...)."""
    shape: tuple[int, ...]
    """Torch order: [..., rows, cols]."""
    value: torch.Tensor | GgmlMatrix
    """A float tensor of `shape`, or a quantized one's blocks (`data` uint8 [..., rows, row_bytes])."""
    file: Path

    @property
    def quantized(self) -> bool:
        return self.type_name in QUANT_TYPES

    @property
    def nbytes(self) -> int:
        v = self.value
        return v.nbytes if isinstance(v, GgmlMatrix) else v.numel() * v.element_size()


def split_parts(path: Path) -> list[Path]:
    """The files of a split set given its first part (`-00001-of-0000N.gguf`), or [path] for one file."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    if int(m["index"]) != 1:
        raise CheckpointError(
            f"'{path}' is part {int(m['index'])} of a split GGUF set; pass its first part "
            f"({m['stem']}-00001-of-{m['count']}.gguf)."
        )
    count = int(m["count"])
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{m['count']}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise CheckpointError(
            f"the split GGUF set {path.name} has {count} parts but {', '.join(missing)} is missing from "
            f"{path.parent}; download every part."
        )
    return parts


def _read(path: Path):
    """A `gguf.GGUFReader` on `path`, or a CheckpointError that names the file and the problem."""
    import gguf

    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise CheckpointError(f"cannot read '{path}' ({exc.strerror}).") from None
    if head[:4] != b"GGUF":
        raise CheckpointError(
            f"'{path}' is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF'); pass a .gguf file written by "
            "llama.cpp's converter or `tilemem synth --format gguf`."
        )
    version = int.from_bytes(head[4:8], "little")
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"'{path}' is GGUF version {version}; TileMEM reads versions {', '.join(map(str, SUPPORTED_VERSIONS))} "
            "(re-convert it with a current llama.cpp)."
        )
    try:
        return gguf.GGUFReader(path, "c")
    except (ValueError, IndexError, KeyError, OSError, TypeError) as exc:
        raise CheckpointError(f"'{path}' is truncated or corrupt ({exc}); re-download or re-convert it.") from None


def _metadata(reader, path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            value = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"'{path}': metadata key '{key}' cannot be read ({exc}); it is corrupt.") from None
        out[key] = value
    return out


def _tensor(t, path: Path) -> GgufTensor:
    """Wrap one tensor info of the reader: its bytes as a torch view (no copy), checked for size."""
    shape = tuple(int(n) for n in reversed(t.shape))
    kind = int(t.tensor_type)
    data = t.data
    if kind in FLOAT_TYPES:
        name, dtype = FLOAT_TYPES[kind]
        flat = torch.from_numpy(np.asarray(data).reshape(-1).view(np.uint8))
        if flat.numel() != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(f"'{path}': tensor '{t.name}' is cut short; the file is truncated.")
        return GgufTensor(t.name, name, shape, flat.view(dtype).view(shape), path)
    if kind not in BY_GGML_TYPE:
        type_name = getattr(t.tensor_type, "name", str(kind))
        raise WeightError(
            f"'{path}': tensor '{t.name}' is of type {type_name}, which TileMEM does not compute; supported types: "
            f"{SUPPORTED_NAMES} (re-quantize the file to one of them, e.g. `llama-quantize IN OUT Q4_K_M`)."
        )
    q = BY_GGML_TYPE[kind]
    cols = shape[-1]
    if cols % q.weights:
        raise WeightError(f"'{path}': tensor '{t.name}' has rows of {cols}, not a multiple of {q.name}'s blocks.")
    blocks = torch.from_numpy(np.asarray(data).view(np.uint8))
    want = (*shape[:-1], q.row_bytes(cols))
    if blocks.numel() != int(np.prod(want, dtype=np.int64)):
        raise CheckpointError(f"'{path}': tensor '{t.name}' is cut short; the file is truncated.")
    blocks = blocks.reshape(want)
    return GgufTensor(t.name, q.name, shape, GgmlMatrix(blocks, q.name, cols), path)


class GgufFile:
    """An opened GGUF model: metadata of the first part, the tensors of every part."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"GGUF file '{path}' does not exist.")
        self.path = path
        self.parts = split_parts(path)
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, GgufTensor] = {}
        for i, part in enumerate(self.parts):
            reader = _read(part)
            if i == 0:
                self.metadata = _metadata(reader, part)
            for t in reader.tensors:
                self.tensors[t.name] = _tensor(t, part)
        self.architecture = str(self.metadata.get("general.architecture", ""))
        if not self.architecture:
            raise CheckpointError(f"'{path}' has no general.architecture in its metadata; it is not a model file.")

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value; keys starting with '.' are relative to the architecture (`.block_count`)."""
        return self.metadata.get(self.architecture + key if key.startswith(".") else key, default)

    def req(self, key: str) -> Any:
        """A metadata value the model needs, or a CheckpointError naming the key."""
        value = self.get(key)
        if value is None:
            full = self.architecture + key if key.startswith(".") else key
            raise CheckpointError(f"'{self.path}' lacks the metadata key '{full}'; the file is incomplete.")
        return value

    def tensor(self, name: str) -> GgufTensor:
        """The tensor called `name`, or a WeightError naming it and the file."""
        if name not in self.tensors:
            raise WeightError(
                f"'{self.path}' has no tensor '{name}'; the file is incomplete or not a {self.architecture} model."
            )
        return self.tensors[name]

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.parts)


def is_gguf(path: str | Path) -> bool:
    """Whether `path` names a GGUF file (by its suffix): what `Checkpoint.open` sends to the GGUF reader."""
    p = Path(path)
    return p.suffix == ".gguf" and not p.is_dir()
