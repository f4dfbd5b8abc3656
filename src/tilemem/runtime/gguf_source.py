"""A GGUF file as the tile store's source: each FFN unit's weights as the file stores them (quantized blocks stay
blocks), and the reading interface the store's source checks use (`weight_map`, `files`, `tensor`).

Routed experts are slices of the stacked `blk.L.ffn_{gate,up,down}_exps.weight` tensors; the shared experts are
`ffn_*_shexp`, a dense layer's FFN `ffn_{gate,up,down}`. Source checksums are taken per GGUF tensor (a stack
once for all its experts).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tilemem.errors import CheckpointError
from tilemem.layers.ggml import QUANT_TYPES, GgmlMatrix
from tilemem.loader.checkpoint import Checkpoint
from tilemem.loader.gguf_checkpoint import GgufCheckpoint
from tilemem.models.topology import DENSE, SHARED
from tilemem.placement.formats import TileFormat, tile_format

Weight = torch.Tensor | GgmlMatrix
"""One FFN matrix as stored: a float tensor, or quantized blocks."""
KINDS = {DENSE: ("ffn_gate", "ffn_up", "ffn_down"), SHARED: ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")}
ROUTED = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


@dataclass(frozen=True)
class _Part:
    """One file of the set (what `store_sources` stats)."""

    path: Path


class GgufSource:
    """The FFN weights of an opened GGUF model, by unit, with the checkpoint interface the tile store reads."""

    def __init__(self, ckpt: GgufCheckpoint) -> None:
        self.ckpt = ckpt
        self.path = ckpt.path
        self.config = ckpt.config
        self.file = ckpt.file
        self.weight_map = {name: t.file.name for name, t in self.file.tensors.items()}
        """GGUF tensor name -> the name of the file (part) holding it."""
        self.files = {p.name: _Part(p) for p in self.file.parts}

    def ffn_names(self, layer: int, unit: int) -> list[str]:
        """GGUF names of the gate, up and down tensors of one FFN unit (routed expert, SHARED or DENSE)."""
        return [f"blk.{layer}.{kind}.weight" for kind in KINDS.get(unit, ROUTED)]

    def tensor(self, name: str) -> torch.Tensor:
        """A GGUF tensor's stored values (a quantized one's block bytes): what its source checksum covers."""
        value = self.file.tensor(name).value
        return value.data if isinstance(value, GgmlMatrix) else value

    def unit_weights(self, layer: int, unit: int) -> tuple[Weight, Weight, Weight]:
        """gate [I, D], up [I, D], down [D, I] of one FFN unit as stored (mapped views of the file)."""
        out = []
        for name in self.ffn_names(layer, unit):
            value = self.file.tensor(name).value
            if unit >= 0 and isinstance(value, GgmlMatrix):  # one expert of the stack
                value = GgmlMatrix(value.data[unit], value.qtype, value.cols)
            elif unit >= 0:
                value = value[unit]
            out.append(value)
        return tuple(out)

    def ggml_types(self, layer: int, unit: int) -> tuple[str, str, str] | None:
        """The quant types of one unit's gate, up and down; None when they are float tensors (CheckpointError
        for a unit that mixes the two)."""
        types = [self.file.tensor(name).type_name for name in self.ffn_names(layer, unit)]
        quantized = [self.file.tensor(name).quantized for name in self.ffn_names(layer, unit)]
        if all(quantized):
            return tuple(types)
        if any(quantized):
            raise CheckpointError(
                f"'{self.path}': the FFN of layer {layer} mixes quantized and float matrices ({', '.join(types)}); "
                "the tile store packs one or the other: re-quantize the file (e.g. `llama-quantize IN OUT Q4_K_M`)."
            )
        return None

    def fingerprint(self) -> str:
        """sha256 over the config the metadata implies and the tensor table (names, types, shapes)."""
        h = hashlib.sha256(json.dumps(self.ckpt.hf_config, sort_keys=True, default=str).encode())
        table = sorted((n, t.type_name, list(t.shape)) for n, t in self.file.tensors.items())
        h.update(json.dumps(table).encode())
        return h.hexdigest()


def store_source(ckpt: Checkpoint | GgufCheckpoint | GgufSource) -> Checkpoint | GgufSource:
    """What the tile store reads a checkpoint through: a GGUF model as a `GgufSource`, else itself."""
    return GgufSource(ckpt) if isinstance(ckpt, GgufCheckpoint) else ckpt


def ffn_types(ckpt: Checkpoint | GgufCheckpoint) -> dict[tuple[int, int], tuple[str, str, str]] | None:
    """A GGUF model's FFN quant types as `Topology.from_config(cfg, dtype, ffn_types)` takes them (its FFN bytes
    are then its blocks'); None for a safetensors checkpoint or a GGUF file whose FFN weights are float."""
    if not isinstance(ckpt, GgufCheckpoint):
        return None
    from tilemem.runtime.tile_store import store_codec  # tile_store reads GGUF files through this module

    codec = store_codec(GgufSource(ckpt))
    return plan_types(codec.ggml_units) if codec.gguf else None


def quantized_bytes(ckpt: Checkpoint | GgufCheckpoint) -> dict[str, int] | None:
    """A GGUF model's quantized weights' bytes as stored (our name -> bytes), as `Topology.from_config` takes
    them for its non-expert weights; None for a safetensors checkpoint."""
    if not isinstance(ckpt, GgufCheckpoint):
        return None
    from tilemem.layers.ggml import GgmlMatrix

    return {name: v.nbytes for name, v in ckpt.tensors() if isinstance(v, GgmlMatrix)}


def plan_types(units: dict[tuple[int, int], tuple[str, str, str]]) -> dict[tuple[int, int], tuple[str, str, str]]:
    """The quant types `Topology.ffn_types` takes, from a GGUF store codec's `ggml_units`: per layer its routed
    experts' (unit 0; a stack shares one type), its shared experts' and its dense FFN's."""
    return {key: types for key, types in units.items() if key[1] <= 0}


def gguf_tile_format(units: dict[tuple[int, int], tuple[str, str, str]]) -> TileFormat:
    """The tile format a GGUF model's plans name: the file's widest quant type (most bytes per weight among its FFN
    matrices). Plans count each FFN unit's bytes in its own types (`Topology.ffn_types`, through
    `placement.tiles.ffn_unit_bytes`: a Q4_K_M file's q4_k and q6_k downs each as stored); this format counts
    only where a topology has no types (a plan saved before they were written into it)."""
    widest = max((QUANT_TYPES[q] for types in units.values() for q in types), key=lambda q: q.nbytes / q.weights)
    return tile_format(f"gguf_{widest.name}")
