"""A tile store is checked against the bytes it claims to hold: the checkpoint weights it was built
from (a changed weight makes it stale), and its own tiles when `tilemem convert` runs over it again
or resumes an interrupted run."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from tilemem.cli.main import main
from tilemem.loader.checkpoint import Checkpoint
from tilemem.loader.safetensors_file import SafetensorsFile
from tilemem.models.topology import Topology
from tilemem.runtime import tile_store
from tilemem.runtime.store_sources import STAT_CACHE
from tilemem.runtime.tile_store import StoreError, TileStore, convert

TILE = 16
EXPERT = "model.layers.1.mlp.experts.2.up_proj.weight"  # not in the last 64 KiB of its shard
ATTENTION = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def source(make_ckpt) -> Path:
    return make_ckpt("olmoe", "fp32")


@pytest.fixture(scope="module")
def clean(source, tmp_path_factory) -> Path:
    """A clean store of `source` (tests copy it, or the checkpoint, before changing anything)."""
    return convert(source, tmp_path_factory.mktemp("clean") / "store", tile_size=TILE, progress=False)


@pytest.fixture
def ckpt(source, tmp_path) -> Path:
    """A private copy of the checkpoint, with its own store converted from it."""
    path = tmp_path / "ckpt"
    shutil.copytree(source, path)
    convert(path, tmp_path / "store", tile_size=TILE, progress=False)
    return path


def flip_tensor_byte(ckpt: Path, name: str, at: int = 4) -> None:
    """Change one byte of tensor `name` in place (same file size)."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = ckpt / index["weight_map"][name]
    f = SafetensorsFile(shard)
    pos = f.data_start + f.entries[name][2] + at
    assert pos < f.size - 65536  # outside the sample the old fingerprint read
    with open(shard, "r+b") as fh:
        fh.seek(pos)
        b = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([b[0] ^ 0x55]))


def flip_tile_byte(path: Path, key: tuple[int, int, int], data: str = "tiles.bin", at: int = 5) -> None:
    tile = TileStore(path).tiles[key] if data == "tiles.bin" else None
    offset = tile.offset if tile else key
    with open(path / data, "r+b") as f:
        f.seek(offset + at)
        b = f.read(1)
        f.seek(offset + at)
        f.write(bytes([b[0] ^ 0xFF]))


# -- case 2: the store follows the checkpoint's weights -------------------------------------------


def test_changed_expert_weight_makes_the_store_stale(ckpt, tmp_path):
    flip_tensor_byte(ckpt, EXPERT)
    with pytest.raises(StoreError, match=f"is stale: 1 expert tensor.*{EXPERT}.*run `tilemem convert {ckpt}"):
        TileStore(tmp_path / "store", Checkpoint.open(ckpt))


