"""The tile store: layout, contents and checksums as written by `convert`, lookups the runtime uses,
and the O_DIRECT reader that fetches tiles into page-aligned slots."""

from __future__ import annotations

import hashlib
import json
import os
import zlib

import pytest
import torch

from tilemem.engine.llm import LLM
from tilemem.layers.kv_cache import ForwardContext
from tilemem.loader.checkpoint import Checkpoint
from tilemem.models.topology import Topology
from tilemem.placement.store_layout import ALIGNMENT
from tilemem.runtime import direct_io
from tilemem.runtime.direct_io import AlignedSlab, DirectReader
from tilemem.runtime.tile_store import StoreError, TileStore, convert, expert_tensors, tile_ranges


@pytest.fixture(scope="module")
def mixtral(make_ckpt):
    """Expert width 48: tile 32 leaves a shorter last tile."""
    return make_ckpt("mixtral", "bf16", routing_skew=1.0)


@pytest.fixture(scope="module")
def store32(mixtral, tmp_path_factory):
    """Plain bf16 tiles (x12 tiles: test_x12_tiered.py)."""
    store = tmp_path_factory.mktemp("mixtral") / "store"
    return convert(mixtral, store, tile_size=32, progress=False, tile_format="plain")


def test_tile_ranges_cover_the_width_once():
    assert tile_ranges(48, 16) == [(0, 16), (16, 32), (32, 48)]
    assert tile_ranges(48, 32) == [(0, 32), (32, 48)]
    assert tile_ranges(48, 64) == [(0, 48)]


def test_layout_is_aligned_ordered_and_whole_experts_are_contiguous(mixtral, store32):
    ts = TileStore(store32, Checkpoint.open(mixtral))
    cfg = Checkpoint.open(mixtral).config
    layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    assert ts.dtype == torch.bfloat16 and ts.tile_size == 32  # the checkpoint dtype is kept
    assert len(ts.tiles) == len(layers) * cfg.num_experts * 2
    ordered = sorted(ts.tiles.values(), key=lambda t: (t.layer, t.expert, t.start))
    offset = 0
    for tile in ordered:
        assert tile.offset == offset and tile.offset % ALIGNMENT == 0  # no gaps, every block aligned
        assert tile.nbytes == 3 * (tile.end - tile.start) * cfg.hidden_size * 2
        assert tile.padded % ALIGNMENT == 0 and tile.nbytes <= tile.padded < tile.nbytes + ALIGNMENT
        offset += tile.padded
    assert offset == ts.meta["bytes"] == (store32 / "tiles.bin").stat().st_size
    assert [(t.start, t.end) for t in ts.tiles_of(layers[0], 5)] == [(0, 32), (32, 48)]
    assert ts.tiles_of(layers[0], 5)[1].key == f"L{layers[0]}:E5:S0:N32-48"


def test_tiles_hold_the_checkpoint_rows_with_their_checksums(mixtral, store32):
    ckpt = Checkpoint.open(mixtral)
    ts = TileStore(store32, ckpt)
    meta = json.loads((store32 / "store.json").read_text())
    assert meta["fingerprint"] and meta["family"] == "mixtral" and meta["dtype"] == "BF16"
    for tile in ts.tiles.values():
        raw = ts.read_block(tile)
        assert hashlib.sha256(raw).hexdigest() == tile.sha256 and zlib.crc32(raw) == tile.crc32
        gate, up, down = expert_tensors(ckpt, tile.layer, tile.expert)
        block = torch.frombuffer(bytearray(raw), dtype=ts.dtype).view(3, tile.end - tile.start, -1)  # [3, n, D]
        a, b = tile.start, tile.end
        assert torch.equal(block[0], gate[a:b]) and torch.equal(block[1], up[a:b])
        assert torch.equal(block[2], down[:, a:b].t())


def test_shared_and_dense_ffns_are_stored_and_an_older_store_is_refused(make_ckpt, tmp_path):
    """DeepSeek-V2 has a dense first layer and shared experts: both are tiles of the store, holding
    the checkpoint's rows; a store written before they were stored (no `units`) is refused by name."""
    path = make_ckpt("deepseek_v2", "fp32", routing_skew=1.0)
    ckpt = Checkpoint.open(path)
    topo = Topology.from_config(ckpt.config)
    store = convert(path, tmp_path / "store", tile_size=16, progress=False)
    ts = TileStore(store, ckpt)
    dense = [lt.index for lt in topo.layers if lt.dense_intermediate]
    shared = [lt.index for lt in topo.layers if lt.shared_intermediate]
    assert dense and shared
    for layer, unit, width in [(dense[0], -2, topo.layers[dense[0]].dense_intermediate)] + [
        (layer, -1, topo.layers[layer].shared_intermediate) for layer in shared
    ]:
        tiles = ts.tiles_of(layer, unit)
        assert [(t.start, t.end) for t in tiles] == tile_ranges(width, 16)
        gate, up, down = expert_tensors(ckpt, layer, unit)
        for t in tiles:
            block = torch.frombuffer(bytearray(ts.read_block(t)), dtype=ts.dtype).view(3, t.end - t.start, -1)
            assert torch.equal(block[0], gate[t.start : t.end]) and torch.equal(block[2], down[:, t.start : t.end].t())
    assert ts.verify(progress=False) == []
    meta = json.loads((store / "store.json").read_text())
    del meta["units"]
    (store / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="no tiles of the shared-expert / dense FFNs.*run `tilemem convert` again"):
        TileStore(store, ckpt)


