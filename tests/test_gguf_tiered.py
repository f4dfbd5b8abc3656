"""GGUF placement exactness: the tiered runtime on a GGUF file (its quantized blocks as tiles in the store, the
DRAM cache and resident DRAM ranges) gives the all-resident GGUF engine's logits and greedy tokens, for policies,
DRAM budgets from 0 to 100%, tile sizes on down's block grid, prefetch and async planning on and off.

Both engines run the native ggml kernels' exact path (`ggml.FAST = False`), so the only difference is the order
of fp32 sums. Files: deepseek_v2 in Q4_K_M (q4_k gate/up, q6_k down in some layers; a dense layer and shared
experts: every kind of FFN unit) and olmoe in Q8_0 (32-weight blocks: tiles of any multiple of 32), both with
experts 512 wide so that tiles of 256 split them.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest
import torch
from test_tiered_exactness import GREEDY, REL_TOL, forward_logits, prompts, rel_err

from tilemem.artifacts.mir import load_plan, save_plan
from tilemem.engine.llm import LLM
from tilemem.errors import ConfigError
from tilemem.layers.ggml import QUANT_TYPES
from tilemem.loader.checkpoint import Checkpoint
from tilemem.models.topology import Topology
from tilemem.placement.profile import Profile
from tilemem.runtime import accumulator, tiered
from tilemem.runtime.gguf_source import ffn_types, quantized_bytes, store_source
from tilemem.runtime.setup import make_plan
from tilemem.runtime.tiered import TieredConfig, TileReadError
from tilemem.runtime.tile_format import GgmlTile
from tilemem.runtime.tile_store import StoreError, TileStore, convert
from tilemem.synth.gguf_writer import synthesize_gguf

pytestmark = pytest.mark.usefixtures("ggml_exact")  # both engines on the exact path
FILES = {"q4_k_m": "deepseek_v2", "q8_0": "olmoe"}
"""The mix -> the family of its file."""
WIDTH = 512
"""Routed experts' width in the files."""


@dataclass(frozen=True)
class Combo:
    """One tiered configuration to compare against the resident engine."""

    mix: str
    policy: str
    tile: int
    budget: float
    """Share of the FFN bytes the DRAM budget holds beyond the non-expert weights (1.0: everything fits)."""
    prefetch: bool
    async_planning: bool
    cache_share: float = 0.0
    skewed_profile: bool = False

    def __str__(self) -> str:
        return (
            f"{self.mix}-{self.policy}-t{self.tile}-b{self.budget:.2f}-{'pf' if self.prefetch else 'nopf'}-"
            f"{'async' if self.async_planning else 'sync'}-c{self.cache_share:g}"
        )


