"""The portable one-call decode layers (`kernels.portable_decode`, chosen by `models.portable_decode` where the AVX512
library does not run) against the module path (`fused_decode = False`) on tiny checkpoints in bf16, FP8 and GGUF
Q4_K_M: the same greedy tokens and logits (bit for bit on AVX2 torch builds) over 16 decode steps of rows at
different positions on shuffled paged block tables, the same routed ids to the observers, one native call a step;
shared experts with their gate; a model that does not qualify keeps the modules; bad input gets a KernelError."""

from __future__ import annotations

import pytest
import torch
from test_gguf import gguf_overrides  # noqa: E402
from test_paged_decode_block import greedy as paged_greedy

from tilemem import kernels
from tilemem.errors import KernelError
from tilemem.kernels import portable_decode
from tilemem.loader.checkpoint import load_model
from tilemem.models import portable_decode as models_portable
from tilemem.synth.gguf_writer import synthesize_gguf

pytestmark = pytest.mark.skipif(
    not portable_decode.available(),
    reason="the portable decode layers run where the AVX512 library does not (AVX2 + FMA + F16C)",
)

STEPS = 16
AVX512_BF16 = pytest.mark.skipif(
    kernels.available(), reason="a bf16 model decodes through the AVX512 library's fused layers here"
)
TORCH_AVX2 = torch.backends.cpu.get_cpu_capability() == "AVX2"  # torch's norm sums in the order torch_sum.h adds
TOL = 1e-2  # relative logits error allowed elsewhere (the AVX512 kernel tests' TOL)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    def make(family: str):
        out = tmp_path_factory.mktemp("gguf") / f"{family}-q4_k_m.gguf"
        fields = gguf_overrides(family) if family == "qwen2_moe" else None  # no dense layer (as test_gguf's files)
        return synthesize_gguf(family, "tiny", out, "q4_k_m", routing_skew=1.0, overrides=fields, progress=False)

    return make


def greedy(model, prompts: list[list[int]], fused: bool, routed: dict | None = None):
    """Greedy decoding of the prompts side by side on a paged cache of blocks of 4 in shuffled order -> (tokens per
    row, logits [STEPS, B, V]); `routed` collects each layer's routed ids per step."""
    model.fused_decode = fused
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(7)).tolist()
    tables = [perm[12 * r : 12 * r + 12] for r in range(len(prompts))]  # up to 48 positions a row
    return paged_greedy(model, prompts, STEPS, tables, 40, routed)


