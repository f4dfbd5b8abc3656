"""x12 tiles: a bf16 checkpoint's tile store keeps its tiles as x12 payloads (lossless), and the tiered runtime
gives the all-resident engine's logits and greedy tokens from them, for every family, policy, DRAM budget
from 0 to 100%, tile size, cache, prefetch and async planning; with bf16 activations, bit for bit what the
same plan computes from a plain bf16 store."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_tiered_exactness import (
    GREEDY,
    REL_TOL,
    check_cycled_axes,
    cycled_combos,
    forward_logits,
    make_tiered_llm,
    prompts,
    rel_err,
    resident_references,
)

from tilemem.engine.llm import LLM
from tilemem.kernels import x12_tiles as x12_kernels
from tilemem.layers import x12
from tilemem.loader.checkpoint import Checkpoint
from tilemem.models.registry import families
from tilemem.models.topology import Topology
from tilemem.runtime.setup import make_plan
from tilemem.runtime.tile_format import X12Tile
from tilemem.runtime.tile_store import StoreError, TileStore, convert

FAMILIES = sorted(families())
BF16_TOL = 2e-2
"""Logits of bf16 activations computed two ways (rounded to bf16 in between, or not): their distance."""


TILES = ["16", "full", "32"]


COMBOS = cycled_combos(TILES)


@pytest.fixture(scope="module")
def bf16_reference(make_ckpt):
    return resident_references(make_ckpt, "bf16")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("x12-stores")
    return lambda family, tile: root / f"{family}-t{tile}"


def test_sample_covers_every_axis():
    check_cycled_axes(COMBOS, TILES)


@pytest.mark.parametrize("combo", COMBOS, ids=str)
def test_x12_tiered_matches_resident(combo, bf16_reference, store_dir):
    """fp32 activations: x12 tiles decode to the checkpoint's bf16 weights exactly (then to fp32)."""
    path, batch, ref_logits, ref_tokens = bf16_reference(combo.family)
    llm = make_tiered_llm(path, combo, store_dir, weights=None)
    try:
        assert llm.tiered.store.codec.x12
        if combo.budget == 0.0:
            assert llm.tiered.resident_bytes == 0
        if combo.budget == 1.0:
            assert not any(llm.tiered.on_disk.values())
        ours = forward_logits(llm.model, batch, ref_tokens)
        for i, (a, b) in enumerate(zip(ours, ref_logits, strict=True)):
            assert rel_err(a, b) < REL_TOL, f"logits block {i}: rel err {rel_err(a, b):.2e}"
        for _ in range(3 if llm.replanner is not None and 0 < combo.budget < 1 else 1):
            outs = llm.generate(batch, GREEDY)
            assert [o.token_ids for o in outs] == ref_tokens
        assert llm.stats().runtime["tiles_computed"] > 0
    finally:
        if llm.replanner is not None:
            llm.replanner.stop()
        llm.tiered.close()


@pytest.mark.parametrize("fused", [False, True], ids=["decoded", "fused"])
@pytest.mark.parametrize("family", ["olmoe", "deepseek_v2"])
def test_bf16_activations_x12_against_plain_store(family, fused, make_ckpt, tmp_path, monkeypatch):
    """bf16 activations keep the tiles x12 in DRAM (resident and cached). Decoded where they are computed, the
    same plan on a plain bf16 store gives the same logits bit for bit; through the fused x12 kernel (fp32
    products and sums, no bf16 rounding between gate/up and down) within bf16's rounding of them, same tokens."""
    if fused and not x12_kernels.available():
        pytest.skip("the portable kernels do not run here (no AVX2, or TILEMEM_KERNELS=0)")
    if not fused:
        monkeypatch.setattr(x12_kernels, "available", lambda: False)
    path = make_ckpt(family, "bf16", routing_skew=1.0)
    convert(path, tmp_path / "plain", 16, progress=False, tile_format="plain")
    convert(path, tmp_path / "x12", 16, progress=False)
    ckpt = Checkpoint.open(path)
    topo = Topology.from_config(ckpt.config)
    room = (topo.routed_expert_bytes + topo.shared_and_dense_bytes) // 2
    budget, cache = f"cpu={topo.non_expert_bytes + room}B", f"cpu={room // 2}B"
    plan = make_plan(ckpt, budget, "tilepo_fine", tile=16, cache=cache, store=tmp_path / "plain")
    assert plan.fmt.name == "bf16"  # counted as the plain store holds them: the x12 run holds less
    batch = prompts(ckpt.config.vocab_size)
    out = {}
    for name in ("plain", "x12"):
        llm = LLM(path, dtype="bf16", plan=plan, store=tmp_path / name, tile=16)
        try:
            assert llm.tiered.store.codec.x12 == (name == "x12")
            blocks = [b for bs in llm.tiered.resident.values() for b in bs]
            assert blocks and all(isinstance(b, X12Tile) == (name == "x12") for b in blocks)
            assert any(llm.tiered.on_disk.values())  # some tiles come from the disk through the cache
            tokens = [o.token_ids for o in llm.generate(batch, GREEDY)]
            out[name] = (tokens, forward_logits(llm.model, batch, tokens))
        finally:
            llm.tiered.close()
    assert out["x12"][0] == out["plain"][0]
    for a, b in zip(out["x12"][1], out["plain"][1], strict=True):
        assert rel_err(a, b) < BF16_TOL if fused else torch.equal(a, b)


