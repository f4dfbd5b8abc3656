"""The fused FFN kernels fed by a routing (`ffn_routed` over a `RoutedTable`) against the same kernels fed by
per-expert tasks (`ffn_tasks`, which the kernel tests hold to a float64 reference), and RMSNorm's native kernel
(`kernels.rmsnorm`) against the torch module's math."""

from __future__ import annotations

import pytest
import torch
from test_fp8_kernels import random_weight  # noqa: E402
from test_ggml_kernels import quant_weight  # noqa: E402

from tilemem.errors import KernelError
from tilemem.kernels import fp8, ggml, portable, rmsnorm
from tilemem.layers import mlp as mlp_module
from tilemem.layers.ggml import GgmlMatrix
from tilemem.layers.mlp import GatedMLP
from tilemem.layers.moe import group_by_expert
from tilemem.layers.norm import RMSNorm

pytestmark = pytest.mark.skipif(not portable.cpu_supported(), reason="the portable kernels need AVX2, FMA and F16C")
TORCH_AVX2 = torch.backends.cpu.get_cpu_capability() == "AVX2"  # torch's sums in the order torch_sum.h adds
E, D, N = 6, 256, 256  # K-quant rows: whole blocks of 256


def ggml_experts() -> list[ggml.FfnWeights]:
    types = [("q4_k", "q6_k"), ("q8_0", "q8_0")]
    out = []
    for e in range(E):
        gate_up, down = types[e % 2]
        gate, up = quant_weight(gate_up, N, D, 10 * e), quant_weight(gate_up, N, D, 10 * e + 1)
        out.append(ggml.FfnWeights(gate, up, quant_weight(down, D, N, 10 * e + 2)))
    return out


def fp8_experts() -> list[fp8.FfnWeights]:
    return [
        fp8.FfnWeights(random_weight(N, D, 10 * e), random_weight(N, D, 10 * e + 1), random_weight(D, N, 10 * e + 2))
        for e in range(E)
    ]


KINDS = {"ggml": (ggml, ggml_experts, KernelError), "fp8": (fp8, fp8_experts, ValueError)}


def routing(t: int, k: int, seed: int, repeat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(t)])  # [T, K]
    if repeat:
        ids[:, 1] = ids[:, 0]
    return ids, torch.rand(t, k, generator=g).to(torch.bfloat16) + 0.25  # [T, K] in the model dtype


def by_tasks(mod, experts, x, ids, weights, act) -> torch.Tensor:
    out = torch.zeros_like(x)
    tasks = [
        mod.FfnTask(experts[e], tok.to(torch.int32), weights[tok, slot].to(torch.float32))
        for e, tok, slot in group_by_expert(ids)
    ]
    mod.ffn_tasks(x, tasks, act, out)
    return out


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize(("t", "repeat"), [(1, False), (1, True), (3, False), (120, False)])
def test_routed_equals_tasks(kind: str, t: int, repeat: bool) -> None:
    """Decode (one token, a repeated id too), a few tokens, and a prefill whose experts get more tokens than the
    kernel takes (those run as matmuls): the same sums as the per-expert tasks."""
    mod, make, _ = KINDS[kind]
    experts = make()
    table = portable.RoutedTable(experts)
    x = torch.randn(t, D, generator=torch.Generator().manual_seed(t))
    ids, weights = routing(t, 3, seed=t, repeat=repeat)
    want = by_tasks(mod, experts, x, ids, weights, "silu")
    got = torch.zeros_like(x)
    mod.ffn_routed(x, table, ids, weights, "silu", got)
    assert got.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    if t == 120:
        _, big, _ = table.tasks(ids, weights, mod.FFN_MAX_TOKENS, ValueError)
        assert big, "the prefill case should have tasks past the kernel's token limit"
    wrong = ids.clone()
    wrong[0, 0] = (ids[0, 0] + 1) % E if not repeat else ids[0, 2]  # a routing change changes the output
    other = torch.zeros_like(x)
    mod.ffn_routed(x, table, wrong, weights, "silu", other)
    assert (other - got).abs().max() > 1e-3


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_routed_refuses_bad_input(kind: str) -> None:
    mod, make, error = KINDS[kind]
    table = portable.RoutedTable(make()[:2])
    x, out = torch.randn(1, D), torch.zeros(1, D)
    ids, weights = torch.tensor([[0, 2]]), torch.ones(1, 2)
    with pytest.raises(error, match=r"expert ids must be in \[0, 2\)"):
        mod.ffn_routed(x, table, ids, weights, "silu", out)
    with pytest.raises(error, match="hidden size 256, but x has 128 columns"):
        mod.ffn_routed(torch.randn(1, 128), table, ids[:, :1], weights[:, :1], "silu", torch.zeros(1, 128))
    with pytest.raises(error, match="act must be one of"):
        mod.ffn_routed(x, table, ids[:, :1], weights[:, :1], "tanh", out)
    assert out.abs().max() == 0  # nothing written by a refused call


