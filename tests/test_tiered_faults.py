"""Faults in the tile store and its reads: detected, named, refused, and survived.

- a corrupt tile fails its checksum with an error naming the tile (verify, resident load, disk read);
- a missing, incomplete, truncated or foreign store is refused with a StoreError saying what to do;
- conversion refuses another checkpoint's store and resumes an interrupted run to the same bytes;
- a read failing mid-generation ends that request with finish_reason "error", and the same LLM then
  serves the next request exactly.
"""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

from tilemem.engine.llm import LLM
from tilemem.engine.sampling import SamplingParams
from tilemem.loader.checkpoint import Checkpoint
from tilemem.models.topology import Topology
from tilemem.runtime import tile_store
from tilemem.runtime.tiered import TieredConfig, TileReadError
from tilemem.runtime.tile_store import StoreError, TileStore, convert

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
CORRUPT = (0, 3, 0)  # layer 0, expert 3, neurons 0-16
CORRUPT_KEY = "L0:E3:S0:N0-16"


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("olmoe", "fp32", routing_skew=1.0)


@pytest.fixture(scope="module")
def store(ckpt, tmp_path_factory):
    """A clean tile-16 store of the olmoe checkpoint (tests copy it before breaking anything)."""
    return convert(ckpt, tmp_path_factory.mktemp("good") / "store", tile_size=16, progress=False)


@pytest.fixture(scope="module")
def non_expert_budget(ckpt) -> str:
    """A DRAM budget that holds only the non-expert weights: every routed tile is read from disk."""
    return f"cpu={Topology.from_config(Checkpoint.open(ckpt).config, 'fp32').non_expert_bytes}B"


def prompts(lens=(40, 9), seed: int = 2) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 512, (n,), generator=gen).tolist() for n in lens]


def copy_store(store, dst):
    shutil.copytree(store, dst)
    return dst


def flip_byte(store_dir, tile_id, at: int = 100) -> None:
    """Flip one byte inside the payload of one tile of tiles.bin."""
    tile = TileStore(store_dir).tiles[tile_id]
    assert at < tile.nbytes
    with open(store_dir / "tiles.bin", "r+b") as f:
        f.seek(tile.offset + at)
        b = f.read(1)
        f.seek(tile.offset + at)
        f.write(bytes([b[0] ^ 0xFF]))


# -- corrupt tiles ---------------------------------------------------------------------------------


def test_corrupt_tile_is_named_by_verify_and_at_resident_load(ckpt, store, tmp_path):
    bad = copy_store(store, tmp_path / "bad")
    assert TileStore(store).verify(progress=False) == []
    flip_byte(bad, CORRUPT)
    assert TileStore(bad).verify(progress=False) == [CORRUPT_KEY]
    # Loading it into DRAM (everything resident) checks the same tile on the way in.
    topo = Topology.from_config(Checkpoint.open(ckpt).config, "fp32")
    full = f"cpu={topo.non_expert_bytes + topo.routed_expert_bytes}B"
    with pytest.raises(TileReadError, match=CORRUPT_KEY) as exc:
        LLM(ckpt, dtype="fp32", budget=full, tile=16, store=bad)
    assert "checksum" in str(exc.value)


def test_corrupt_tile_read_from_disk_fails_the_request_naming_the_tile(ckpt, store, non_expert_budget, tmp_path):
    bad = copy_store(store, tmp_path / "bad")
    flip_byte(bad, CORRUPT, at=7)
    batch = prompts()
    # Precondition: the prompts do route to the corrupt expert in layer 0.
    ref = LLM(ckpt, dtype="fp32")
    seen: set[int] = set()
    ref.model.moe_blocks()[0].on_route = lambda layer, ids: seen.update(ids.reshape(-1).tolist())
    ref.generate(batch, GREEDY)
    assert CORRUPT[1] in seen

    llm = LLM(ckpt, dtype="fp32", budget=non_expert_budget, tile=16, store=bad, runtime=TieredConfig(prefetch=False))
    try:
        outs = llm.generate(batch, GREEDY)
        for out in outs:  # the batch shares the failing forward pass
            assert out.finish_reason == "error"
            assert CORRUPT_KEY in out.error and "checksum" in out.error
        # Without the checksum the corrupt byte would pass silently (so the check is what caught it).
        llm.tiered.config.verify_reads = False
        assert all(o.finish_reason == "length" for o in llm.generate(batch, GREEDY))
    finally:
        llm.tiered.close()


# -- refused stores --------------------------------------------------------------------------------


def test_a_directory_that_does_not_exist_is_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="no store.json"):
        TileStore(tmp_path / "does-not-exist")


