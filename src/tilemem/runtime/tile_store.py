"""The tile store (weight converter output): FFN weights packed tile by tile: every routed expert,
and the shared experts (unit SHARED) and dense FFN layers (unit DENSE), which the plan places too.

One block per (layer, unit, neuron range [a, b)), 4 KiB aligned, weight format kept (`tile_format`):
gate rows [n, D], up rows [n, D], then down columns stored transposed as [n, D], so a tile is one
contiguous [3, n, D] array readable with a single O_DIRECT request and usable without a copy; an FP8
tile's 128 x 128 block scales follow its e4m3 bytes (tiles then start on 128-neuron boundaries); a GGUF
file's tiles keep its quantized blocks (`tile_format`: gate and up rows, then down's rows cut to the tile's
blocks; tiles start on down's block boundaries), read through `gguf_source`.
Blocks are ordered (layer, expert, a): a whole expert is one contiguous run.

`store.json` holds the layout, per-tile sha256, a fingerprint of the source checkpoint's config and
index, and a crc32 of every source tensor (`store_sources`): opening the store against a checkpoint
whose expert weights changed since conversion refuses it as stale.
Conversion writes `tiles.bin.partial` + a progress journal, then renames; a re-run resumes,
checking the journaled tiles it keeps. Re-running over a finished store verifies every tile and
rewrites the corrupt ones; over a stale store it converts again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from tilemem.errors import CheckpointError, TileMemError, X12Overflow
from tilemem.jsonio import read_json_object
from tilemem.layers import x12 as x12_codec
from tilemem.loader.checkpoint import Checkpoint
from tilemem.loader.safetensors_file import DTYPES
from tilemem.models.topology import Topology, our_ffn_prefix
from tilemem.placement.formats import bf16_store_format
from tilemem.placement.store_layout import ALIGNMENT, align, store_order
from tilemem.placement.tiles import DENSE, SHARED, Unit, always_active_ffns, ffn_width, tile_key
from tilemem.runtime.gguf_source import GgufSource, store_source
from tilemem.runtime.store_sources import STAT_CACHE, file_stat, record_sources, stale_tensors, tensor_crc
from tilemem.runtime.tile_format import TileCodec

SCHEMA = "tilemem_store_v1"
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
log = logging.getLogger(__name__)


class StoreError(TileMemError):
    """A tile store is missing, incomplete, corrupt or belongs to another checkpoint."""


@dataclass(frozen=True)
class StoredTile:
    """Where one tile's [3, n, D] block lives in tiles.bin."""

    layer: int
    expert: int
    start: int
    end: int
    offset: int
    nbytes: int
    """Payload bytes (3 * n * D * itemsize; FP8: 3 * n * D, then the block scales; GGUF: the blocks of its rows)."""
    sha256: str
    crc32: int
    """zlib.crc32 of the payload, checked on every runtime read (sha256 by `tilemem verify`)."""

    @property
    def padded(self) -> int:
        """Bytes read with O_DIRECT (payload rounded up to the alignment)."""
        return align(self.nbytes)

    @property
    def key(self) -> str:
        """Stable key of the block (both projection groups), e.g. `L3:E17:S0:N0-128`."""
        return tile_key(self.layer, self.expert, None, 0, self.start, self.end)


def checkpoint_fingerprint(ckpt: Checkpoint | GgufSource) -> str:
    """sha256 over config.json and the tensor index: the checkpoint's shape (GGUF: its implied config and
    tensor table). The weights themselves are checked tensor by tensor (`store_sources`)."""
    if isinstance(ckpt, GgufSource):
        return ckpt.fingerprint()
    h = hashlib.sha256((ckpt.path / "config.json").read_bytes())
    h.update(json.dumps(sorted(ckpt.weight_map.items())).encode())
    return h.hexdigest()


def expert_names(ckpt: Checkpoint | GgufSource, layer: int, expert: int) -> list[str]:
    """Hub names of the gate, up and down weights of one FFN unit (routed expert, SHARED or DENSE; GGUF: the
    tensors holding them, a routed expert's the layer's stacks)."""
    if isinstance(ckpt, GgufSource):
        return ckpt.ffn_names(layer, expert)
    prefix = our_ffn_prefix(layer, expert) + "."
    return [ckpt.family.to_hub(prefix + p + ".weight") for p in ("gate_proj", "up_proj", "down_proj")]


