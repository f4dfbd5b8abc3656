"""The cuda tier holds FP8 and GGUF tiles as stored (`layers.gpu_ffn.Fp8Slab`, `GgmlSlab`: one byte per weight plus
block scales, or the file's quant blocks) and dequantizes them with torch right before the batched GEMMs.

Slabs, their dequantizers and the runtime's VRAM path are device-agnostic torch, so most of this runs on the CPU:
slabs built with device=cpu give the FFN of the dequantized weights, hold the payload's bytes, the dequantizers run
on the `meta` device (which refuses host tensors and reads back to the host), and the runtime's VRAM path
(`TieredExperts._vram_tiles`) over a CPU slab equals its host path. The end-to-end runs with a cuda budget are
skipped without a CUDA device.

Shape legend: T tokens, D hidden, I expert width, n tile neurons.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_tiered_exactness import GREEDY, REL_TOL, forward_logits, prompts, rel_err

from tilemem.engine.llm import LLM
from tilemem.layers import fp8, ggml
from tilemem.layers.ggml import QUANT_TYPES, GgmlMatrix
from tilemem.layers.gpu_ffn import GATHER_MAX_PAIRS, Fp8Slab, GgmlSlab, gathered_ffn, stacked_ffn
from tilemem.layers.mlp import activation
from tilemem.layers.moe import PartialSums, expert_ffn
from tilemem.loader.checkpoint import Checkpoint
from tilemem.models.topology import SHARED, Topology
from tilemem.runtime import tiered
from tilemem.runtime.gguf_source import ffn_types, quantized_bytes
from tilemem.runtime.setup import make_plan
from tilemem.runtime.tiered import TieredConfig
from tilemem.runtime.tile_format import TileCodec
from tilemem.synth.ggml_quant import quantize as ggml_quantize
from tilemem.synth.gguf_writer import synthesize_gguf

pytestmark = pytest.mark.usefixtures("ggml_exact")  # both engines on the exact path
ACT = activation("silu")


def weights(i: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random gate [I, D], up [I, D], down [D, I] fp32."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=gen) / 4 for shape in ((i, d), (i, d), (d, i)))


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal within fp32 sums in another order (relative to the largest output)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def check_slab_ffn(slab, dense: dict[int, tuple], d: int) -> None:
    """Each unit's stacked FFN, and every unit's gathered (token, tile) pairs, over `slab.dense` equal the FFN of
    the unit's dequantized weights `dense` (unit -> gate, up, down fp32)."""
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(9))  # [T, D]
    for unit, (first, count) in slab.slots.items():
        want = expert_ffn(x, *dense[unit], ACT)  # [T, D]
        gate_up, down_t = slab.dense(range(first, first + count))
        assert gate_up.dtype == down_t.dtype == torch.float32
        close(stacked_ffn(x, gate_up, down_t, ACT), want)
    # Pairs of every token with every tile of two units, through the dequantized tiles they use.
    units = sorted(slab.slots)[-2:]
    used = sorted(s for u in units for s in range(slab.slots[u][0], sum(slab.slots[u])))
    gate_up, down_t = slab.dense(used)
    tok, unit = [], []
    for t in range(x.shape[0]):
        for s in used:
            tok.append(t)
            unit.append(used.index(s))
    out = torch.zeros(x.shape)
    gathered_ffn(x, gate_up, down_t, torch.tensor(tok), torch.tensor(unit), torch.ones(len(tok)), ACT, out)
    close(out, sum(expert_ffn(x, *dense[u], ACT) for u in units))