def test_covering_needs_store_tile_boundaries(store32):
    ts = TileStore(store32)
    assert [t.start for t in ts.covering(0, 1, 0, 48)] == [0, 32]
    assert [t.start for t in ts.covering(0, 1, 32, 48)] == [32]
    with pytest.raises(StoreError, match="N16-48 of L0:E1 does not fall on tile boundaries .*tile size 32"):
        ts.covering(0, 1, 16, 48)


def test_a_plan_finer_than_the_store_is_refused(mixtral, store32):
    """Plan tiles of 16 cannot be served from a store of 32-neuron tiles."""
    topo = Topology.from_config(Checkpoint.open(mixtral).config, "bf16")
    one_tile = 3 * 16 * topo.hidden_size * topo.dtype_bytes  # room for one extra 16-neuron tile
    budget = f"cpu={topo.non_expert_bytes + topo.routed_expert_bytes // 2 + one_tile}B"
    with pytest.raises(StoreError, match="does not fall on tile boundaries"):
        LLM(mixtral, dtype="bf16", budget=budget, policy="tilepo_fine", tile=16, store=store32)


def test_bf16_store_under_an_fp32_model_matches_the_resident_model(mixtral, store32):
    """Tiles stay bf16 on disk; the runtime widens them exactly as the resident loader does."""
    topo = Topology.from_config(Checkpoint.open(mixtral).config, "fp32")
    budget = f"cpu={topo.non_expert_bytes + topo.routed_expert_bytes // 2}B"
    tiered = LLM(mixtral, dtype="fp32", budget=budget, policy="tilepo_fine", tile=32, store=store32)
    resident = LLM(mixtral, dtype="fp32")
    ids = torch.tensor([[7, 100, 33, 250, 9, 18], [40, 41, 42, 0, 0, 0]])
    outs = []
    for model in (tiered.model, resident.model):
        cache = model.allocate_cache(2, 8)
        outs.append(model(ids, ForwardContext.build(cache, [0, 1], [0, 0], [6, 3])))
    assert tiered.tiered.resident_bytes > 0 and any(tiered.tiered.on_disk.values())
    ref = outs[1]
    assert float((outs[0] - ref)[0].abs().max() / ref.abs().max()) < 1e-4
    assert float((outs[0][1, :3] - ref[1, :3]).abs().max() / ref.abs().max()) < 1e-4
    tiered.tiered.close()


@pytest.mark.parametrize("direct", [True, False])
def test_direct_reader_reads_every_tile_into_aligned_slots(store32, direct, monkeypatch):
    ts = TileStore(store32)
    if not direct:  # a filesystem that refuses O_DIRECT reads: buffered fallback
        real = os.preadv
        calls = [0]

        def refuse_first(fd, bufs, offset):
            calls[0] += 1
            if calls[0] == 1:
                raise OSError(22, "Invalid argument")
            return real(fd, bufs, offset)

        monkeypatch.setattr(direct_io.os, "preadv", refuse_first)
    fds = len(os.listdir("/proc/self/fd"))
    reader = DirectReader(ts.data_path)
    assert len(os.listdir("/proc/self/fd")) == fds + 1  # the probe's O_DIRECT descriptor was not leaked
    if not direct:
        assert not reader.direct
    slot_bytes = max(t.padded for t in ts.tiles.values())
    slab = AlignedSlab(2, slot_bytes)
    try:
        for i, tile in enumerate(ts.tiles.values()):
            buf = slab.buffer(i % 2)
            n = reader.read_into(buf, tile.offset, tile.nbytes)
            assert n >= tile.nbytes
            assert bytes(buf[: tile.nbytes]) == ts.read_block(tile)
        last = max(ts.tiles.values(), key=lambda t: t.offset)
        with pytest.raises(OSError, match="short read"):  # past the end of the file
            reader.read_into(slab.buffer(0), last.offset + last.padded, ALIGNMENT)
    finally:
        reader.close()
    assert len(os.listdir("/proc/self/fd")) == fds


def test_convert_writes_the_one_store_layout(make_ckpt, tmp_path):
    """`convert` puts every block (dense FFN, shared experts, routed experts) where `placement.store_layout`
    says, so a plan's manifest offsets are the store's."""
    from tilemem.placement.formats import tile_format
    from tilemem.placement.store_layout import layout
    from tilemem.placement.tiles import DENSE, SHARED, Unit

    path = make_ckpt("deepseek_v2", "bf16")
    ckpt = Checkpoint.open(path)
    ts = TileStore(convert(path, tmp_path / "store", tile_size=16, progress=False), ckpt)
    topo = Topology.from_config(ckpt.config)
    units = [Unit(t.layer, t.expert, 0, t.start, t.end) for t in ts.tiles.values()]
    assert {DENSE, SHARED, 0} <= {u.expert for u in units}
    entries, total = layout(units, topo.hidden_size, tile_format(topo.dtype))
    assert total == ts.meta["bytes"]
    assert {t.key: t.offset for t in ts.tiles.values()} == {u.key(): entries[(u, "gate_up")].offset for u in units}