def torch_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.skipif(not rmsnorm.available(), reason="the portable library does not run here")
@pytest.mark.parametrize("d", [2048, 128, 13, 1])
def test_rms_norm_kernel(d: int) -> None:
    """The torch module's values bit for bit in bf16 and fp32 (the sum of squares in torch's order), for a strided
    view (per-head norms of a [B, T, H, hd] projection) and a row of zeros too."""
    g = torch.Generator().manual_seed(d)
    for dtype in (torch.bfloat16, torch.float32):
        w = torch.randn(d, generator=g).to(dtype)
        x = (3 * torch.randn(4, 5, d, generator=g)).to(dtype)
        x[0, 0] = 0
        got, want = rmsnorm.rms_norm(x, w, 1e-6), torch_norm(x, w, 1e-6)
        assert got.shape == x.shape and got.dtype == dtype
        if TORCH_AVX2:
            assert torch.equal(got, want), f"{dtype}: {(got != want).sum()} values differ"
        else:  # torch's AVX512 kernels add 16 lanes: its sums differ in the last bits
            torch.testing.assert_close(got, want, rtol=8e-3 if dtype == torch.bfloat16 else 4e-6, atol=1e-6)
        view = x.view(4, 5 * d)[:, : 3 * d].view(4, 3, d)  # rows of a strided view
        assert torch.equal(rmsnorm.rms_norm(view, w, 1e-5), rmsnorm.rms_norm(view.contiguous(), w, 1e-5))
        assert not torch.equal(rmsnorm.rms_norm(x, w, 1e-6), rmsnorm.rms_norm(x, w.flip(0), 1e-6)) or d == 1


@pytest.mark.skipif(not rmsnorm.available(), reason="the portable library does not run here")
def test_rms_norm_module_and_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module takes the kernel for same-dtype CPU tensors on CPUs without the AVX512 library, and refusals
    name the problem."""
    m = RMSNorm(64, 1e-6)
    m.weight = torch.nn.Parameter(torch.randn(64).to(torch.bfloat16), requires_grad=False)
    calls = []
    monkeypatch.setattr(rmsnorm, "rms_norm", lambda *a: calls.append(1) or torch_norm(*a))
    monkeypatch.setattr("tilemem.kernels.usable", lambda x: False)
    m(torch.randn(2, 64).to(torch.bfloat16))
    m(torch.randn(2, 64))  # fp32 rows with bf16 weights: the torch path (its result is fp32)
    assert calls == [1]
    monkeypatch.undo()
    with pytest.raises(KernelError, match="one dtype, bf16 or fp32"):
        rmsnorm.rms_norm(torch.randn(2, 64), m.weight, 1e-6)
    with pytest.raises(KernelError, match="vector of x's last size 32"):
        rmsnorm.rms_norm(torch.randn(2, 32).to(torch.bfloat16), m.weight, 1e-6)


@pytest.mark.parametrize("kind", ["bf16", "fp8", "ggml"])
def test_gated_mlp_runs_fused_up_to_the_kernel_limit(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shared expert or dense FFN (`GatedMLP`) on the CPU: one fused call for decode-sized inputs, the same values
    as the kernel's own ffn_tasks (and as the torch modules within their roundings to bf16), the torch modules for
    prefill-sized ones and where no kernel takes the weights (fp32)."""
    monkeypatch.setattr("tilemem.kernels.usable", lambda x: False)  # the AVX512 library's path, where there is one
    m = GatedMLP(D, N, "silu")
    g = torch.Generator().manual_seed(3)
    if kind == "bf16":
        for lin in (m.gate_proj, m.up_proj, m.down_proj):
            lin.weight = torch.nn.Parameter(
                (torch.randn(lin.out_features, lin.in_features, generator=g) / 16).to(torch.bfloat16),
                requires_grad=False,
            )
    else:
        experts = fp8_experts() if kind == "fp8" else ggml_experts()
        mats = dict(
            zip(("gate_proj", "up_proj", "down_proj"), (experts[0].gate, experts[0].up, experts[0].down), strict=True)
        )
        for name, w in mats.items():
            lin = getattr(m, name)
            if kind == "fp8":
                lin.weight = torch.nn.Parameter(w[0], requires_grad=False)
                lin.weight_scale_inv = w[1]
            else:
                lin.set_quantized(GgmlMatrix(w[1], w[0], lin.in_features))
    fused = mlp_module.fused_ffn(m)
    assert fused is not None and fused.kernel.__name__.endswith(
        {"bf16": "bf16_ffn", "fp8": "fp8", "ggml": "ggml"}[kind]
    )
    x = torch.randn(2, D, generator=g).to(torch.bfloat16)
    calls = []
    real = fused.kernel.ffn_tasks
    monkeypatch.setattr(fused.kernel, "ffn_tasks", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    got = m(x)
    assert calls == [2] and got.dtype == torch.bfloat16
    want = torch.zeros(2, D)
    real(
        x.float(),
        [fused.kernel.FfnTask(fused.weights, torch.arange(2, dtype=torch.int32), torch.ones(2))],
        "silu",
        want,
        *fused.extra(x),
    )
    assert torch.equal(got, want.to(torch.bfloat16))
    monkeypatch.setattr(mlp_module, "fused_applies", lambda *a: False)
    torch.testing.assert_close(m(x).float(), got.float(), rtol=3e-2, atol=3e-2 * float(got.abs().max()))
    monkeypatch.undo()
    monkeypatch.setattr("tilemem.kernels.usable", lambda x: False)
    calls.clear()
    m(torch.randn(fused.max_tokens + 1, D).to(torch.bfloat16))  # prefill-sized: the modules
    assert calls == []
