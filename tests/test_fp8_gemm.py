"""The AVX512-BF16 fp8 GEMM (`csrc_portable/fp8_gemm.c`: `kernels.fp8.gemm_nt`, prefill-sized FFN tasks) against
float64 references; skipped where the CPU has no avx512bf16 (the portable library still builds and runs there)."""

from __future__ import annotations

import pytest
import torch
from test_fp8_kernels import TORCH_ACTS as ACTS
from test_fp8_kernels import ffn_task

from tilemem.kernels import fp8

pytestmark = pytest.mark.skipif(
    not (fp8.available() and fp8.gemm_on()),
    reason="the AVX512-BF16 fp8 GEMM needs a CPU with avx512bf16 (and TILEMEM_FP8_BF16 != 0)",
)

TOL = 1e-5  # max abs error / max abs reference: exact products, fp32 sums in another order
SHAPES = [(1, 33, 3), (9, 129, 257), (37, 300, 130), (8, 64, 2048), (70, 160, 385)]  # [N, R, C]: tails everywhere


def random_weight(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 bytes over every byte but NaN (subnormals, -0 and +-448 included) and a distinct random scale
    per 128x128 block (so a block's sums scaled by another block's scale are far off)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 254, (rows, cols), generator=g, dtype=torch.int32)
    data = (b + (b >= 0x7F).int()).to(torch.uint8).view(torch.float8_e4m3fn)  # 0..253 -> 0x00..0xFE without 0x7F
    scale = torch.rand(-(-rows // 128), -(-cols // 128), generator=g) * 2 + 0.01
    return data, scale


def reference64(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W as float64 [R, C]: e4m3 values (exact) times their block's scale."""
    rows, cols = data.shape
    return data.double() * scale.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]


def bf16_values(n: int, c: int, seed: int) -> torch.Tensor:
    """fp32 [n, c] whose values are bf16 numbers (a bf16 model's activations), magnitudes spread."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g) * torch.rand(n, c, generator=g).pow(4)).bfloat16().float()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.fixture
def threads():
    """Runs the test body at 1 and 2 threads (`threads(k)` sets k); restores the count."""
    before = torch.get_num_threads()
    try:
        yield torch.set_num_threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("n,r,c", SHAPES)
def test_gemm_nt_matches_float64(n: int, r: int, c: int, threads) -> None:
    """bf16-valued x (VDPBF16PS) and fp32 x (fp32 FMAs) against a float64 reference; 1 and 2 threads give the same sums
    (each panel's are computed alike), bit for bit."""
    data, scale = random_weight(r, c, seed=n + r + c)
    w = reference64(data, scale)
    for x in (bf16_values(n, c, seed=c), torch.randn(n, c, generator=torch.Generator().manual_seed(r))):
        want = x.double() @ w.T
        got = []
        for k in (1, 2):
            threads(k)
            y = fp8.gemm_nt(x, data, scale, fp32_x=True)
            assert y is not None and y.shape == (n, r)
            assert rel_err(y, want) < TOL, f"{n}x{r}x{c}, {k} threads: {rel_err(y, want):.2e}"
            got.append(y)
        assert torch.equal(got[0], got[1])


def test_gemm_nt_wrong_block_scale_is_caught() -> None:
    """The mutation the reference would catch: the same sums with a neighbouring block's scale (rows or columns
    shifted by one block) are far outside TOL, so a kernel that took the wrong scale would fail above."""
    data, scale = random_weight(300, 385, seed=5)
    x = bf16_values(16, 385, seed=6)
    got = fp8.gemm_nt(x, data, scale)
    assert rel_err(got, x.double() @ reference64(data, scale).T) < TOL
    for wrong in (scale.roll(1, dims=1), scale.roll(1, dims=0)):
        assert rel_err(got, x.double() @ reference64(data, wrong).T) > 1e-2


def test_gemm_nt_fp32_x_and_path_switch() -> None:
    """x that is not all bf16 numbers is refused without fp32_x (None: the caller's path); so is everything with
    the AVX512-BF16 path off (tmp_fp8_bf16_path(0)); a denormal counts as not bf16 (VDPBF16PS reads it as 0)."""
    data, scale = random_weight(64, 256, seed=7)
    x = bf16_values(12, 256, seed=8)
    assert fp8.gemm_nt(x, data, scale) is not None
    off = x.clone()
    off[3, 100] += off[3, 100].abs() * 2**-12  # one value with low mantissa bits
    assert fp8.gemm_nt(off, data, scale) is None
    tiny = x.clone()
    tiny[0, 0] = 2.0**-130  # a denormal whose low 16 bits are zero
    assert fp8.gemm_nt(tiny, data, scale) is None
    assert fp8.gemm_nt(tiny, data, scale, fp32_x=True) is not None
    try:
        assert fp8.lib().tmp_fp8_bf16_path(0) == 0
        assert fp8.gemm_nt(x, data, scale, fp32_x=True) is None
        assert not fp8.gemm_on()
    finally:
        fp8.lib().tmp_fp8_bf16_path(1)


def test_matmul_nt_dispatch(monkeypatch) -> None:
    """matmul_nt hands GEMM_MIN_TOKENS or more tokens to gemm_nt, fp32 x too (fp32_x); fewer stream; every result
    within TOL."""
    calls: list[tuple[int, int, bool]] = []
    real = fp8.gemm_nt

    def spy(x, data, scale, fp32_x=False):
        y = real(x, data, scale, fp32_x)
        calls.append((x.shape[0], fp32_x, y is not None))
        return y

    monkeypatch.setattr(fp8, "gemm_nt", spy)
    data, scale = random_weight(200, 300, seed=9)
    w = reference64(data, scale)
    big = fp8.NT_MAX_TOKENS + 6
    few = fp8.GEMM_MIN_TOKENS
    cases = [(few - 1, True, []), (few, True, [(few, True, True)])]
    cases += [(40, False, [(40, True, True)]), (big, True, [(big, True, True)]), (big, False, [(big, True, True)])]
    for n, exact, want_calls in cases:
        calls.clear()
        x = bf16_values(n, 300, seed=n) if exact else torch.randn(n, 300)
        y = fp8.matmul_nt(x, data, scale)
        assert calls == want_calls, (n, exact)
        assert rel_err(y, x.double() @ w.T) < TOL


# ---- prefill-sized FFN tasks ----


def ffn_reference64(x: torch.Tensor, tasks: list[fp8.FfnTask], act: str) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float64)
    for task in tasks:
        w = task.weights
        gate, up, down = (reference64(*m) for m in (w.gate, w.up, w.down))
        xt = x[task.tok.long()].double()  # [N, D]
        h = ACTS[act](xt @ gate.T) * (xt @ up.T)  # [N, n]
        y = h @ down if w.down_t else h @ down.T  # [N, D]
        out.index_add_(0, task.tok.long(), y * task.weight.double()[:, None])
    return out


@pytest.mark.parametrize("act", sorted(ACTS))
def test_ffn_tasks_by_gemm(act: str, threads, monkeypatch) -> None:
    """Tasks of FFN_GEMM_MIN_TOKENS or more tokens (the GEMM; a transposed down still by matmuls) beside a small one
    (the fused kernel), sharing tokens, ragged n and D, against float64; 1 and 2 threads; the GEMM ran."""
    ran: list[int] = []
    real = fp8.portable.run_tasks

    def spy(fn, x, packed, n, *args) -> None:
        if fn.__name__ == "tmp_fp8_ffn_gemm":
            ran.append(n)
        real(fn, x, packed, n, *args)

    monkeypatch.setattr(fp8.portable, "run_tasks", spy)
    t, d = 40, 200
    x = bf16_values(t, d, seed=11)
    g = torch.Generator().manual_seed(12)
    toks = [torch.randperm(t, generator=g)[:k].tolist() for k in (30, 9, 3, 12)]
    tasks = [
        ffn_task(130, d, toks[0], False, 1),
        ffn_task(64, d, toks[1], False, 2),
        ffn_task(96, d, toks[2], False, 3),
        ffn_task(130, d, toks[3], True, 4),
    ]
    want = ffn_reference64(x, tasks, act)
    got = []
    for k in (1, 2):
        threads(k)
        out = torch.zeros(t, d)
        fp8.ffn_tasks(x, tasks, act, out)
        assert rel_err(out, want) < TOL, f"{act}, {k} threads: {rel_err(out, want):.2e}"
        got.append(out)
    assert torch.equal(got[0], got[1])
    assert ran == [2, 2]  # the two checkpoint-layout tasks of 9 tokens or more, in one call a run


def test_ffn_routed_by_gemm() -> None:
    """A routing whose experts get 1 to 40 tokens (both kernels) against float64, and x that is not all bf16
    numbers (fp32 FMAs) too."""
    t, d, e, k = 48, 136, 6, 3
    g = torch.Generator().manual_seed(13)
    experts = [ffn_task(72, d, [0], False, 20 + i).weights for i in range(e)]
    table = fp8.portable.RoutedTable(experts)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])  # [T, K]
    ids[:, 0] = 0  # expert 0 gets every token
    weights = torch.rand(t, k, generator=g)
    for x in (bf16_values(t, d, seed=14), torch.randn(t, d, generator=g)):
        out = torch.zeros(t, d)
        fp8.ffn_routed(x, table, ids, weights, "silu", out)
        tasks = []
        for q in range(e):
            rows, slots = (ids == q).nonzero(as_tuple=True)
            tasks.append(fp8.FfnTask(experts[q], rows.int(), weights[rows, slots].contiguous()))
        assert rel_err(out, ffn_reference64(x, tasks, "silu")) < TOL