def expert_tensors(ckpt: Checkpoint | GgufSource, layer: int, expert: int) -> tuple:
    """gate [I, D], up [I, D], down [D, I] of one FFN unit (routed expert, SHARED or DENSE), memory-mapped
    (GGUF: quantized ones as `GgmlMatrix` blocks)."""
    if isinstance(ckpt, GgufSource):
        return ckpt.unit_weights(layer, expert)
    return tuple(ckpt.tensor(name) for name in expert_names(ckpt, layer, expert))


def store_units(ckpt: Checkpoint) -> list[tuple[int, int, int]]:
    """(layer, unit, width) of every FFN the store holds, in store order (`placement.store_layout.store_order`:
    per layer the dense FFN or the shared experts first, then the routed experts)."""
    topo = Topology.from_config(ckpt.config)
    always = set(always_active_ffns(topo))
    units = []
    for lt in topo.layers:
        for unit in (DENSE, SHARED):
            if (lt.index, unit) in always:
                units.append((lt.index, unit, ffn_width(topo, lt.index, unit)))
        units += [(lt.index, e, lt.expert_intermediate) for e in range(lt.num_experts if lt.is_moe else 0)]
    return sorted(units, key=lambda u: store_order(Unit(u[0], u[1], 0, 0, u[2])))


def tile_ranges(width: int, tile: int) -> list[tuple[int, int]]:
    """[a, b) ranges of `tile` neurons covering `width` (the last one shorter when it does not divide)."""
    return [(a, min(a + tile, width)) for a in range(0, width, tile)]


def expert_scales(ckpt: Checkpoint, layer: int, expert: int) -> tuple[torch.Tensor, ...] | None:
    """fp32 block scales of one FFN unit's gate, up and down (None: its weights are not FP8)."""
    names = [n.removesuffix(".weight") + ".weight_scale_inv" for n in expert_names(ckpt, layer, expert)]
    if names[0] not in ckpt.weight_map:
        return None
    return tuple(ckpt.tensor(n).float() for n in names)


def unit_weights(ckpt: Checkpoint, codec: TileCodec, layer: int, expert: int) -> tuple:
    """(gate, up, down, their fp32 block scales or None) of one FFN unit, as `pack_tile` takes them."""
    return (*expert_tensors(ckpt, layer, expert), expert_scales(ckpt, layer, expert) if codec.fp8 else None)


def pack_tile(codec: TileCodec, weights: tuple, a: int, b: int) -> bytes:
    """The stored bytes of neurons [a, b) of one FFN unit (`unit_weights`)."""
    return codec.pack(*weights[:3], a, b, weights[3]).numpy().tobytes()


TILE_FORMATS = ("auto", "x12", "plain")
"""How `convert` packs bf16 tiles: `x12` (lossless, 12 bits per weight), `plain` (bf16 as stored), `auto` (x12
where it is smaller: rows of a multiple of 32 weights). Other dtypes, FP8 and GGUF blocks are kept as they are."""


def store_codec(ckpt: Checkpoint | GgufSource, tile_format: str = "plain", tile_size: int = 128) -> TileCodec:
    """How `ckpt`'s FFN weights are packed into tiles: their stored dtype (FP8 stays FP8, GGUF blocks stay
    blocks, in each unit's types); bf16 tiles as x12 payloads as `tile_format` (`TILE_FORMATS`) says for tiles
    of `tile_size` neurons."""
    layer = next(i for i in range(ckpt.config.num_layers) if ckpt.config.is_moe_layer(i))
    if isinstance(ckpt, GgufSource):
        types = {(lay, unit): ckpt.ggml_types(lay, unit) for lay, unit, _ in store_units(ckpt)}
        if all(t is not None for t in types.values()):
            return TileCodec(torch.uint8, ckpt.config.hidden_size, ggml_units=types)
        if any(t is not None for t in types.values()):
            lay, unit = next(k for k, t in types.items() if t is None)
            raise StoreError(
                f"{ckpt.path} stores the FFN weights of layer {lay} unquantized and others quantized; the tile store "
                "packs one kind: re-quantize the file (e.g. `llama-quantize IN OUT Q4_K_M`)."
            )
    codec = TileCodec(expert_tensors(ckpt, layer, 0)[0].dtype, ckpt.config.hidden_size)
    if tile_format not in TILE_FORMATS:
        raise StoreError(f"unknown tile format '{tile_format}'; choose one of {', '.join(TILE_FORMATS)}.")
    if tile_format == "x12" and codec.dtype != torch.bfloat16:
        raise StoreError(f"x12 tiles hold bf16 weights, not {DTYPE_NAMES[codec.dtype]}; convert with tile format auto.")
    if tile_format == "plain" or codec.dtype != torch.bfloat16:
        return codec
    fits = x12_codec.supported(codec.hidden)
    if tile_format == "x12" and not fits:
        raise StoreError(
            f"x12 tiles need a hidden size that is a multiple of 32, not {codec.hidden}; convert with tile format "
            "plain (or auto)."
        )
    if tile_format == "auto" and bf16_store_format(codec.hidden, tile_size).name != "x12":
        return codec  # tiny tiles: the exception area outweighs the saving
    return replace(codec, x12=True)


