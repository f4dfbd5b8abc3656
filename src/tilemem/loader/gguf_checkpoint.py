"""A GGUF file opened as a checkpoint: the config its metadata implies, its tensors under our module names.

`Checkpoint.open` hands a `.gguf` path here; `load_model` then loads it like a safetensors checkpoint, keeping
quantized matrices as their blocks (`layers.ggml.GgmlMatrix`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tilemem.config import ModelConfig
from tilemem.layers.ggml import GgmlMatrix
from tilemem.loader import gguf_arch
from tilemem.loader.gguf_file import GgufFile
from tilemem.models.registry import Family, config_from_hf, family_for_architecture


@dataclass
class GgufCheckpoint:
    """An opened GGUF model (one file or a split set), with the same reading interface as `Checkpoint`."""

    path: Path
    file: GgufFile
    hf_config: dict[str, Any]
    family: Family
    config: ModelConfig
    names: dict[str, str] = field(default_factory=dict)
    """Our module name -> the GGUF tensor it comes from (for messages)."""
    config_source = "the GGUF metadata"

    @classmethod
    def open(cls, path: str | Path) -> GgufCheckpoint:
        g = GgufFile(path)
        hf = gguf_arch.hf_config(g)
        config = config_from_hf(hf, str(g.path))
        return cls(
            path=g.path, file=g, hf_config=hf, family=family_for_architecture(config.architecture), config=config
        )

    def tensors(self) -> Iterator[tuple[str, torch.Tensor | GgmlMatrix]]:
        """(our name, value) for every tensor: float tensors, or quantized matrices as their blocks."""
        for ours, gguf_name, value in gguf_arch.tensors(self.file, self.hf_config):
            self.names[ours] = gguf_name
            yield ours, value

    def to_ours(self, name: str) -> str:
        return name

    def to_hub(self, our_name: str) -> str:
        """The GGUF tensor name behind one of our module names."""
        return self.names.get(our_name, our_name)

    def nbytes(self) -> int:
        """Bytes of the file(s)."""
        return self.file.nbytes

    def quant_types(self) -> dict[str, int]:
        """Tensor type -> tensor count (what `inspect` shows)."""
        out: dict[str, int] = {}
        for t in self.file.tensors.values():
            out[t.type_name] = out.get(t.type_name, 0) + 1
        return out