def test_fp8_slab_holds_e4m3_bytes_and_computes_the_dequantized_ffn():
    """Experts 160 wide in 128-neuron tiles (a short last tile, zero-padded in the slab), hidden 192 (a partial
    scale block): the slab's FFN is the dequantized experts', and it holds one byte per weight plus the scales."""
    d, i, tile = 192, 160, 128
    codec = TileCodec(fp8.FP8, d)
    blocks, dense = {}, {}
    for unit in (0, 2, SHARED):
        q = [fp8.quantize(w) for w in weights(i, d, seed=unit + 5)]  # (data, scale) of gate, up, down
        dense[unit] = tuple(fp8.dequantize(*m) for m in q)
        data, scales = [m[0] for m in q], tuple(m[1] for m in q)
        tiles = [codec.view(codec.pack(*data, a, min(i, a + tile), scales), min(i, a + tile) - a) for a in (0, 128)]
        blocks[unit] = [(t.data, t.scale) for t in tiles]
    slab = Fp8Slab(blocks, tile, torch.device("cpu"), torch.float32)
    assert slab.data.dtype == torch.uint8 and slab.scale.dtype == torch.float32
    slots = 6
    payload = 3 * tile * d + 4 * 3 * (tile // 128) * math.ceil(d / 128)  # one full tile: e4m3 bytes and scales
    assert slab.nbytes == slots * payload
    assert slab.nbytes < slots * 3 * tile * d * 2 // 1.9  # about half of bf16's
    assert slab.unit_bytes(2) == 2 * payload
    check_slab_ffn(slab, dense, d)
    gate_up, _ = Fp8Slab(blocks, tile, torch.device("cpu"), torch.bfloat16).dense([0, 1])
    assert gate_up.dtype == torch.bfloat16  # the compute dtype


GGUF_CASES = [  # (gate, up, down types), hidden, width, tile
    (("q4_k", "q4_k", "q6_k"), 256, 512, 256),
    (("q8_0", "q8_0", "q8_0"), 64, 96, 64),  # a short last tile
    (("q6_k", "q6_k", "q6_k"), 256, 256, 256),
]


def ggml_unit(types: tuple[str, str, str], d: int, i: int, seed: int) -> tuple[GgmlMatrix, ...]:
    """One FFN unit's gate [I, D], up [I, D], down [D, I] quantized in `types`."""
    return tuple(
        GgmlMatrix(ggml_quantize(q, w), q, w.shape[1]) for q, w in zip(types, weights(i, d, seed), strict=True)
    )


def ggml_tiles(codec: TileCodec, mats: tuple[GgmlMatrix, ...], width: int, tile: int) -> list:
    """The unit's store tiles (`TileCodec.pack` then `view`, as the store and the runtime do)."""
    return [
        codec.view(codec.pack(*mats, a, min(width, a + tile)), min(width, a + tile) - a) for a in range(0, width, tile)
    ]


@pytest.mark.parametrize(("types", "d", "i", "tile"), GGUF_CASES, ids=["q4_k_m", "q8_0", "q6_k"])
def test_ggml_slab_holds_the_blocks_and_computes_the_dequantized_ffn(types, d, i, tile):
    units = {(0, e): types for e in (0, 1, 3)}
    store_codec = TileCodec(torch.uint8, d, ggml_units=units)
    blocks, dense, real = {}, {}, 0
    for _, e in units:
        mats = ggml_unit(types, d, i, seed=e)
        dense[e] = tuple(m.dequantize() for m in mats)
        tiles = ggml_tiles(store_codec.unit(0, e), mats, i, tile)
        real += sum(t.nbytes for t in tiles)
        blocks[e] = [t.matrices() for t in tiles]
    slab = GgmlSlab(blocks, tile, torch.device("cpu"), torch.float32)
    per_tile = store_codec.unit(0, 0).payload_bytes(tile)  # one full tile's blocks
    slots = 3 * math.ceil(i / tile)
    assert slab.nbytes == slots * per_tile
    if i % tile == 0:
        assert slab.nbytes == real  # exactly the blocks the store holds
    assert slab.nbytes < slots * 3 * tile * d * 2 * 0.6  # at most 34/32 bytes per weight (q8_0), not bf16's 2
    assert slab.unit_bytes(3) == math.ceil(i / tile) * per_tile
    check_slab_ffn(slab, dense, d)


def test_ggml_slab_keeps_units_of_other_types_apart():
    """A shared expert in other types than the routed experts (as Q4_K_M files have) gets a group of its own;
    `dense` over slots of both groups keeps their order."""
    d, tile = 256, 256
    types = {0: ("q4_k", "q4_k", "q6_k"), 1: ("q4_k", "q4_k", "q6_k"), SHARED: ("q8_0", "q8_0", "q8_0")}
    store_codec = TileCodec(torch.uint8, d, ggml_units={(0, e): t for e, t in types.items()})
    blocks, dense = {}, {}
    for e, t in types.items():
        mats = ggml_unit(t, d, 512, seed=e + 7)
        dense[e] = tuple(m.dequantize() for m in mats)
        blocks[e] = [tile.matrices() for tile in ggml_tiles(store_codec.unit(0, e), mats, 512, tile)]
    slab = GgmlSlab(blocks, tile, torch.device("cpu"), torch.float32)
    assert len(slab.groups) == 2 and {g.types for g in slab.groups} == set(types.values())
    check_slab_ffn(slab, dense, d)
    both = sorted([slab.slots[SHARED][0] + 1, slab.slots[1][0]])
    gate_up, _ = slab.dense(both)
    for k, s in enumerate(both):
        torch.testing.assert_close(gate_up[k], slab.dense([s])[0][0])
    meta = GgmlSlab(blocks, tile, torch.device("meta"), torch.bfloat16)  # no host tensor, no read back
    gate_up, down_t = meta.dense(both)
    assert gate_up.device.type == "meta" and gate_up.shape == (2, 2 * tile, d) and down_t.dtype == torch.bfloat16


@pytest.mark.parametrize("qtype", sorted(QUANT_TYPES))
def test_ggml_dequantize_runs_on_any_device(qtype):
    """The `meta` device refuses tensors made on the host and any read back to it: the decoding is torch on the
    blocks' device only (a GPU's blocks decode there). Stacks of matrices decode as each matrix does."""
    rows = ggml_quantize(qtype, torch.randn(2, 3, 256))  # [2, 3, row_bytes]
    out = ggml.dequantize(qtype, rows.to("meta"), 256)
    assert out.device.type == "meta" and out.shape == (2, 3, 256) and out.dtype == torch.float32
    whole = ggml.dequantize(qtype, rows, 256)
    assert torch.equal(whole[1], ggml.dequantize(qtype, rows[1], 256))


def test_fp8_dequantize_runs_on_any_device():
    data, scale = fp8.quantize(weights(160, 192, seed=1)[0])
    out = fp8.dequantize(data.to("meta"), scale.to("meta"))
    assert out.device.type == "meta" and out.shape == (160, 192)
    slab = Fp8Slab({0: [(data[None].expand(3, -1, -1), scale[None].expand(3, -1, -1))]}, 256, "meta", torch.float32)
    gate_up, down_t = slab.dense([0])
    assert gate_up.device.type == down_t.device.type == "meta" and gate_up.shape == (1, 512, 192)


# -- the runtime's VRAM path, over a slab on the CPU ---------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """deepseek_v2 in Q4_K_M: q4_k gate/up, q4_k or q6_k downs (layer 2's routed experts in q6_k, its shared expert
    in q4_k), shared experts and a dense layer."""
    out = tmp_path_factory.mktemp("gguf-cuda") / "deepseek_v2-q4_k_m.gguf"
    return synthesize_gguf("deepseek_v2", "tiny", out, "q4_k_m", routing_skew=1.0, progress=False)


@pytest.fixture(scope="module")
def reference(make_ckpt, gguf_file):
    """kind -> (model path, tile size, prompts, logits, greedy tokens) of the all-resident fp32 run on the CPU: FP8
    olmoe (160-wide experts in 128-neuron tiles) or the GGUF file."""
    refs: dict[str, tuple] = {}

    def get(kind: str):
        if kind not in refs:
            path, tile = (make_ckpt("olmoe", "fp8", routing_skew=1.0), 128) if kind == "fp8" else (gguf_file, 256)
            llm = LLM(path, dtype="fp32")
            batch = prompts(llm.config.vocab_size)
            tokens = [o.token_ids for o in llm.generate(batch, GREEDY)]
            refs[kind] = (path, tile, batch, forward_logits(llm.model, batch, tokens), tokens)
        return refs[kind]

    return get


def topology(ckpt: Checkpoint) -> Topology:
    """What `make_plan` counts: the weights as stored (a GGUF file's FFN blocks in their quant types)."""
    if ckpt.path.suffix == ".gguf":
        return Topology.from_config(ckpt.config, None, ffn_types(ckpt), quantized_bytes(ckpt))
    return Topology.from_config(ckpt.config, None)


def host_llm(path, tile: int, store) -> LLM:
    """A tiered fp32 LLM on the CPU with every FFN tile on disk."""
    ckpt = Checkpoint.open(path)
    plan = make_plan(ckpt, f"cpu={topology(ckpt).non_expert_bytes}B", "tilepo_fine", None, tile)
    return LLM(path, dtype="fp32", plan=plan, store=store, tile=tile, runtime=TieredConfig(prefetch=False))


@pytest.mark.parametrize("kind", ["fp8", "gguf"])
def test_model_with_quantized_slabs_gives_the_resident_output(kind, reference, tmp_path, monkeypatch):
    """Every other FFN unit of every layer moved from disk into a slab (built on the CPU here: the VRAM path is
    device-agnostic): the model's logits and greedy tokens are the all-resident run's, prefill (stacked per unit)
    and decode (gathered pairs) alike."""
    path, tile, batch, ref_logits, ref_tokens = reference(kind)
    monkeypatch.setattr(tiered, "GATHER_MAX_PAIRS", 12)  # prefill's pairs stacked, decode's gathered, on tiny models
    shapes = []  # which GEMM shapes ran over the slabs
    for name in ("gathered_ffn", "stacked_ffn"):
        real = getattr(tiered, name)
        monkeypatch.setattr(tiered, name, lambda *a, _n=name, _f=real: shapes.append(_n) or _f(*a))
    llm = host_llm(path, tile, tmp_path / "store")
    try:
        ex = llm.tiered
        moved = 0
        for layer in sorted({lay for lay, _ in ex.ranges}):
            units = sorted(e for lay, e in ex.ranges if lay == layer)[::2]  # a shared or dense unit first
            width = {e: max(t.end for t in ex.store.tiles_of(layer, e)) for e in units}
            ex.slabs[layer] = ex.slab(layer, {e: [(0, width[e])] for e in units})
            for e in units:  # computed from the slab only
                ex.on_disk[(layer, e)], ex.resident[(layer, e)] = [], []
            moved += len(units)
        assert moved >= 4 and ex.gpu_bytes == sum(s.nbytes for s in ex.slabs.values())
        ours = forward_logits(llm.model, batch, ref_tokens)
        for i, (a, b) in enumerate(zip(ours, ref_logits, strict=True)):
            assert rel_err(a, b) < REL_TOL, f"logits block {i}: rel err {rel_err(a, b):.2e}"
        assert [o.token_ids for o in llm.generate(batch, GREEDY)] == ref_tokens
        runtime = llm.stats().runtime
        assert runtime["gpu_bytes"] > 0 and runtime["disk_bytes"] > 0  # slab tiles and disk tiles both computed
        assert set(shapes) == {"gathered_ffn", "stacked_ffn"}
    finally:
        llm.tiered.close()


@pytest.mark.parametrize("kind", ["fp8", "gguf"])
def test_vram_path_over_quantized_slab_equals_host_path(kind, make_ckpt, gguf_file, tmp_path):
    """`_vram_tiles` over a slab of a layer's units (routed experts, and the shared expert where there is one) gives
    the host path's sum for the same tokens, at a few tokens (gathered pairs) and at many (stacked per unit), and
    counts the slab's quantized bytes as computed in VRAM."""
    path, tile, slab_type = (make_ckpt("olmoe", "fp8", routing_skew=1.0), 128, Fp8Slab)
    if kind == "gguf":
        path, tile, slab_type = (gguf_file, 256, GgmlSlab)
    llm = host_llm(path, tile, tmp_path / "store")
    try:
        ex = llm.tiered
        layer = max(ex.blocks)  # the last MoE layer (Q4_K_M: routed downs in q6_k, the shared expert's in q4_k)
        units = sorted({e for lay, e in ex.ranges if lay == layer})  # a shared expert (SHARED < 0) first
        width = {e: max(t.end for t in ex.store.tiles_of(layer, e)) for e in units}
        slab = ex.slab(layer, {e: [(0, width[e])] for e in units})
        assert isinstance(slab, slab_type)
        assert kind == "fp8" or len(slab.groups) == 2
        for e in units:  # each slot holds one store tile's bytes (a full tile's, for a short last tile)
            assert slab.unit_bytes(e) == slab.slots[e][1] * ex.store.codec.unit(layer, e).payload_bytes(tile)
        assert slab.nbytes == sum(slab.unit_bytes(e) for e in units)
        d = llm.config.hidden_size
        gen = torch.Generator().manual_seed(4)
        for t, per_unit in ((3, 2), (40, 40)):  # a few tokens: gathered; many: stacked
            x = torch.randn(t, d, generator=gen)  # [T, D]
            groups = [
                (e, torch.randperm(t, generator=gen)[:per_unit].sort().values, torch.rand(per_unit, generator=gen))
                for e in units[:1] + units[-2:]
            ]
            pairs = sum(slab.slots[e][1] * len(tok) for e, tok, _ in groups)
            assert (pairs <= GATHER_MAX_PAIRS) == (t == 3)
            before = ex.counters.gpu_bytes
            sums = SimpleNamespace(sums=PartialSums(x.shape))
            ex._vram_tiles(slab, x, groups, sums)
            assert ex.counters.gpu_bytes - before == sum(slab.unit_bytes(e) for e, _, _ in groups)
            want = ex._host(layer, x, groups)
            close(sums.sums.result(), want)
    finally:
        llm.tiered.close()


# -- plans ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fp8", "gguf_q8_0"])
def test_plan_with_a_cuda_tier_counts_quantized_bytes(kind, make_ckpt, tmp_path):
    """A plan with a cuda budget counts the cuda tier's FP8 / GGUF tiles at their stored bytes (e4m3 bytes and
    scales; the file's blocks), not as bf16 tiles."""
    if kind == "fp8":
        path, tile = make_ckpt("olmoe", "fp8", routing_skew=1.0), 128
    else:
        path, tile = synthesize_gguf("olmoe", "tiny", tmp_path / "m.gguf", "q8_0", progress=False), 64
    ckpt = Checkpoint.open(path)
    topo = topology(ckpt)
    ffn = topo.routed_expert_bytes + topo.shared_and_dense_bytes
    plan = make_plan(ckpt, f"cuda={topo.non_expert_bytes + ffn // 2}B,cpu={ffn // 4}B", "tilepo_fine", None, tile)
    assert plan.fmt.name == ("fp8_e4m3" if kind == "fp8" else "gguf_q8_0")
    cuda = plan.tiles_in("cuda")
    assert cuda and plan.usage("cuda").tiles == sum(t.total_bytes for t in cuda)
    d = topo.hidden_size
    want = 0
    for t in cuda:  # gate_up and down halves of each tile
        n = t.end - t.start
        if kind == "fp8":
            per = n * d + 4 * math.ceil(n / 128) * math.ceil(d / 128)  # one projection: e4m3 bytes + scales
        else:
            per = n * d // 32 * QUANT_TYPES["q8_0"].nbytes
        want += per * (2 if t.group == "gate_up" else 1)
    assert plan.usage("cuda").tiles == want
    assert want < sum((t.end - t.start) * d * 2 * (2 if t.group == "gate_up" else 1) for t in cuda) * 0.6


# -- on a GPU -------------------------------------------------------------------------------------------------------

GPU_CASES = [  # (weights, cuda share, cpu share of the FFN bytes, gpu_min_tokens); the rest on disk
    ("fp8", 0.5, 0.3, 1),
    ("fp8", 1.0, 0.0, 10**6),
    ("gguf", 0.5, 0.3, 10**6),
    ("gguf", 0.4, 0.3, 1),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the cuda tier); CPU parts run above")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cuda_tier_of_quantized_tiles_matches_resident(case, reference, tmp_path):
    """A tiered FP8 (olmoe, 160-wide experts in 128-neuron tiles) and GGUF (deepseek_v2 Q4_K_M: shared experts, a
    dense layer) model with a cuda budget gives the all-resident CPU run's logits and greedy tokens; its slabs hold
    the quantized bytes in VRAM."""
    kind, cuda_share, cpu_share, gpu_min_tokens = case
    path, tile, batch, ref_logits, ref_tokens = reference(kind)
    ckpt = Checkpoint.open(path)
    topo = topology(ckpt)
    ffn = topo.routed_expert_bytes + topo.shared_and_dense_bytes
    budget = f"cuda={topo.non_expert_bytes + int(cuda_share * ffn)}B,cpu={int(cpu_share * ffn) + 1}B"
    plan = make_plan(ckpt, budget, "tilepo_fine", None, tile)
    llm = LLM(path, dtype="fp32", plan=plan, store=tmp_path / "store", tile=tile,
              runtime=TieredConfig(gpu_min_tokens=gpu_min_tokens))  # fmt: skip
    try:
        ex = llm.tiered
        assert ex.device.type == "cuda" and ex.slabs
        slab_type = Fp8Slab if kind == "fp8" else GgmlSlab
        assert all(isinstance(s, slab_type) for s in ex.slabs.values())
        if kind == "fp8":
            assert all(s.data.is_cuda and s.data.dtype == torch.uint8 for s in ex.slabs.values())
        else:
            assert all(g.gate.is_cuda and g.down.dtype == torch.uint8 for s in ex.slabs.values() for g in s.groups)
        d = topo.hidden_size
        for s in ex.slabs.values():  # quantized bytes in VRAM: at most ~half of what bf16 tiles would take
            slots = sum(count for _, count in s.slots.values())
            assert s.nbytes == sum(s.unit_bytes(e) for e in s.slots) < slots * 3 * tile * d * 2 * 0.6
        ours = forward_logits(llm.model, batch, ref_tokens)
        for i, (a, b) in enumerate(zip(ours, ref_logits, strict=True)):
            assert rel_err(a, b) < REL_TOL, f"logits block {i}: rel err {rel_err(a, b):.2e}"
        assert [o.token_ids for o in llm.generate(batch, GREEDY)] == ref_tokens
        runtime = llm.stats().runtime
        assert runtime["gpu_bytes"] > 0
        if gpu_min_tokens == 1 and (plan.tiles_in("cpu") or plan.tiles_in("disk")):
            assert runtime["h2d_bytes"] > 0  # host FP8 / GGUF tiles shipped to the GPU too
    finally:
        llm.tiered.close()