def test_a_store_without_store_json_is_refused(store, tmp_path):
    no_meta = copy_store(store, tmp_path / "no-meta")
    (no_meta / "store.json").unlink()
    with pytest.raises(StoreError, match="not a tile store"):
        TileStore(no_meta)


def test_an_interrupted_conversion_is_named_with_how_to_resume(store, tmp_path):
    partial = copy_store(store, tmp_path / "partial")
    (partial / "store.json").unlink()
    (partial / "tiles.bin").rename(partial / "tiles.bin.partial")
    with pytest.raises(StoreError, match="interrupted.*re-run `tilemem convert` to resume"):
        TileStore(partial)


def test_a_garbled_store_json_is_refused(store, tmp_path):
    garbled = copy_store(store, tmp_path / "garbled")
    (garbled / "store.json").write_text('{"schema_version": "tilemem_sto')
    with pytest.raises(StoreError, match="corrupt"):
        TileStore(garbled)


def test_a_truncated_tiles_bin_is_refused_with_both_sizes(store, tmp_path):
    truncated = copy_store(store, tmp_path / "truncated")
    size = (truncated / "tiles.bin").stat().st_size
    with open(truncated / "tiles.bin", "r+b") as f:
        f.truncate(size - 4096)
    with pytest.raises(StoreError, match=f"truncated \\({size - 4096} of {size} bytes\\)"):
        TileStore(truncated)


def test_a_missing_tiles_bin_is_refused(store, tmp_path):
    no_data = copy_store(store, tmp_path / "no-data")
    (no_data / "tiles.bin").unlink()
    with pytest.raises(StoreError, match="missing or truncated"):
        TileStore(no_data)


@pytest.fixture(scope="module")
def other(ckpt, make_ckpt):
    """A checkpoint with the same shapes and config as `ckpt` but other weights."""
    path = make_ckpt("olmoe", "fp32", routing_skew=1.0, seed=1)
    assert (path / "config.json").read_text() == (ckpt / "config.json").read_text()
    return path


def test_store_of_another_checkpoint_is_refused_on_open(store, other):
    with pytest.raises(StoreError, match="another checkpoint"):
        TileStore(store, Checkpoint.open(other))


def test_store_of_another_checkpoint_is_refused_by_llm(store, other, non_expert_budget):
    with pytest.raises(StoreError, match="another checkpoint"):
        LLM(other, dtype="fp32", budget=non_expert_budget, tile=16, store=store)


def test_convert_refuses_to_overwrite_another_checkpoints_store(store, other):
    before = (store / "store.json").read_bytes()
    with pytest.raises(StoreError, match="another checkpoint or tile size"):
        convert(other, store, tile_size=16, progress=False)
    assert (store / "store.json").read_bytes() == before


def test_convert_refuses_to_overwrite_a_store_of_another_tile_size(ckpt, store):
    before = (store / "store.json").read_bytes()
    with pytest.raises(StoreError, match="another checkpoint or tile size"):
        convert(ckpt, store, tile_size=32, progress=False)
    assert (store / "store.json").read_bytes() == before


def test_convert_over_the_same_checkpoints_intact_store_changes_nothing(ckpt, store):
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    assert convert(ckpt, store, tile_size=16, progress=False) == store
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before


# -- interrupted conversion ------------------------------------------------------------------------


class Crash(Exception):
    pass


def interrupt_after(monkeypatch, n: int) -> list[int]:
    """Make conversion die after packing `n` tiles; returns a call counter."""
    calls = [0]
    real = tile_store.pack_tile

    def pack(*args):
        calls[0] += 1
        if calls[0] > n:
            raise Crash("simulated crash")
        return real(*args)

    monkeypatch.setattr(tile_store, "pack_tile", pack)
    return calls


