"""FP8 placement exactness: the tiered runtime on an FP8 checkpoint (FP8 tiles in the store, the DRAM cache
and resident DRAM ranges) gives the all-resident FP8 engine's logits and greedy tokens, for every family,
every policy, DRAM budgets from 0 to 100%, tile sizes, prefetch and async planning on and off."""

from __future__ import annotations

import pytest
from test_tiered_exactness import (
    GREEDY,
    REL_TOL,
    check_cycled_axes,
    cycled_combos,
    forward_logits,
    make_tiered_llm,
    rel_err,
    resident_references,
)

from tilemem.engine.llm import LLM
from tilemem.errors import ConfigError
from tilemem.models.registry import families
from tilemem.runtime.tile_format import Fp8Tile
from tilemem.runtime.tile_store import StoreError, convert

FAMILIES = sorted(families())


TILES = ["128", "256"]


COMBOS = cycled_combos(TILES)


@pytest.fixture(scope="module")
def fp8_reference(make_ckpt):
    return resident_references(make_ckpt, "fp8")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8-stores")
    return lambda family, tile: root / f"{family}-t{tile}"


def test_sample_covers_every_axis():
    check_cycled_axes(COMBOS, TILES)


@pytest.mark.parametrize("combo", COMBOS, ids=str)
def test_fp8_tiered_matches_resident_fp8(combo, fp8_reference, store_dir):
    path, batch, ref_logits, ref_tokens = fp8_reference(combo.family)
    llm = make_tiered_llm(path, combo, store_dir, weights=None)
    try:
        ex = llm.tiered
        assert ex.store.codec.fp8 and llm.plan.topology.dtype == "fp8_e4m3"
        if combo.budget == 0.0:
            assert ex.resident_bytes == 0
        if combo.budget == 1.0:
            assert not any(ex.on_disk.values())
            assert all(isinstance(b, Fp8Tile) for blocks in ex.resident.values() for b in blocks)
        ours = forward_logits(llm.model, batch, ref_tokens)
        for i, (a, b) in enumerate(zip(ours, ref_logits, strict=True)):
            assert rel_err(a, b) < REL_TOL, f"logits block {i}: rel err {rel_err(a, b):.2e}"
        for _ in range(3 if llm.replanner is not None and 0 < combo.budget < 1 else 1):
            outs = llm.generate(batch, GREEDY)
            assert [o.token_ids for o in outs] == ref_tokens
        runtime = llm.stats().runtime
        assert runtime["tiles_computed"] > 0
        if combo.budget < 1.0:  # disk bytes are FP8 bytes: about half what bf16 tiles would read
            assert runtime["disk_bytes"] > 0
    finally:
        if llm.replanner is not None:
            llm.replanner.stop()
        llm.tiered.close()


def test_fp8_store_holds_fp8_tiles_and_their_scales(make_ckpt, tmp_path):
    """A store tile is the e4m3 bytes and the fp32 scales of its blocks: 1 byte per weight plus 12 bytes per
    128 x 128 block triple, checksummed."""
    from tilemem.runtime.tile_store import TileStore

    path = make_ckpt("olmoe", "fp8", routing_skew=1.0)
    store = TileStore(convert(path, tmp_path / "s", tile_size=128, progress=False))
    assert store.meta["dtype"] == "F8_E4M3"
    d = store.hidden
    for t in store.tiles.values():
        n = t.end - t.start
        assert t.start % 128 == 0
        assert 3 * n * d <= t.nbytes <= 3 * n * d + 16 + 12 * -(-n // 128) * -(-d // 128)
        assert store.intact(t)


@pytest.mark.parametrize("tile", [16, 96, 200])
def test_fp8_tile_size_off_the_block_grid_is_refused(make_ckpt, tmp_path, tile):
    path = make_ckpt("olmoe", "fp8", routing_skew=1.0)
    nearest = f"{tile // 128 * 128} or {tile // 128 * 128 + 128}" if tile > 128 else "128"
    with pytest.raises(StoreError, match=f"tile size {tile} does not fall on .* 128-neuron scale blocks.*{nearest}"):
        convert(path, tmp_path / "s", tile_size=tile, progress=False)
    with pytest.raises(ConfigError, match=f"tile size {tile} does not fall .*{nearest}"):
        LLM(path, dtype="fp32", budget="cpu=1GiB", tile=tile)