STORE_FILES = ("store.json", "store.json.tmp", "tiles.bin", "tiles.bin.partial", "convert.journal", STAT_CACHE)
"""Every file conversion writes into a store directory (the only ones it ever removes)."""


def convert(
    model: str | Path, out: str | Path, tile_size: int = 128, progress: bool = True, tile_format: str = "auto"
) -> Path:
    """Pack a checkpoint's routed experts into a tile store at `out`; resumable and atomic. bf16 tiles are
    packed as `tile_format` says (`TILE_FORMATS`; a tile that x12 cannot hold turns the store plain).

    Over a finished store of this checkpoint it verifies every tile and rewrites the corrupt ones (in the
    store's own format); over one that no longer matches this checkpoint's weights (stale), it converts again."""
    try:
        return _convert(model, out, tile_size, progress, tile_format)
    except X12Overflow as exc:
        if tile_format == "x12":
            raise StoreError(
                f"{exc}: this checkpoint's tiles cannot all be x12; convert with tile format plain."
            ) from None
        log.warning("%s; converting %s with plain bf16 tiles", exc, model)
        _clear(Path(out))
        return _convert(model, out, tile_size, progress, "plain")


def _convert(model: str | Path, out: str | Path, tile_size: int, progress: bool, tile_format: str) -> Path:
    ckpt = store_source(Checkpoint.open(model))
    cfg = ckpt.config
    out = Path(out)
    if tile_size < 1:
        raise StoreError(f"tile size must be >= 1 neuron, got {tile_size}.")
    codec = store_codec(ckpt, tile_format, tile_size)
    try:
        codec.check_tile_size(tile_size)
    except ValueError as exc:
        raise StoreError(f"{exc}.") from None
    if out.exists() and not out.is_dir():
        raise StoreError(f"tile store path {out} exists and is not a directory; give a directory for the store.")
    fingerprint = checkpoint_fingerprint(ckpt)
    if (out / "store.json").exists():
        held = held_format(out)
        if tile_format != "auto" and codec.dtype == torch.bfloat16 and held not in (None, tile_format):
            raise StoreError(
                f"{out} already holds a tile store with {held} tiles, not {tile_format}; remove it or choose another "
                "--out."
            )
        if _keep_finished(out, ckpt, fingerprint, tile_size, progress):
            return out
    out.mkdir(parents=True, exist_ok=True)
    data_tmp, journal = out / "tiles.bin.partial", out / "convert.journal"
    done: dict[str, dict] = {}
    crcs: dict[str, int] = {}
    stats = {f: file_stat(ckpt.files[f].path) for f in sorted(ckpt.files)}
    header = {"key": "_header", "fingerprint": fingerprint, "tile_size": tile_size, "files": stats, "x12": codec.x12}
    if journal.exists() and data_tmp.exists():
        for line in journal.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a crash: redo that tile
            if rec.get("fingerprint", fingerprint) != fingerprint:
                raise StoreError(f"{out} holds a partial conversion of another checkpoint; delete {out}.")
            if rec.get("tile_size", tile_size) != tile_size:
                # Same keys can sit at other offsets under another tile size: never mix the two.
                raise StoreError(
                    f"{out} holds a partial conversion with tile size {rec['tile_size']}, not {tile_size}; "
                    f"re-run with tile size {rec['tile_size']} to resume it, or delete {out}."
                )
            done[rec["key"]] = rec
        head = done.pop("_header", {})
        if head.get("files") != stats or head.get("x12", False) != codec.x12:  # other weights or format
            if done:
                log.warning("%s: the checkpoint's weight files or the tile format changed since the interrupted "
                            "conversion; converting from the start", out)  # fmt: skip
            done = {}
            journal.write_text(json.dumps(header) + "\n")
    else:
        journal.write_text(json.dumps(header) + "\n")
    layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    units = store_units(ckpt)
    tiles: list[StoredTile] = []
    offset = 0
    spans = [(layer, unit, a, b) for layer, unit, width in units for a, b in tile_ranges(width, tile_size)]
    total = sum(codec.unit(layer, unit).payload_bytes(b - a) for layer, unit, a, b in spans)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress)
    with open(data_tmp, "r+b" if data_tmp.exists() else "w+b") as data, open(journal, "a") as jr:
        for layer, expert, width in units:
            for name in expert_names(ckpt, layer, expert):  # a GGUF stack: once for all its experts
                if name not in crcs:
                    crcs[name] = tensor_crc(ckpt.tensor(name))
            weights = unit_weights(ckpt, codec, layer, expert)  # once per unit, not per tile
            unit_codec = codec.unit(layer, expert)
            for a, b in tile_ranges(width, tile_size):
                nbytes = unit_codec.payload_bytes(b - a)
                key = tile_key(layer, expert, None, 0, a, b)
                rec = done.get(key)
                # A journaled tile is kept only if the partial file really holds it (writes can be lost).
                if rec is None or rec.get("offset", offset) != offset or not _holds(data, offset, nbytes, rec):
                    raw = pack_tile(unit_codec, weights, a, b)
                    data.seek(offset)
                    data.write(raw + b"\0" * (align(nbytes) - nbytes))
                    sha = hashlib.sha256(raw).hexdigest()
                    rec = {"key": key, "offset": offset, "sha256": sha, "crc32": zlib.crc32(raw)}
                    data.flush()
                    jr.write(json.dumps(rec) + "\n")
                    jr.flush()
                tiles.append(StoredTile(layer, expert, a, b, offset, nbytes, rec["sha256"], rec["crc32"]))
                offset += align(nbytes)
                bar.update(nbytes)
        data.truncate(offset)
        os.fsync(data.fileno())
    bar.close()
    meta = {
        "schema_version": SCHEMA,
        "checkpoint": str(ckpt.path.resolve()),
        "fingerprint": fingerprint,
        "family": cfg.family,
        "dtype": DTYPE_NAMES[codec.dtype],
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.moe_intermediate_size,
        "num_experts": cfg.num_experts,
        "layers": layers,
        "units": [[layer, unit, width] for layer, unit, width in units if unit < 0],
        "tile_size": tile_size,
        "alignment": ALIGNMENT,
        "bytes": offset,
        "tiles": [[t.layer, t.expert, t.start, t.end, t.offset, t.nbytes, t.sha256, t.crc32] for t in tiles],
        "sources": record_sources(ckpt, crcs),
    }
    if codec.x12:
        meta["format"] = "x12"
    if codec.gguf:
        meta["ggml_types"] = [[layer, unit, *types] for (layer, unit), types in codec.ggml_units.items()]
    os.replace(data_tmp, out / "tiles.bin")
    tmp = out / "store.json.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, out / "store.json")
    journal.unlink()
    return out


