"""The fp8 FFN kernels' `bf16_h` (a bf16 model): the hidden activations h = act(gate x) * (up x) rounded to bf16
before the down projection, as the bf16 kernels (`csrc/ffn.c`) round them, on every path a task takes (the fused
kernel of few tokens and transposed downs, the AVX512-BF16 GEMM of prefill-sized tasks, the matmuls), against a
float64 reference that rounds h the same way.

The gate and up sums are made exact in fp32 (bf16 x of a few bits, e4m3 weights of a narrow range, power-of-two
block scales: every partial sum is a multiple of 2^-9 below 2^24 of them), so the kernels' h is the reference's
to the bit (act in fp32 as `ffn_common.h` computes it) and so is its rounding to bf16; only the down's fp32 sums
differ, in order (TOL)."""

from __future__ import annotations

import pytest
import torch

from tilemem.kernels import fp8

pytestmark = pytest.mark.skipif(
    not fp8.available(),
    reason="fp8 kernels off: they need AVX2 + FMA + F16C and a C compiler, and TILEMEM_KERNELS != 0",
)

TOL = 1e-5  # max abs error / max abs reference: the down's fp32 sums in another order
ACTS = {  # in fp32, as ffn_common.h's ffn_act
    "silu": lambda g: g / (1 + torch.exp(-g)),
    "gelu": lambda g: 0.5 * g * (1 + torch.erf(g * 0.70710678118654752)),
    "relu": lambda g: g.clamp_min(0),
}


def narrow_weight(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 bytes of exponent field 6..9 (|w| in [0.5, 7.5]) and either sign, one power-of-two scale (2^-3..1) per
    block: products with x (`few_bits`) are multiples of 2^-9 below 2^4."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (rows, cols), generator=g) << 7
    exp = torch.randint(6, 10, (rows, cols), generator=g) << 3
    mant = torch.randint(0, 8, (rows, cols), generator=g)
    data = (sign | exp | mant).to(torch.uint8).view(torch.float8_e4m3fn)
    scale = torch.pow(2.0, -torch.randint(0, 4, (-(-rows // 128), -(-cols // 128)), generator=g).float())
    return data, scale


def few_bits(n: int, d: int, seed: int) -> torch.Tensor:
    """fp32 [n, d] of multiples of 1/4 in [-1, 1]: bf16 numbers (a bf16 model's activations)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, (n, d), generator=g).float() / 4


def task(n: int, d: int, tok: list[int], down_t: bool, seed: int) -> fp8.FfnTask:
    g = torch.Generator().manual_seed(seed + 100)
    down = narrow_weight(n, d, seed + 2) if down_t else narrow_weight(d, n, seed + 2)
    weights = fp8.FfnWeights(narrow_weight(n, d, seed), narrow_weight(n, d, seed + 1), down, down_t)
    return fp8.FfnTask(weights, torch.tensor(tok, dtype=torch.int32), torch.rand(len(tok), generator=g) + 0.5)


def w64(m: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    data, scale = m
    rows, cols = data.shape
    return data.double() * scale.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]


def reference(x: torch.Tensor, tasks: list[fp8.FfnTask], act: str, bf16_h: bool) -> torch.Tensor:
    """float64 out [T, D]; gate and up exact, h = act(g) * u in fp32, rounded to bf16 where bf16_h."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for tk in tasks:
        w, tok = tk.weights, tk.tok.long()
        xt = x[tok].double()  # [N, D]
        g, u = (xt @ w64(m).T for m in (w.gate, w.up))  # [N, n], exact
        assert torch.equal(g, g.float().double()) and torch.equal(u, u.float().double())
        h = ACTS[act](g.float()) * u.float()  # [N, n] fp32
        h = (h.bfloat16() if bf16_h else h).double()
        y = h @ w64(w.down) if w.down_t else h @ w64(w.down).T  # [N, D]
        out.index_add_(0, tok, y * tk.weight.double()[:, None])
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.fixture(params=["gemm", "streamed"])
def gemm(request):
    """Both ways a prefill-sized task runs: the AVX512-BF16 GEMM where the CPU has it (else skipped), and with that
    path off (the fused kernel up to FFN_MAX_TOKENS, the matmuls above); the path is back on after."""
    lib = fp8.lib()
    on = request.param == "gemm"
    if on and not lib.tmp_fp8_bf16_path(1):
        pytest.skip("the CPU has no avx512bf16")
    lib.tmp_fp8_bf16_path(int(on))
    try:
        yield on
    finally:
        lib.tmp_fp8_bf16_path(1)


@pytest.mark.parametrize("act", sorted(ACTS))
def test_ffn_tasks_bf16_h(act: str, gemm: bool) -> None:
    """Tasks of 1 to 30 tokens (the fused kernel, the GEMM or the matmuls), checkpoint-layout and transposed downs,
    ragged n and D, sharing tokens: with bf16_h the rounded reference, without it the fp32 one (and neither the
    other: the rounding shows far above TOL)."""
    t, d = 40, 200
    x = few_bits(t, d, seed=1)
    g = torch.Generator().manual_seed(2)
    sizes = [(30, False), (9, False), (3, False), (1, False), (12, True), (2, True), (30, True)]
    tasks = [task(130 - 30 * (q % 2), d, torch.randperm(t, generator=g)[:k].tolist(), dt, q) for q, (k, dt) in
             enumerate(sizes)]  # fmt: skip
    for bf16_h in (True, False):
        out = torch.zeros(t, d)
        fp8.ffn_tasks(x, tasks, act, out, bf16_h=bf16_h)
        assert rel_err(out, reference(x, tasks, act, bf16_h)) < TOL, (
            bf16_h,
            rel_err(out, reference(x, tasks, act, bf16_h)),
        )
        assert rel_err(out, reference(x, tasks, act, not bf16_h)) > 100 * TOL


def test_ffn_routed_bf16_h(gemm: bool) -> None:
    """A routing whose experts get 1 to 48 tokens, with bf16_h: the rounded reference."""
    t, d, e, k = 48, 136, 5, 2
    g = torch.Generator().manual_seed(3)
    experts = [task(72, d, [0], False, 20 + i).weights for i in range(e)]
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])  # [T, K]
    ids[:, 0] = 0  # expert 0 gets every token
    weights = torch.rand(t, k, generator=g)
    x = few_bits(t, d, seed=4)
    out = torch.zeros(t, d)
    fp8.ffn_routed(x, fp8.portable.RoutedTable(experts), ids, weights, "silu", out, bf16_h=True)
    tasks = []
    for q in range(e):
        rows, slots = (ids == q).nonzero(as_tuple=True)
        tasks.append(fp8.FfnTask(experts[q], rows.int(), weights[rows, slots].contiguous()))
    assert rel_err(out, reference(x, tasks, "silu", True)) < TOL