def test_generate_on_a_stale_store_is_one_clear_error(ckpt, tmp_path, capsys):
    flip_tensor_byte(ckpt, EXPERT)
    argv = ["generate", str(ckpt), "--dtype", "fp32", "--store", str(tmp_path / "store"), "--max-tokens", "2"]
    assert main([*argv, "--budget", "cpu=1GiB", "--tile-size", str(TILE)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tile store") and "is stale" in err and "Traceback" not in err


def test_reconvert_rebuilds_a_stale_store_from_the_new_weights(ckpt, tmp_path):
    flip_tensor_byte(ckpt, EXPERT)
    store = convert(ckpt, tmp_path / "store", tile_size=TILE, progress=False)
    opened = TileStore(store, Checkpoint.open(ckpt))  # current again
    assert opened.verify(progress=False) == []
    stored = json.loads((store / "store.json").read_text())["sources"]["tensors"]
    assert EXPERT in stored


def test_changed_attention_weight_keeps_the_store(ckpt, tmp_path):
    flip_tensor_byte(ckpt, ATTENTION)  # the store holds no attention weights
    TileStore(tmp_path / "store", Checkpoint.open(ckpt))


def test_touched_checkpoint_is_checksummed_once_then_trusted_by_its_stat(ckpt, tmp_path, monkeypatch):
    for shard in ckpt.glob("*.safetensors"):
        os.utime(shard, ns=(1, 1))
    TileStore(tmp_path / "store", Checkpoint.open(ckpt))  # bytes unchanged: still current
    assert (tmp_path / "store" / STAT_CACHE).exists()
    calls = []
    monkeypatch.setattr("tilemem.runtime.store_sources.tensor_crc", lambda t: calls.append(1))
    TileStore(tmp_path / "store", Checkpoint.open(ckpt))
    assert calls == []  # the cached stat spared reading the weights


def test_a_store_without_source_checksums_is_refused_and_reconvert_rebuilds_it(ckpt, tmp_path):
    store = tmp_path / "store"
    meta = json.loads((store / "store.json").read_text())
    del meta["sources"]
    (store / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="no checksums of its source weights.*tilemem convert"):
        TileStore(store, Checkpoint.open(ckpt))
    convert(ckpt, store, tile_size=TILE, progress=False)
    assert "sources" in json.loads((store / "store.json").read_text())


# -- case 3: convert checks what it keeps -----------------------------------------------------------


def test_reconvert_rewrites_a_corrupt_tile(source, clean, tmp_path, caplog):
    store = shutil.copytree(clean, tmp_path / "store")
    flip_tile_byte(store, (0, 3, 0))
    assert TileStore(store).verify(progress=False) == ["L0:E3:S0:N0-16"]
    with caplog.at_level(logging.WARNING, logger="tilemem.runtime.tile_store"):
        convert(source, store, tile_size=TILE, progress=False)
    assert "rewrote 1 corrupt tile(s)" in caplog.text and "L0:E3:S0:N0-16" in caplog.text
    assert (store / "tiles.bin").read_bytes() == (clean / "tiles.bin").read_bytes()


def test_reconvert_rebuilds_a_truncated_store(source, clean, tmp_path):
    store = shutil.copytree(clean, tmp_path / "store")
    with open(store / "tiles.bin", "r+b") as f:
        f.truncate(4096)
    convert(source, store, tile_size=TILE, progress=False)
    assert (store / "tiles.bin").read_bytes() == (clean / "tiles.bin").read_bytes()


def test_cli_convert_repairs_a_corrupt_store_and_says_so(source, clean, tmp_path, capsys):
    store = shutil.copytree(clean, tmp_path / "store")
    flip_tile_byte(store, (1, 0, 16))
    assert main(["convert", str(source), "--out", str(store), "--tile-size", str(TILE)]) == 0
    assert main(["verify", str(store)]) == 0
    assert "match their sha256" in capsys.readouterr().out


def convert_interrupted(ckpt, out, tiles: int, monkeypatch) -> None:
    """Convert `ckpt` into `out`, interrupted (Ctrl-C) after `tiles` tiles were packed."""
    real, calls = tile_store.pack_tile, [0]

    def crash_midway(*args):
        calls[0] += 1
        if calls[0] > tiles:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(tile_store, "pack_tile", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        convert(ckpt, out, tile_size=TILE, progress=False)
    monkeypatch.undo()


def test_resume_rewrites_journaled_tiles_the_partial_file_lost(source, clean, tmp_path, monkeypatch):
    out = tmp_path / "store"
    half = len(TileStore(clean).tiles) // 2
    convert_interrupted(source, out, half, monkeypatch)
    journal = [json.loads(line) for line in (out / "convert.journal").read_text().splitlines()[1:]]
    assert len(journal) == half
    lost = journal[::3]  # writes the journal records but the disk never got
    with open(out / "tiles.bin.partial", "r+b") as f:
        for rec in lost:
            f.seek(rec["offset"])
            f.write(b"\0" * 64)
    convert(source, out, tile_size=TILE, progress=False)
    assert TileStore(out).verify(progress=False) == []
    assert (out / "tiles.bin").read_bytes() == (clean / "tiles.bin").read_bytes()


def test_reconvert_of_another_checkpoint_still_refuses_and_keeps_the_store(make_ckpt, clean, tmp_path):
    store = shutil.copytree(clean, tmp_path / "store")
    other = make_ckpt("olmoe", "fp32", seed=5)  # same config, other weights, other path
    before = (store / "store.json").read_bytes()
    with pytest.raises(StoreError, match="another checkpoint"):
        convert(other, store, tile_size=TILE, progress=False)
    assert (store / "store.json").read_bytes() == before and (store / "tiles.bin").exists()


# -- case 11: a corrupt tile met while generating --------------------------------------------------


def test_corrupt_tile_met_by_generate_is_one_error_line_and_the_advice_works(source, clean, tmp_path, capsys, caplog):
    store = shutil.copytree(clean, tmp_path / "store")
    for key in [k for k in TileStore(store).tiles if k[0] == 0 and k[1] >= 0]:  # every routed tile of layer 0
        flip_tile_byte(store, key)
    non_expert = Topology.from_config(Checkpoint.open(source).config, "fp32").non_expert_bytes
    argv = ["generate", str(source), "--dtype", "fp32", "--store", str(store), "--tile-size", str(TILE)]
    argv += ["--budget", f"cpu={non_expert}B", "--prompt", "hello there", "--max-tokens", "4"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: tile L0:E")
    assert "fails its checksum" in err and f"tilemem convert {source.resolve()} --out {store}" in err
    assert "forward pass failed" not in out and "Traceback" not in out + err
    assert not [r for r in caplog.records if r.exc_info]  # no traceback logged either
    assert main(["convert", str(source), "--out", str(store), "--tile-size", str(TILE)]) == 0
    assert main(argv) == 0


# -- store.json's layout: every tile owns its bytes --------------------------------------------------


def _edit_first_tiles(store: Path, edit) -> None:
    meta = json.loads((store / "store.json").read_text())
    edit(meta["tiles"])
    (store / "store.json").write_text(json.dumps(meta))


def test_store_json_with_overlapping_tiles_is_refused(clean, tmp_path):
    store = shutil.copytree(clean, tmp_path / "store")

    def overlap(tiles):  # the second tile now claims the first one's bytes
        tiles[1][4] = tiles[0][4]

    _edit_first_tiles(store, overlap)
    with pytest.raises(StoreError, match="store.json is corrupt: tile .* starts at byte 0, inside tile"):
        TileStore(store)


def test_store_json_with_a_tile_past_the_end_is_refused(clean, tmp_path):
    store = shutil.copytree(clean, tmp_path / "store")
    size = (store / "tiles.bin").stat().st_size

    def past_end(tiles):
        tiles[-1][4] = size  # aligned, after every other tile, but beyond tiles.bin

    _edit_first_tiles(store, past_end)
    with pytest.raises(StoreError, match="ends past the end of tiles.bin"):
        TileStore(store)


def test_store_json_with_a_tile_of_the_wrong_size_is_refused(clean, tmp_path):
    store = shutil.copytree(clean, tmp_path / "store")

    def shrink(tiles):
        tiles[0][5] -= 4

    _edit_first_tiles(store, shrink)
    with pytest.raises(StoreError, match="holds .* bytes for 16 neurons"):
        TileStore(store)


def test_store_json_that_is_not_an_object_is_refused(clean, tmp_path):
    store = shutil.copytree(clean, tmp_path / "store")
    (store / "store.json").write_text("[1, 2]")
    with pytest.raises(StoreError, match="store.json is not a JSON object \\(it holds a list\\); the store is corrupt"):
        TileStore(store)


def test_store_json_missing_a_field_is_refused(clean, tmp_path):
    store = shutil.copytree(clean, tmp_path / "store")
    meta = json.loads((store / "store.json").read_text())
    del meta["tiles"]
    (store / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="store.json is corrupt \\(KeyError\\('tiles'\\) missing or malformed\\)"):
        TileStore(store)


def test_reconvert_rebuilds_a_store_whose_store_json_is_garbled(source, clean, tmp_path):
    store = shutil.copytree(clean, tmp_path / "store")
    (store / "store.json").write_text('{"schema_version": "tilemem_sto')
    (store / "notes.txt").write_text("mine")
    convert(source, store, tile_size=TILE, progress=False)
    assert (store / "tiles.bin").read_bytes() == (clean / "tiles.bin").read_bytes()
    assert (store / "notes.txt").read_text() == "mine"  # only conversion's own files were replaced


def test_resume_after_the_weights_changed_converts_from_the_start(ckpt, tmp_path, monkeypatch, caplog):
    out = tmp_path / "resumed"
    convert_interrupted(ckpt, out, len(TileStore(tmp_path / "store").tiles) // 2, monkeypatch)
    flip_tensor_byte(ckpt, "model.layers.0.mlp.experts.0.gate_proj.weight")  # in a tile the first run wrote
    with caplog.at_level(logging.WARNING, logger="tilemem.runtime.tile_store"):
        convert(ckpt, out, tile_size=TILE, progress=False)
    assert "changed since the interrupted conversion" in caplog.text
    fresh = convert(ckpt, tmp_path / "fresh", tile_size=TILE, progress=False)
    assert (out / "tiles.bin").read_bytes() == (fresh / "tiles.bin").read_bytes()


def test_verify_with_the_model_reports_a_stale_store(ckpt, tmp_path, capsys):
    assert main(["verify", str(tmp_path / "store"), "--model", str(ckpt)]) == 0
    flip_tensor_byte(ckpt, EXPERT)
    assert main(["verify", str(tmp_path / "store")]) == 0  # its tiles are intact ...
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "store"), "--model", str(ckpt)]) == 2  # ... but of the old weights
    assert "is stale" in capsys.readouterr().err