def held_format(out: Path) -> str | None:
    """The tile format (`x12` or `plain`) of the store at `out`, None where its store.json cannot be read."""
    try:
        return read_store_json(out / "store.json").get("format", "plain")
    except StoreError:
        return None


def _holds(data, offset: int, nbytes: int, rec: dict) -> bool:
    """Whether `data` holds the journaled tile `rec` (its sha256) at `offset`."""
    data.seek(offset)
    raw = data.read(nbytes)
    return len(raw) == nbytes and hashlib.sha256(raw).hexdigest() == rec.get("sha256")


def _keep_finished(out: Path, ckpt: Checkpoint | GgufSource, fingerprint: str, tile_size: int, progress: bool) -> bool:
    """For the finished store at `out`: True once verified (corrupt tiles rewritten); False after
    removing a store of this checkpoint that is stale, truncated or from an older TileMEM (convert
    again); StoreError for a store of another checkpoint or tile size."""
    try:
        meta = read_store_json(out / "store.json")
    except StoreError as exc:  # unreadable: nothing in it can be kept
        log.warning("%s; converting %s again", exc, ckpt.path)
        _clear(out)
        return False
    same_source = meta.get("checkpoint") == str(ckpt.path.resolve())
    other = StoreError(
        f"{out} already holds a tile store of another checkpoint or tile size; remove it or choose another --out."
    )
    if meta.get("tile_size") != tile_size or (not same_source and meta.get("fingerprint") != fingerprint):
        raise other
    try:
        store = TileStore(out, ckpt)
    except StoreError as exc:
        if not same_source:
            raise other from None
        log.warning("%s; converting %s again", exc, ckpt.path)
        _clear(out)
        return False
    repaired = _repair(store, ckpt, progress)
    if repaired:
        log.warning("rewrote %d corrupt tile(s) of %s: %s", len(repaired), out, ", ".join(repaired[:10]))
    return True