COMBOS = [
    Combo("q4_k_m", "tilepo_fine", 256, 0.0, True, False),
    Combo("q4_k_m", "tilepo_adaptive", 512, 0.35, False, True, 0.5),
    Combo("q4_k_m", "kt_expert", 256, 0.35, True, True, skewed_profile=True),
    Combo("q4_k_m", "uniform", 256, 1.0, False, False),
    Combo("q8_0", "tilepo_hybrid", 96, 0.35, True, False),
    Combo("q8_0", "tilepo_coarse", 160, 0.0, False, True),
    Combo("q8_0", "tilepo_fine", 512, 1.0, True, True),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-tiered")
    cache: dict[str, object] = {}

    def get(mix: str):
        if mix not in cache:
            out = root / f"{FILES[mix]}-{mix}.gguf"
            over = {"moe_intermediate_size": WIDTH}
            cache[mix] = synthesize_gguf(FILES[mix], "tiny", out, mix, routing_skew=1.0, overrides=over, progress=False)
        return cache[mix]

    return get


@pytest.fixture(scope="module")
def reference(files):
    """mix -> (file, prompts, resident logits, resident greedy tokens), computed once per file."""
    refs: dict[str, tuple] = {}

    def get(mix: str):
        if mix not in refs:
            path = files(mix)
            llm = LLM(path, dtype="fp32")
            batch = prompts(llm.config.vocab_size)
            tokens = [o.token_ids for o in llm.generate(batch, GREEDY)]
            refs[mix] = (path, batch, forward_logits(llm.model, batch, tokens), tokens)
        return refs[mix]

    return get


def gguf_topology(path) -> Topology:
    """The file's topology with its FFN quant types and quantized weights' bytes (what `make_plan` counts)."""
    ckpt = Checkpoint.open(path)
    return Topology.from_config(ckpt.config, None, ffn_types(ckpt), quantized_bytes(ckpt))


def make_llm(path, combo: Combo, store) -> LLM:
    topo = gguf_topology(path)
    ffn = topo.routed_expert_bytes + topo.shared_and_dense_bytes
    room = int(combo.budget * ffn) if combo.budget < 1 else ffn  # plans count the tiles' real bytes
    budget = f"cpu={topo.non_expert_bytes + room}B"
    cache = f"cpu={int(combo.cache_share * room)}B" if combo.cache_share else None
    profile = Profile.synthetic(topo, skew=1.2, seed=11) if combo.skewed_profile else None
    plan = make_plan(Checkpoint.open(path), budget, combo.policy, profile, combo.tile, cache=cache)
    return LLM(
        path,
        dtype="fp32",
        plan=plan,
        profile=profile,
        store=store,
        tile=combo.tile,
        runtime=TieredConfig(prefetch=combo.prefetch, io_depth=2),
        async_planning=combo.async_planning,
        replan_interval_s=0.02,
    )


def close(llm: LLM) -> None:
    if llm.replanner is not None:
        llm.replanner.stop()
    llm.tiered.close()


@pytest.mark.parametrize("combo", COMBOS, ids=str)
def test_gguf_tiered_matches_resident_gguf(combo, reference, tmp_path_factory, monkeypatch):
    path, batch, ref_logits, ref_tokens = reference(combo.mix)
    native, real = [], accumulator.ggml_kernels.ffn_tasks
    monkeypatch.setattr(accumulator.ggml_kernels, "ffn_tasks", lambda *a, **kw: native.append(kw) or real(*a, **kw))
    store = tmp_path_factory.getbasetemp() / f"store-{combo.mix}-t{combo.tile}"  # shared by combos of a tile size
    llm = make_llm(path, combo, store)
    try:
        ex = llm.tiered
        assert ex.store.codec.gguf and ex.store.meta["dtype"] == "U8"
        if combo.budget == 0.0:
            assert ex.resident_bytes == 0
        if combo.budget == 1.0:
            assert not any(ex.on_disk.values())
            assert all(isinstance(b, GgmlTile) for blocks in ex.resident.values() for b in blocks)
        ours = forward_logits(llm.model, batch, ref_tokens)
        for i, (a, b) in enumerate(zip(ours, ref_logits, strict=True)):
            assert rel_err(a, b) < REL_TOL, f"logits block {i}: rel err {rel_err(a, b):.2e}"
        for _ in range(3 if llm.replanner is not None and 0 < combo.budget < 1 else 1):
            assert [o.token_ids for o in llm.generate(batch, GREEDY)] == ref_tokens
        runtime = llm.stats().runtime
        assert runtime["tiles_computed"] > 0
        assert native and all(kw["exact"] for kw in native)  # the native ggml kernel, exact path
        if combo.budget < 1.0:
            assert runtime["disk_bytes"] > 0
    finally:
        close(llm)


def test_torch_reference_path_where_the_native_kernels_do_not_run(reference, tmp_path, monkeypatch):
    """GGUF tiles computed by the torch reference (`ggml_gemm` on the tile's matrices) give the same logits."""
    path, batch, ref_logits, ref_tokens = reference("q4_k_m")
    monkeypatch.setattr(tiered, "ggml_native_act", lambda act, x: False)
    calls, real = [], accumulator.partial_ffn
    monkeypatch.setattr(accumulator, "partial_ffn", lambda x, blk, act: calls.append(type(blk)) or real(x, blk, act))
    llm = make_llm(path, Combo("q4_k_m", "tilepo_fine", 256, 0.35, False, False), tmp_path / "s")
    try:
        ours = forward_logits(llm.model, batch, ref_tokens)
        assert max(rel_err(a, b) for a, b in zip(ours, ref_logits, strict=True)) < REL_TOL
        assert calls and set(calls) == {GgmlTile}
    finally:
        close(llm)


def test_gguf_store_holds_the_files_blocks(files, tmp_path):
    """A tile is the gate and up rows and down's blocks of its neurons, byte for byte the file's; adjacent tiles
    concatenate into the expert; the topology counts the blocks' bytes."""
    path = files("q4_k_m")
    store = TileStore(convert(path, tmp_path / "s", tile_size=256, progress=False), Checkpoint.open(path))
    source = store_source(Checkpoint.open(path))
    d = store.hidden
    assert store.verify(progress=False) == []
    types = store.codec.ggml_units
    assert {t[2] for t in types.values()} == {"q4_k", "q6_k"}  # Q4_K_M: some layers' downs in q6_k
    for (layer, unit), (g, u, dn) in types.items():
        tiles = store.tiles_of(layer, unit)
        codec = store.codec.unit(layer, unit)
        gate, up, down = source.unit_weights(layer, unit)
        blocks = []
        for t in tiles:
            n = t.end - t.start
            assert t.start % 256 == 0
            rows = QUANT_TYPES[g].row_bytes(d) + QUANT_TYPES[u].row_bytes(d)
            assert t.nbytes == n * rows + d * QUANT_TYPES[dn].row_bytes(n)
            block = codec.view(torch.frombuffer(bytearray(store.read_block(t)), dtype=torch.uint8), n)
            assert torch.equal(block.gate.data, gate.data[t.start : t.end])
            assert torch.equal(block.down.dequantize(), down.dequantize()[:, t.start : t.end])
            blocks.append(block)
        whole = codec.concat(blocks) if len(blocks) > 1 else blocks[0]
        assert torch.equal(whole.down.data, down.data) and torch.equal(whole.up.data, up.data)
        assert whole.ffn_weights.n == down.cols
    topo = gguf_topology(path)
    for layer in topo.moe_layers:
        g, u, dn = types[(layer, 0)]
        gate_up = WIDTH * (QUANT_TYPES[g].row_bytes(d) + QUANT_TYPES[u].row_bytes(d))
        assert topo.expert_bytes(layer) == gate_up + d * QUANT_TYPES[dn].row_bytes(WIDTH)
    assert sum(t.nbytes for t in store.tiles.values()) == topo.routed_expert_bytes + topo.shared_and_dense_bytes


def test_a_saved_gguf_plan_loads_and_runs(reference, tmp_path):
    """A plan of a GGUF model, written and read back (its tile format `gguf_<widest type>`), runs exactly."""
    path, batch, _, ref_tokens = reference("q4_k_m")
    combo = Combo("q4_k_m", "tilepo_fine", 256, 0.35, False, False)
    llm = make_llm(path, combo, tmp_path / "store")
    close(llm)
    save_plan(llm.plan, tmp_path / "plan", heatmap=False)
    loaded = load_plan(tmp_path / "plan")
    assert loaded.fmt == llm.plan.fmt and loaded.fmt.name == "gguf_q6_k"  # Q4_K_M's widest type
    llm = LLM(path, dtype="fp32", plan=tmp_path / "plan", store=tmp_path / "store")
    try:
        assert [o.token_ids for o in llm.generate(batch, GREEDY)] == ref_tokens
    finally:
        close(llm)


def test_a_gguf_store_follows_its_files_expert_weights(files, tmp_path):
    """The store records a crc32 per GGUF tensor it packed: an edited expert stack makes it stale; converting
    again brings it up to date."""
    from gguf import GGUFReader

    path = shutil.copy(files("q8_0"), tmp_path / "model.gguf")
    store = convert(path, tmp_path / "s", tile_size=256, progress=False)
    TileStore(store, Checkpoint.open(path))  # current
    reader = GGUFReader(path, "r+")
    data = next(t for t in reader.tensors if t.name == "blk.1.ffn_up_exps.weight").data
    data.reshape(-1)[100] ^= 0xFF  # one byte of expert blocks, through the file's mapping
    reader.data.flush()
    del reader, data
    with pytest.raises(StoreError, match="is stale: 1 expert tensor.*blk.1.ffn_up_exps.weight"):
        TileStore(store, Checkpoint.open(path))
    convert(path, store, tile_size=256, progress=False)
    TileStore(store, Checkpoint.open(path))


BAD_SIZES = [("q4_k_m", 100, "256"), ("q4_k_m", 384, "256 or 512"), ("q8_0", 40, "32 or 64")]


@pytest.mark.parametrize(("mix", "tile", "nearest"), BAD_SIZES)
def test_tile_size_off_the_block_grid_is_refused(files, tmp_path, mix, tile, nearest):
    path = files(mix)
    block = 256 if mix == "q4_k_m" else 32
    with pytest.raises(
        StoreError, match=f"tile size {tile} does not fall on .* {block}-weight quant blocks.*{nearest}"
    ):
        convert(path, tmp_path / "s", tile_size=tile, progress=False)
    with pytest.raises(ConfigError, match=f"tile size {tile} does not fall .*{nearest}"):
        LLM(path, dtype="fp32", budget="cpu=1GiB", tile=tile)


def test_a_corrupt_gguf_tile_is_detected_by_its_checksum(files, tmp_path):
    """A flipped byte in a GGUF tile fails its crc32 when the runtime reads it from disk and when it loads it
    into DRAM; `verify` names it, and converting again rewrites it."""
    path = files("q8_0")
    clean = convert(path, tmp_path / "clean", tile_size=256, progress=False)
    store = shutil.copytree(clean, tmp_path / "bad")
    tile = TileStore(store).tiles[(0, 3, 256)]
    with open(store / "tiles.bin", "r+b") as f:
        f.seek(tile.offset + tile.nbytes - 7)  # in down's blocks
        b = f.read(1)
        f.seek(tile.offset + tile.nbytes - 7)
        f.write(bytes([b[0] ^ 0xFF]))
    assert TileStore(store).verify(progress=False) == [tile.key]
    llm = make_llm(path, Combo("q8_0", "tilepo_fine", 256, 0.0, False, False), store)
    try:
        x = torch.randn(1, llm.config.hidden_size)  # [T, D]
        ids, weights = torch.tensor([[3, 1]]), torch.tensor([[0.5, 0.5]])  # [T, K]
        with pytest.raises(TileReadError, match=f"tile {tile.key} .* fails its checksum"):
            llm.tiered(0, x, weights, ids)
    finally:
        close(llm)
    with pytest.raises(TileReadError, match=f"tile {tile.key} .* fails its checksum"):
        make_llm(path, Combo("q8_0", "tilepo_fine", 256, 1.0, False, False), store)
    convert(path, store, tile_size=256, progress=False)
    assert (store / "tiles.bin").read_bytes() == (clean / "tiles.bin").read_bytes()


def test_commands_take_a_gguf_files_block_grid_as_their_default_tile(files, tmp_path):
    """`convert`, `bench` and `tmap validate` without --tile-size tile a K-quant file by 256 neurons (its blocks),
    a Q8_0 file and a safetensors checkpoint by 128."""
    from tilemem.cli.engine_flags import checkpoint_tile
    from tilemem.cli.main import build_parser
    from tilemem.synth.writer import synthesize

    assert checkpoint_tile(str(files("q4_k_m"))) == 256
    assert checkpoint_tile(str(files("q8_0"))) == 128
    ckpt = tmp_path / "olmoe"
    synthesize("olmoe", "tiny", ckpt, progress=False)
    assert checkpoint_tile(str(ckpt)) == 128
    parser = build_parser()
    for argv in (["convert", "m.gguf", "--out", "s"], ["tmap", "validate", "m.gguf"]):
        assert parser.parse_args(argv).tile_size is None  # then checkpoint_tile decides


def test_gguf_plans_count_the_bytes_the_store_holds(files, tmp_path):
    """A Q4_K_M plan counts each unit in its own FFN's quant types (q4_k gate/up, q4_k or q6_k down by layer), not
    the file's widest type: every unit, the store's size and the plan's tiles are the tile store's bytes; the
    runtime holds and reads what the plan counts; the cost model counts the same, also on the plan saved and loaded
    (and a plan saved before the types were written loads: its tiles as saved)."""
    from tilemem.artifacts.mir import build_artifacts, plan_from_artifacts
    from tilemem.placement.tiles import unit_bytes
    from tilemem.tmap.shape import PlanShape

    path = files("q4_k_m")
    ckpt = Checkpoint.open(path)
    store = TileStore(convert(path, tmp_path / "s", tile_size=256, progress=False), ckpt)
    plan = make_plan(ckpt, "cpu=1GiB", "tilepo_fine", None, 256)
    assert plan.fmt.name == "gguf_q6_k"  # the format named in the plan stays the file's widest type
    counted: dict[tuple[int, int, int], int] = {}
    for t in plan.tiles:
        counted[(t.layer, t.expert, t.start)] = counted.get((t.layer, t.expert, t.start), 0) + t.total_bytes
    assert counted == {key: t.nbytes for key, t in store.tiles.items()}  # unit by unit, exact
    held = sum(t.nbytes for t in store.tiles.values())
    assert plan.usage("cpu").tiles == held and plan.store_bytes == store.meta["bytes"]
    widest = sum(unit_bytes(t.end - t.start, store.hidden, plan.fmt) for t in store.tiles.values())
    assert widest > 1.1 * held  # what counting every projection as q6_k gave
    shape = PlanShape.of(plan)
    modelled = sum(lay.always_bytes + sum(sum(e.blocks.get("cpu", ())) for e in lay.experts) for lay in shape.layers)
    assert modelled == held
    save_plan(plan, tmp_path / "plan", heatmap=False)
    assert PlanShape.of(load_plan(tmp_path / "plan")) == shape
    mir, manifest = build_artifacts(plan)
    del mir["model"]["ffn_types"]
    legacy = plan_from_artifacts(mir, manifest)
    assert legacy.tiles == plan.tiles and legacy.topology.ffn_types == ()
    llm = LLM(path, dtype="fp32", plan=plan, store=tmp_path / "s", tile=256)
    try:
        assert llm.tiered.resident_bytes == held
        layer = llm.plan.topology.moe_layers[0]
        before = llm.tiered.counters.dram_bytes
        x = torch.randn(1, llm.config.hidden_size)  # [T, D]
        llm.tiered(layer, x, torch.tensor([[0.5, 0.5]]), torch.tensor([[3, 1]]))
        read = llm.tiered.counters.dram_bytes - before
        assert read == sum(t.total_bytes for t in plan.tiles if t.layer == layer and t.expert in (1, 3))
    finally:
        close(llm)


def test_a_budget_of_the_real_bytes_of_n_experts_places_n_experts(files):
    """A DRAM budget of exactly the non-expert weights, the shared/dense FFNs and k routed experts per layer in
    their real bytes places k experts per layer there (counted in the widest type, fewer fit); `--budget auto`
    with room for the whole model (the topology's bytes) places every tile in DRAM."""
    from tilemem.placement.budgets import Budgets
    from tilemem.placement.tiles import always_active_ffns, ffn_width, unit_bytes

    path = files("q4_k_m")
    topo = gguf_topology(path)
    moe, k = topo.moe_layers, 2
    cap = topo.non_expert_bytes + topo.shared_and_dense_bytes + k * sum(topo.expert_bytes(layer) for layer in moe)
    plan = make_plan(Checkpoint.open(path), f"cpu={cap}B", "uniform", None, 256)
    in_dram = {(t.layer, t.expert) for t in plan.tiles if t.tier == "cpu" and t.expert >= 0}
    assert len(in_dram) == k * len(moe) and plan.usage("cpu").used == cap
    assert Budgets.from_experts_per_layer(topo, k, plan.fmt, "cpu", "disk").capacity("cpu") == cap
    d = topo.hidden_size
    always = sum(unit_bytes(ffn_width(topo, layer, e), d, plan.fmt) for layer, e in always_active_ffns(topo))
    assert topo.non_expert_bytes + always + k * len(moe) * unit_bytes(WIDTH, d, plan.fmt) > cap
    auto = make_plan(Checkpoint.open(path), "auto", "tilepo_fine", None, 256, memory_limit="8GiB")
    assert auto.usage("cpu").capacity == topo.total_bytes and not auto.tiles_in("disk")


def test_a_q8_0_plan_counts_as_before(files):
    """One quant type everywhere (Q8_0): a unit's count is the format's, as before, and the store's bytes."""
    from tilemem.placement.tiles import unit_bytes
    from tilemem.runtime.tile_store import store_codec

    path = files("q8_0")
    ckpt = Checkpoint.open(path)
    plan = make_plan(ckpt, "cpu=1GiB", "tilepo_fine", None, 256)
    codec = store_codec(store_source(ckpt))
    assert plan.fmt.name == "gguf_q8_0"
    counted: dict[tuple[int, int, int, int], int] = {}
    for t in plan.tiles:
        key = (t.layer, t.expert, t.start, t.end)
        counted[key] = counted.get(key, 0) + t.total_bytes
    for (layer, expert, a, b), nbytes in counted.items():
        assert nbytes == unit_bytes(b - a, ckpt.config.hidden_size, plan.fmt)
        assert nbytes == codec.unit(layer, expert).payload_bytes(b - a)