def test_plans_count_x12_bytes(make_ckpt, tmp_path):
    """A plan for an x12 store (existing, or to be converted) counts 12 bits per weight and the exception
    area: the bytes the runtime holds; a plan counting x12 refuses a plain store (it would hold more)."""
    path = make_ckpt("qwen3_moe", "bf16")
    ckpt = Checkpoint.open(path)
    plans = {}
    for name in ("plain", "x12"):
        store = tmp_path / name
        if name == "plain":
            convert(path, store, 16, progress=False, tile_format="plain")
        plans[name] = make_plan(ckpt, "cpu=64GiB", "tilepo_fine", tile=16, store=store)  # x12: not converted yet
    assert plans["x12"].fmt.name == "x12" and plans["plain"].fmt.name == "bf16"
    with_gpu = make_plan(ckpt, "cuda=256KiB,cpu=64GiB", "tilepo_fine", tile=16, store=tmp_path / "x12")
    assert with_gpu.fmt.name == "bf16"  # the cuda tier holds tiles decoded: counted as bf16
    llm = LLM(path, dtype="bf16", plan=plans["x12"], store=tmp_path / "x12", tile=16)
    try:
        held = llm.tiered.resident_bytes
        counted = plans["x12"].usage("cpu").tiles
        assert held <= counted < 1.01 * held  # the exception area's count rounds up; xrow rows are not counted
        assert counted < 0.85 * plans["plain"].usage("cpu").tiles  # tiny tiles: 0.83 (128 x 2048 ones: 0.76)
    finally:
        llm.tiered.close()
    with pytest.raises(StoreError, match="holds plain bf16 tiles"):
        LLM(path, dtype="bf16", plan=plans["x12"], store=tmp_path / "plain", tile=16)


def test_convert_formats(make_ckpt, tmp_path):
    """auto: x12 for a bf16 checkpoint, smaller payloads, every tile decoding to the plain store's bytes; the
    format is in store.json; fp32 checkpoints stay plain; an unknown format is refused."""
    path = make_ckpt("mixtral", "bf16")
    plain = TileStore(convert(path, tmp_path / "plain", 16, progress=False, tile_format="plain"))
    packed = TileStore(convert(path, tmp_path / "x12", 16, progress=False))
    assert packed.codec.x12 and not plain.codec.x12 and packed.meta["format"] == "x12" and "format" not in plain.meta
    assert packed.tiles.keys() == plain.tiles.keys()
    for key, t in packed.tiles.items():
        p = plain.tiles[key]
        assert t.nbytes == x12.payload_bytes(3 * (t.end - t.start), packed.hidden) < p.nbytes
        raw = torch.frombuffer(bytearray(packed.read_block(t)), dtype=torch.uint8)
        dense = packed.codec.view(raw, t.end - t.start).dense()
        assert dense.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() == plain.read_block(p)[: p.nbytes]
    fp32 = TileStore(convert(make_ckpt("mixtral", "fp32"), tmp_path / "fp32", 16, progress=False))
    assert not fp32.codec.x12 and fp32.codec.dtype == torch.float32
    with pytest.raises(StoreError, match="unknown tile format 'x13'"):
        convert(path, tmp_path / "bad", 16, progress=False, tile_format="x13")