def _clear(out: Path) -> None:
    """Remove the files conversion writes in `out` (and nothing else)."""
    for name in STORE_FILES:
        (out / name).unlink(missing_ok=True)


def read_store_json(path: Path) -> dict:
    """store.json as a dict, or a StoreError saying it is corrupt."""
    return read_json_object(path, StoreError, "the store is corrupt; re-run `tilemem convert`")


def _repair(store: TileStore, ckpt: Checkpoint | GgufSource, progress: bool) -> list[str]:
    """Rewrite, from the checkpoint, every tile of `store` that fails its sha256; their keys."""
    bad = [t for t in tqdm(store.tiles.values(), desc="verify", disable=not progress) if not store.intact(t)]
    if not bad:
        return []
    with open(store.data_path, "r+b") as data:
        for t in bad:
            codec = store.codec.unit(t.layer, t.expert)
            raw = pack_tile(codec, unit_weights(ckpt, codec, t.layer, t.expert), t.start, t.end)
            if hashlib.sha256(raw).hexdigest() != t.sha256:
                raise StoreError(
                    f"tile {t.key} of {store.path} cannot be rebuilt from {ckpt.path} (other bytes); "
                    f"delete {store.path} and run `tilemem convert` again."
                )
            data.seek(t.offset)
            data.write(raw)
        data.flush()
        os.fsync(data.fileno())
    return [t.key for t in bad]