def compare(model, monkeypatch, rows: int = 2, runs: list[int] | None = None) -> int:
    """The fused and module paths' greedy decoding of `rows` prompts: the same tokens and routed ids, logits within
    TOL; returns the native calls the fused path made (asserting each step made calls of `runs` layers, default one
    of every layer)."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in (11, 6, 3)[:rows]]
    calls = []
    real = portable_decode.decode_layers
    monkeypatch.setattr(portable_decode, "decode_layers", lambda st, *a: calls.append(len(st.layers)) or real(st, *a))
    routed_on, routed_off = {}, {}
    on = greedy(model, prompts, True, routed_on)
    runs = runs or [model.cfg.num_layers]
    assert calls == runs * (len(calls) // len(runs))
    made = len(calls) // len(runs)
    off = greedy(model, prompts, False, routed_off)
    assert len(calls) == made * len(runs)  # the module path made none
    assert on[0] == off[0] and len(on[0][0]) == STEPS + 1
    # bit for bit where torch's kernels are AVX2 ones: the call rounds where the modules round
    assert torch.equal(on[1], off[1]) if TORCH_AVX2 else rel(on[1], off[1]) < TOL
    assert routed_on.keys() == routed_off.keys()
    for layer, ids in routed_off.items():
        got = routed_on[layer][-STEPS:]  # the decode steps (the prefill's came first)
        assert all(torch.equal(a, b) for a, b in zip(got, ids[-STEPS:], strict=True))
    return made


@pytest.mark.parametrize(  # q/k norm over all heads, none, per head; softmax renormalized (mixtral, qwen3_moe)
    "family,dtype",
    [
        pytest.param("olmoe", "bf16", marks=AVX512_BF16),
        ("olmoe", "fp8"),
        pytest.param("mixtral", "bf16", marks=AVX512_BF16),
        ("qwen3_moe", "fp8"),
    ],
)
def test_bf16_and_fp8_checkpoints_decode_as_the_modules(make_ckpt, monkeypatch, family, dtype):
    model, _ = load_model(make_ckpt(family, dtype, routing_skew=1.0), "bf16")
    assert compare(model, monkeypatch) == STEPS  # one call a step for every layer


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])  # qwen2_moe: q/k/v biases, gated shared experts
def test_gguf_q4_k_m_decodes_as_the_modules(gguf_file, monkeypatch, family):
    model, _ = load_model(gguf_file(family), "bf16")
    assert None not in model._native_decode().layers
    assert compare(model, monkeypatch, rows=3) == STEPS


@AVX512_BF16
def test_one_row_and_a_module_layer(make_ckpt, monkeypatch):
    """One row (a task per routed slot); layer 0 kept as modules: a run of the others a step."""
    model, _ = load_model(make_ckpt("olmoe", "bf16", routing_skew=1.0), "bf16")
    real = models_portable.portable_layer
    monkeypatch.setattr(
        models_portable, "portable_layer", lambda lay, rope: None if lay.layer == 0 else real(lay, rope)
    )
    assert compare(model, monkeypatch, rows=1, runs=[model.cfg.num_layers - 1]) == STEPS


@AVX512_BF16
def test_shared_experts_with_their_gate(make_ckpt, monkeypatch):
    """Qwen2-MoE: the shared experts and their sigmoid gate in the call (its dense layers, where any, stay modules)."""
    model, _ = load_model(make_ckpt("qwen2_moe", "bf16", routing_skew=1.0), "bf16")
    layers = model._native_decode().layers
    runs = [len(r) for r in "".join("m" if lay is None else "f" for lay in layers).split("m") if r]
    assert any(lay is not None and lay.struct.shared_gate_on for lay in layers)
    assert compare(model, monkeypatch, runs=runs) == STEPS


@AVX512_BF16
@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])  # MLA; sigmoid group-limited routing too
def test_layers_that_do_not_qualify_keep_the_modules(make_ckpt, monkeypatch, family):
    model, _ = load_model(make_ckpt(family, "bf16"), "bf16")
    assert all(lay is None for lay in model._native_decode().layers)
    assert compare(model, monkeypatch) == 0


@AVX512_BF16
def test_bad_input_is_refused(make_ckpt):
    model, _ = load_model(make_ckpt("olmoe", "bf16"), "bf16")
    native = model._native_decode()
    cfg = model.cfg
    cache = model.allocate_paged(8, 4)
    stack = portable_decode._stack(native.runs[0], cache.keys, cache.values)
    x = torch.zeros(2, cfg.hidden_size, dtype=torch.bfloat16)
    cos = torch.ones(2, cfg.head_dim)
    tables, positions = torch.zeros(2, 2, dtype=torch.int64), torch.tensor([1, 9])  # 9: past 2 blocks of 4
    with pytest.raises(KernelError, match="position is past its block table"):
        portable_decode.decode_layers(stack, x, cos, cos, tables, positions)
    assert not x.any() and not any(k.any() for k in cache.keys)  # nothing written
    with pytest.raises(KernelError, match="contiguous bf16"):
        portable_decode.decode_layers(stack, x.float(), cos, cos, tables, positions)
    with pytest.raises(KernelError, match="cos and sin"):
        portable_decode.decode_layers(stack, x, cos[:, :4], cos[:, :4], tables, positions)
    with pytest.raises(KernelError, match="KV pools"):
        portable_decode._stack(native.runs[0], [k.float() for k in cache.keys], cache.values)