def _with_rare_exponents(path, tmp_path):
    """A copy of checkpoint `path` whose first expert's gate weights span every exponent (too many for x12)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / "rare"
    shutil.copytree(path, out)
    for f in out.glob("*.safetensors"):
        tensors = load_file(f)
        for name, w in tensors.items():
            if name.endswith("experts.0.gate_proj.weight"):
                scale = torch.logspace(-30, 30, w.numel()).view(w.shape)
                tensors[name] = (w.float().sign() * scale).to(torch.bfloat16)
        save_file(tensors, f, metadata={"format": "pt"})
    return out


def test_tile_x12_cannot_hold_falls_back_to_plain(make_ckpt, tmp_path, caplog):
    path = _with_rare_exponents(make_ckpt("olmoe", "bf16"), tmp_path)
    with caplog.at_level(logging.WARNING):
        store = TileStore(convert(path, tmp_path / "auto", 16, progress=False))
    assert not store.codec.x12 and "converting" in caplog.text and "plain bf16 tiles" in caplog.text
    with pytest.raises(StoreError, match="cannot all be x12; convert with tile format plain"):
        convert(path, tmp_path / "forced", 16, progress=False, tile_format="x12")
    assert not (tmp_path / "forced" / "store.json").exists()


def test_store_json_with_unknown_format_is_refused(make_ckpt, tmp_path):
    path = make_ckpt("olmoe", "bf16")
    out = convert(path, tmp_path / "s", 16, progress=False)
    meta = json.loads((out / "store.json").read_text())
    meta["format"] = "x16"
    (out / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="corrupt"):
        TileStore(out)


def test_torch_codec_round_trip_and_layout():
    """The torch codec on its own: bit-exact round trips (exceptions, zeros, infinities, NaN bits, rows of
    32 and 64 weights), the chunk layout the AVX512 decoder reads (checked on one chunk by hand), overflow."""
    g = torch.Generator().manual_seed(0)
    for rows, d in ((7, 32), (48, 64), (9, 96), (384, 256)):
        w = (torch.randn(rows, d, generator=g) * 0.02).to(torch.bfloat16)
        w[0, 1], w[-1, -1], w[rows // 2, 0] = float("inf"), 0.0, 1e-30
        w.view(torch.int16)[1, 2] = 0x7FC1  # a NaN's bits
        p = x12.encode(w)
        assert p.numel() == x12.payload_bytes(rows, d)
        assert torch.equal(x12.decode(p, rows, d).view(torch.int16), w.view(torch.int16))
    w = torch.arange(64, dtype=torch.int16).view(1, 64)  # weight j: low byte j, high byte 0
    w[0, 5] |= 0x3C00  # one other high byte
    lo, hc, tab, xrow, xval = x12.parts(x12.encode(w.view(torch.bfloat16)), 1, 64)
    assert lo[0, :8].tolist() == list(range(8)) and lo[0, 8:16].tolist() == list(range(32, 40))
    assert lo[0, 16:24].tolist() == list(range(8, 16)) and lo[0, 56:64].tolist() == list(range(56, 64))
    assert tab[:2].tolist() == [0x00, 0x3C] and tab[16:18].tolist() == [0x00, 0x3C]
    assert (hc[0, 2] & 0xF).item() == 0 and xrow.tolist() == [0, 0]  # 0x3C has a code: no exception
    assert (hc[0, 5] & 0xF).item() == 1
    wide = (torch.randn(3, 64, generator=g) * torch.logspace(-30, 30, 64)).to(torch.bfloat16)
    with pytest.raises(ValueError, match="weights outside its 16 most common high bytes"):
        x12.encode(wide)


def test_cli_convert_tile_format(make_ckpt, tmp_path):
    from tilemem.cli.main import main

    path = make_ckpt("olmoe", "bf16")
    for fmt, x12_store in (("plain", False), ("x12", True)):
        out = tmp_path / fmt
        assert main(["convert", str(path), "--out", str(out), "--tile-size", "16", "--tile-format", fmt]) == 0
        assert TileStore(out).codec.x12 == x12_store


def test_convert_over_a_store_of_the_other_format(make_ckpt, tmp_path):
    """auto keeps a finished store of either format; an explicit format that differs is refused, not mixed."""
    path = make_ckpt("olmoe", "bf16")
    out = convert(path, tmp_path / "s", 16, progress=False, tile_format="plain")
    assert not TileStore(convert(path, out, 16, progress=False)).codec.x12  # auto: kept as it is
    with pytest.raises(StoreError, match="with plain tiles, not x12; remove it or choose another --out"):
        convert(path, out, 16, progress=False, tile_format="x12")
    with pytest.raises(StoreError, match="x12 tiles hold bf16 weights, not F32; convert with tile format auto"):
        convert(make_ckpt("olmoe", "fp32"), tmp_path / "f", 16, progress=False, tile_format="x12")


def test_prefill_sized_tiles_are_decoded_and_match(monkeypatch):
    """Past X12_FUSED_MAX_TOKENS tokens an x12 tile runs decoded (GEMMs); both ways give the plain tile's sum."""
    from tilemem.runtime import accumulator
    from tilemem.runtime.tile_format import encode_x12

    g = torch.Generator().manual_seed(5)
    n, d, t = 32, 64, 12
    plain = (torch.randn(3, n, d, generator=g) * 0.1).to(torch.bfloat16)
    tile = X12Tile((encode_x12(plain.view(3 * n, d)),), (n,), d)
    x = torch.randn(t, d, generator=g)
    tok, scale = torch.arange(t), torch.rand(t, generator=g)
    act = torch.nn.functional.silu
    ref = accumulator.partial_ffn(x, plain.float(), act) * scale[:, None]
    for limit in (t, t - 1):  # fused, then decoded
        monkeypatch.setattr(accumulator, "X12_FUSED_MAX_TOKENS", limit)
        acc = accumulator.Accumulator(x, act, None, None, x12_act="silu" if x12_kernels.available() else None)
        acc.add(tile, tok, scale)
        assert not acc.x12_tasks or limit == t
        assert rel_err(acc.result(), ref) < 1e-5