class TileStore:
    """An opened tile store: layout lookup, O_DIRECT-capable path, checksum verification."""

    def __init__(self, path: str | Path, checkpoint: Checkpoint | GgufSource | None = None) -> None:
        self.path = Path(path)
        checkpoint = store_source(checkpoint) if checkpoint is not None else None
        meta_file = self.path / "store.json"
        if not meta_file.exists():
            partial = (self.path / "tiles.bin.partial").exists()
            hint = " (a conversion was interrupted; re-run `tilemem convert` to resume)" if partial else ""
            raise StoreError(f"{self.path} is not a tile store: no store.json{hint}; create it with `tilemem convert`.")
        meta = read_store_json(meta_file)
        if meta.get("schema_version") != SCHEMA:
            raise StoreError(f"{meta_file} has schema {meta.get('schema_version')!r}, expected {SCHEMA}.")
        self.meta = meta
        try:
            self.dtype = DTYPES[meta["dtype"]]
            self.hidden = int(meta["hidden_size"])
            ggml = {(int(t[0]), int(t[1])): (str(t[2]), str(t[3]), str(t[4])) for t in meta.get("ggml_types", [])}
            fmt = meta.get("format", "plain")
            if fmt not in ("x12", "plain"):
                raise ValueError(f"format {fmt!r}")
            self.codec = TileCodec(self.dtype, self.hidden, ggml_units=ggml, x12=fmt == "x12")
            self.tile_size = int(meta["tile_size"])
            self.tiles = {(t[0], t[1], t[2]): StoredTile(*t) for t in meta["tiles"]}
            int(meta["bytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(
                f"{meta_file} is corrupt ({exc!r} missing or malformed); re-run `tilemem convert`."
            ) from None
        self.data_path = self.path / "tiles.bin"
        size = self.data_path.stat().st_size if self.data_path.exists() else -1
        if size != meta["bytes"]:
            raise StoreError(
                f"{self.data_path} is missing or truncated ({max(size, 0)} of {meta['bytes']} bytes); "
                "re-run `tilemem convert`."
            )
        if checkpoint is not None:
            self._check_source(checkpoint)
            want = [[layer, unit, width] for layer, unit, width in store_units(checkpoint) if unit < 0]
            if meta.get("units", []) != want:
                raise StoreError(
                    f"tile store {self.path} has no tiles of the shared-expert / dense FFNs (converted by an "
                    "older TileMEM); delete it and run `tilemem convert` again."
                )
        self._check_layout()

    def _check_layout(self) -> None:
        """Every tile must own its bytes: aligned, sized for its rows, disjoint, inside tiles.bin."""
        end, prev = 0, None
        for t in sorted(self.tiles.values(), key=lambda t: t.offset):
            problem = None
            if self.codec.gguf and (t.layer, t.expert) not in self.codec.ggml_units:
                problem = "has no quant types (ggml_types)"
            elif t.nbytes != self.codec.unit(t.layer, t.expert).payload_bytes(t.end - t.start):
                problem = f"holds {t.nbytes} bytes for {t.end - t.start} neurons"
            elif t.offset % ALIGNMENT:
                problem = f"starts at byte {t.offset}, not a multiple of {ALIGNMENT}"
            elif t.offset < end:
                problem = f"starts at byte {t.offset}, inside tile {prev}"
            elif t.offset + t.nbytes > self.meta["bytes"]:
                problem = f"ends past the end of {self.data_path.name}"
            if problem:
                raise StoreError(
                    f"{self.path / 'store.json'} is corrupt: tile {t.key} {problem}; re-run `tilemem convert`."
                )
            end, prev = t.offset + t.padded, t.key

    def _check_source(self, ckpt: Checkpoint | GgufSource) -> None:
        """Refuse this store unless it was converted from `ckpt`'s config, index and current weights."""
        meta, fix = self.meta, f"run `tilemem convert {ckpt.path} --out {self.path}` again"
        if checkpoint_fingerprint(ckpt) != meta.get("fingerprint") and "sources" in meta:
            raise StoreError(
                f"tile store {self.path} was converted from another checkpoint ({meta['checkpoint']}), not "
                f"{ckpt.path}; convert this checkpoint with `tilemem convert`."
            )
        if "sources" not in meta:
            raise StoreError(
                f"tile store {self.path} has no checksums of its source weights (an older TileMEM); {fix}."
            )
        try:
            stale = stale_tensors(self.path, meta["sources"], ckpt)
        except (KeyError, TypeError, AttributeError, ValueError):
            raise StoreError(f"{self.path / 'store.json'} is corrupt (its source checksums); {fix}.") from None
        if not stale:
            return
        if meta.get("checkpoint") != str(ckpt.path.resolve()):
            raise StoreError(
                f"tile store {self.path} was converted from another checkpoint ({meta['checkpoint']}), not "
                f"{ckpt.path} ({len(stale)} expert tensors differ, e.g. {stale[0]}); convert this checkpoint "
                "with `tilemem convert`."
            )
        raise StoreError(
            f"tile store {self.path} is stale: {len(stale)} expert tensor(s) of {ckpt.path} changed since it was "
            f"converted (e.g. {stale[0]}); {fix}."
        )

    def tiles_of(self, layer: int, expert: int) -> list[StoredTile]:
        """Store tiles of one expert, in neuron order."""
        out, a = [], 0
        while (layer, expert, a) in self.tiles:
            t = self.tiles[(layer, expert, a)]
            out.append(t)
            a = t.end
        return out

    def covering(self, layer: int, expert: int, start: int, end: int) -> list[StoredTile]:
        """Store tiles exactly covering neurons [start, end) (boundaries must be store-tile boundaries)."""
        tiles = [t for t in self.tiles_of(layer, expert) if t.start >= start and t.end <= end]
        if not tiles or tiles[0].start != start or tiles[-1].end != end:
            raise StoreError(
                f"range N{start}-{end} of L{layer}:E{expert} does not fall on tile boundaries of the store "
                f"(tile size {self.tile_size}); plan with a tile size that is a multiple of it."
            )
        return tiles

    def read_block(self, tile: StoredTile) -> bytes:
        """The payload of one tile through the page cache (verification, resident loading)."""
        with open(self.data_path, "rb") as f:
            f.seek(tile.offset)
            return f.read(tile.nbytes)

    @property
    def repair_hint(self) -> str:
        """What to run to rewrite this store's corrupt tiles from its checkpoint."""
        ckpt = self.meta.get("checkpoint", "CHECKPOINT")
        return f"re-run `tilemem convert {ckpt} --out {self.path} --tile-size {self.tile_size}` to rewrite it"

    def intact(self, tile: StoredTile) -> bool:
        """Whether `tile`'s bytes match its sha256."""
        return hashlib.sha256(self.read_block(tile)).hexdigest() == tile.sha256

    def verify(self, progress: bool = True) -> list[str]:
        """Keys of tiles whose sha256 does not match (empty: the store is intact)."""
        return [t.key for t in tqdm(self.tiles.values(), desc="verify", disable=not progress) if not self.intact(t)]


def open_store_for(path: str | Path, ckpt: Checkpoint) -> TileStore:
    """Open a store and check that it was converted from `ckpt`."""
    try:
        return TileStore(path, ckpt)
    except FileNotFoundError as exc:
        raise CheckpointError(f"tile store {path} is incomplete: {exc}") from None