def count_packs(monkeypatch) -> list[int]:
    """Undo earlier patches, then count the tiles conversion packs."""
    monkeypatch.undo()
    calls = [0]
    real = tile_store.pack_tile

    def pack(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(tile_store, "pack_tile", pack)
    return calls


def assert_same_store(a, b) -> None:
    assert (a / "tiles.bin").read_bytes() == (b / "tiles.bin").read_bytes()
    assert (a / "store.json").read_bytes() == (b / "store.json").read_bytes()
    assert sorted(p.name for p in a.iterdir()) == ["store.json", "tiles.bin"]


@pytest.mark.parametrize("torn_journal", [False, True])
def test_interrupted_conversion_resumes_to_the_same_bytes(ckpt, store, tmp_path, monkeypatch, torn_journal):
    out = tmp_path / "store"
    total = len(TileStore(store).tiles)
    interrupt_after(monkeypatch, total // 2)
    with pytest.raises(Crash):
        convert(ckpt, out, tile_size=16, progress=False)
    assert not (out / "store.json").exists() and not (out / "tiles.bin").exists()
    assert (out / "tiles.bin.partial").exists() and (out / "convert.journal").exists()
    with pytest.raises(StoreError, match="interrupted"):
        TileStore(out)
    if torn_journal:  # the crash hit while a journal line was half written: that tile is redone
        with open(out / "convert.journal", "a") as f:
            f.write('{"key": "L1:E0:N0-16", "offs')
    calls = count_packs(monkeypatch)
    assert convert(ckpt, out, tile_size=16, progress=False) == out
    assert calls[0] == total - total // 2  # only the missing tiles were packed again
    assert_same_store(out, store)
    assert TileStore(out, Checkpoint.open(ckpt)).verify(progress=False) == []


def test_resume_with_another_tile_size_is_refused(ckpt, store, tmp_path, monkeypatch):
    """A partial run at tile 16 must not be mixed into a tile-32 store (same keys, other offsets)."""
    out = tmp_path / "store"
    interrupt_after(monkeypatch, 20)
    with pytest.raises(Crash):
        convert(ckpt, out, tile_size=16, progress=False)
    monkeypatch.undo()
    with pytest.raises(StoreError, match="tile size 16"):
        convert(ckpt, out, tile_size=32, progress=False)
    convert(ckpt, out, tile_size=16, progress=False)  # the partial run is intact and resumes
    assert_same_store(out, store)


# -- failing reads mid-generation ------------------------------------------------------------------


class FlakyReads:
    """Wraps a DirectReader: read calls after the first `ok` ones raise OSError while `failing`."""

    def __init__(self, reader, ok: int) -> None:
        self.read_into = reader.read_into
        self.ok = ok
        self.calls = 0
        self.failing = True
        self.lock = threading.Lock()

    def __call__(self, buf, offset, nbytes):
        with self.lock:
            self.calls += 1
            fail = self.failing and self.calls > self.ok
        if fail:
            raise OSError(5, "Input/output error (injected)")
        return self.read_into(buf, offset, nbytes)


@pytest.mark.parametrize("prefetch", [False, True])
def test_failing_read_ends_the_request_and_the_next_one_is_served(
    ckpt, store, non_expert_budget, monkeypatch, prefetch
):
    batch = prompts()
    want = [o.token_ids for o in LLM(ckpt, dtype="fp32").generate(batch, GREEDY)]
    runtime = TieredConfig(prefetch=prefetch, io_depth=2)
    llm = LLM(ckpt, dtype="fp32", budget=non_expert_budget, tile=16, store=store, runtime=runtime)
    ex = llm.tiered
    try:
        # Count the reads of one clean request, then fail from the middle of the next one on.
        counter = FlakyReads(ex.reader, ok=10**9)
        monkeypatch.setattr(ex.reader, "read_into", counter)
        assert [o.token_ids for o in llm.generate(batch, GREEDY)] == want
        flaky = FlakyReads(ex.reader, ok=counter.calls * 2 // 3)
        monkeypatch.setattr(ex.reader, "read_into", flaky)
        outs = llm.generate(batch, GREEDY)
        for out, tokens in zip(outs, want, strict=True):
            assert out.finish_reason == "error"
            assert "injected" in out.error and "reading tile L" in out.error
            assert 0 < len(out.token_ids) < len(tokens)  # it failed mid-generation, after some tokens
            assert out.token_ids == tokens[: len(out.token_ids)]
        # Every slab slot comes back (no slot or pin leaked by the failed layer).
        flaky.failing = False
        for fut, _, _ in list(ex.prefetching.values()):
            fut.exception()  # wait
        ex._harvest_prefetches()
        assert len(ex.cache.slab.free) + len(ex.cache.entries) + len(ex.landed) == ex.cache.slab.slots
        assert not any(e.pinned for e in ex.cache.entries.values())
        # The same LLM serves the next requests exactly.
        for _ in range(2):
            outs = llm.generate(batch, GREEDY)
            assert [o.token_ids for o in outs] == want
            assert all(o.finish_reason == "length" and o.error is None for o in outs)
        # Streaming surfaces the failure as an exception naming the tile.
        flaky.failing, flaky.calls, flaky.ok = True, 0, 5
        with pytest.raises(RuntimeError, match="reading tile L"):
            list(llm.stream(batch[0], GREEDY))
    finally:
        ex.close()
