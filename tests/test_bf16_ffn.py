"""The portable fused bf16 expert FFN (`kernels/bf16_ffn.py`, csrc_portable/bf16_ffn.c) against an fp64 reference on
the same (exactly widened) weights: token counts around the 8-token passes, every activation, tokens shared between
tasks, D and n that are not multiples of 16, prefill-sized tasks; a swapped weight row changes the output; bad input
is refused; and `ResidentExperts` on CPUs without AVX512 gives the same greedy tokens with it as with the old
per-expert loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tilemem import LLM, SamplingParams
from tilemem.errors import KernelError
from tilemem.kernels import bf16_ffn, portable
from tilemem.layers import mlp, moe

pytestmark = pytest.mark.skipif(
    not bf16_ffn.available(), reason="the portable kernels need AVX2 + FMA + F16C, gcc and TILEMEM_KERNELS != 0"
)

TOL = 1e-5  # max abs error / max abs reference: fp32 accumulation in another order
ACTS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def expert(n: int, d: int, seed: int) -> bf16_ffn.FfnWeights:
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(n, d, generator=g).bfloat16() for _ in range(2))  # [n, D]
    return bf16_ffn.FfnWeights(gate, up, torch.randn(d, n, generator=g).bfloat16())  # down [D, n]


def tasks_for(weights: list[bf16_ffn.FfnWeights], t: int, ntok: int, seed: int) -> list[bf16_ffn.FfnTask]:
    """A task per expert, each of ntok random (distinct) rows of [0, t): the tasks share tokens."""
    g = torch.Generator().manual_seed(seed)
    return [
        bf16_ffn.FfnTask(w, torch.randperm(t, generator=g)[:ntok].to(torch.int32), torch.rand(ntok, generator=g))
        for w in weights
    ]


def reference(x: torch.Tensor, tasks: list[bf16_ffn.FfnTask], act: str) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float64)  # [T, D]
    for w, tok, weight in tasks:
        xt = x[tok.long()].double()  # [N, D]
        h = ACTS[act](xt @ w.gate.double().t()) * (xt @ w.up.double().t())  # [N, n]
        out.index_add_(0, tok.long(), (h @ w.down.double().t()) * weight.double()[:, None])
    return out


def run(x: torch.Tensor, tasks: list[bf16_ffn.FfnTask], act: str) -> torch.Tensor:
    out = torch.zeros(x.shape)  # [T, D]
    bf16_ffn.ffn_tasks(x, tasks, act, out)
    return out


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize(("d", "n"), [(64, 48), (37, 19), (130, 5)], ids=["aligned", "ragged", "few-neurons"])
@pytest.mark.parametrize("ntok", [1, 3, 8, 13])
@pytest.mark.parametrize("act", sorted(ACTS))
def test_matches_fp64_reference(d, n, ntok, act, threads):
    weights = [expert(n, d, seed) for seed in range(3)]
    x = torch.randn(ntok + 2, d, generator=torch.Generator().manual_seed(ntok)) * 0.3  # [T, D]
    tasks = tasks_for(weights, ntok + 2, ntok, seed=d + n + ntok)
    assert rel(run(x, tasks, act), reference(x, tasks, act)) < TOL


def test_olmoe_shaped_layer_and_prefill_tasks(threads):
    """D 2048, n 1024 (OLMoE-1B-7B's experts) at one token; a task past FFN_MAX_TOKENS (torch's GEMMs) in one call
    with a decode-sized one."""
    w = expert(1024, 2048, 0)
    x = torch.randn(1, 2048) * 0.05
    tasks = [bf16_ffn.FfnTask(w, torch.zeros(1, dtype=torch.int32), torch.tensor([0.7]))]
    assert rel(run(x, tasks, "silu"), reference(x, tasks, "silu")) < TOL
    small = [expert(40, 24, 1), expert(40, 24, 2)]
    t = bf16_ffn.FFN_MAX_TOKENS + 5
    x = torch.randn(t, 24)
    tasks = tasks_for(small[:1], t, t, 3) + tasks_for(small[1:], t, 6, 4)
    assert rel(run(x, tasks, "gelu"), reference(x, tasks, "gelu")) < TOL


@pytest.mark.parametrize("t", [1, 5, 30])
def test_routed_matches_the_reference(t, monkeypatch):
    """ffn_routed: the tasks of a routing ids, weights [T, K] (a repeated expert in a row counts twice; 30 tokens
    put an expert past FFN_MAX_TOKENS, here 16); an expert id outside the table is refused."""
    monkeypatch.setattr(bf16_ffn, "FFN_MAX_TOKENS", 16)
    experts = [expert(24, 40, seed) for seed in range(4)]
    table = portable.RoutedTable(experts)
    g = torch.Generator().manual_seed(t)
    ids = torch.randint(0, 4, (t, 3), generator=g)  # [T, K]
    ids[0, 1] = ids[0, 0]
    weights = torch.rand(t, 3, generator=g).bfloat16()  # [T, K], the model dtype
    x = torch.randn(t, 40, generator=g)
    out = torch.zeros(t, 40)
    bf16_ffn.ffn_routed(x, table, ids, weights, "silu", out)
    rows = torch.arange(t, dtype=torch.int32)
    tasks = [bf16_ffn.FfnTask(experts[e], rows[ids[:, k] == e], weights[:, k][ids[:, k] == e].float())
             for k in range(3) for e in range(4)]  # fmt: skip
    assert rel(out, reference(x, tasks, "silu")) < TOL
    with pytest.raises(KernelError, match=r"expert ids must be in \[0, 4\)"):
        bf16_ffn.ffn_routed(x, table, ids + 4, weights, "silu", out)


def test_strided_rows_and_out_accumulates():
    """Weights that are row slices of wider matrices; out is summed into, never set."""
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(3, 45, 50, generator=g).bfloat16()  # row stride 50
    w = bf16_ffn.FfnWeights(wide[0, :20, :40], wide[1, :20, :40], wide[2, :40, 10:30])  # n 20, D 40
    x = torch.randn(2, 40, generator=g)
    tasks = [bf16_ffn.FfnTask(w, torch.tensor([1, 0], dtype=torch.int32), torch.tensor([0.5, 2.0]))]
    out = torch.ones(2, 40)
    bf16_ffn.ffn_tasks(x, tasks, "silu", out)
    assert rel(out - 1, reference(x, tasks, "silu")) < TOL


@pytest.mark.parametrize("which", ["gate", "up", "down"])
def test_swapped_weight_rows_change_the_output(which):
    w = expert(32, 48, 7)
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(1))
    tok, weight = torch.arange(3, dtype=torch.int32), torch.ones(3)
    before = run(x, [bf16_ffn.FfnTask(w, tok, weight)], "silu")
    mats = {"gate": w.gate.clone(), "up": w.up.clone(), "down": w.down.clone()}
    mats[which][[2, 5]] = mats[which][[5, 2]]
    swapped = bf16_ffn.FfnWeights(**mats)
    after = run(x, [bf16_ffn.FfnTask(swapped, tok, weight)], "silu")
    assert rel(after, reference(x, [bf16_ffn.FfnTask(swapped, tok, weight)], "silu")) < TOL
    assert (after - before).abs().max() > 1e-2 * before.abs().max()


def test_bad_weights_are_refused():
    g, d = torch.randn(8, 16).bfloat16(), torch.randn(16, 8).bfloat16()
    with pytest.raises(KernelError, match="up: must be a bfloat16"):
        bf16_ffn.FfnWeights(g, g.float(), d)
    with pytest.raises(KernelError, match=r"down: shape \(8, 16\), but the expert needs \[16, 8\]"):
        bf16_ffn.FfnWeights(g, g, g)
    with pytest.raises(KernelError, match="rows must be contiguous"):
        bf16_ffn.FfnWeights(g, g, d.t().contiguous().t())
    with pytest.raises(KernelError, match="gate must be a 2-D tensor"):
        bf16_ffn.FfnWeights(g[0], g, d)


def test_bad_calls_are_refused():
    w = expert(8, 16, 0)
    x, out = torch.randn(2, 16), torch.zeros(2, 16)
    tok, weight = torch.tensor([0, 1], dtype=torch.int32), torch.ones(2)
    good = bf16_ffn.FfnTask(w, tok, weight)
    cases = [
        ((x.bfloat16(), [good], "silu", out), "x must be a 2-D float32 CPU tensor"),
        ((x, [good], "silu", torch.zeros(3, 16)), "out has shape"),
        ((x, [good], "tanh", out), "act must be one of"),
        ((torch.randn(2, 17), [good], "silu", torch.zeros(2, 17)), "hidden size 16, but x has 17 columns"),
        ((x, [bf16_ffn.FfnTask(w, tok.long(), weight)], "silu", out), "tok must be a torch.int32"),
        ((x, [bf16_ffn.FfnTask(w, tok, torch.ones(3))], "silu", out), "weight has 3 values for 2 tokens"),
        ((x, [(w, tok)], "silu", out), "expected a bf16_ffn.FfnTask"),
        ((x, [bf16_ffn.FfnTask(w, torch.tensor([0, 2], dtype=torch.int32), weight)], "silu", out), r"in \[0, 2\)"),
    ]
    for args, message in cases:
        with pytest.raises(KernelError, match=message):
            bf16_ffn.ffn_tasks(*args)
    assert out.abs().max() == 0  # nothing was written by a refused call


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_resident_experts_greedy_tokens_match_the_loop(family, make_ckpt, monkeypatch):
    """The all-resident engine on a bf16 checkpoint: the fused kernel (one call per layer) and the per-expert loop
    (the fused branches switched off, shared experts' too) give the same greedy tokens, prefill and decode."""
    if moe.kernels.available():
        pytest.skip("the AVX512 library runs bf16 experts here (kernels.moe); the portable branch is for CPUs without")
    path = make_ckpt(family, "bf16", routing_skew=1.0)
    prompts = [[3, 17, 42, 5, 9, 11], [7, 1]]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    calls: list[int] = []
    fused = bf16_ffn.ffn_routed
    monkeypatch.setattr(bf16_ffn, "ffn_routed", lambda x, *a: calls.append(x.shape[0]) or fused(x, *a))
    ours = [o.token_ids for o in LLM(path, dtype="bf16").generate(prompts, params)]
    assert calls, "the fused bf16 kernel was not called"
    monkeypatch.setattr(moe, "fused_applies", lambda *args: False)  # routed experts: the loop
    monkeypatch.setattr(mlp, "fused_applies", lambda *args: False)  # shared experts: the torch modules
    calls.clear()
    loop = [o.token_ids for o in LLM(path, dtype="bf16").generate(prompts, params)]
    assert not calls
    assert ours == loop
