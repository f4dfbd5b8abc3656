"""Native kernels vs torch on OLMoE-1B-7B shapes, interleaved in one process.

For each shape, alternates the torch path and the native kernel over rounds (cold weights: a working
set of several layers, far beyond the last-level cache) and prints GB/s of weights read, GFLOP/s and
the ratio kernel / torch; a plain 2-thread reduction gives the machine's read bandwidth at the time.
Where the CPU has AMX, the expert kernel at prefill sizes with its GEMMs on AVX512-BF16 (in the
torch column) vs on AMX tiles. The "x12" rows: the kernel on bf16 weights (in the torch column) vs on
the same weights stored as x12 (GB/s of bf16-equivalent bytes in both). Then a decode step's attention
block over 16 layers (torch modules vs the fused call) and a prefill's causal attention over 16 layers
(SDPA vs the native kernel).

    .venv/bin/python benchmarks/kernels.py [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tilemem import kernels

D, I, E, K = 2048, 1024, 64, 8  # OLMoE-1B-7B: hidden, expert intermediate, experts, top-k


def torch_moe(x, w, ids, weights) -> torch.Tensor:
    gate, up, down = weights
    out = torch.zeros(x.shape[0], D)
    for e in ids.unique().tolist():
        t, s = (ids == e).nonzero(as_tuple=True)
        xs = x[t]
        y = F.linear(F.silu(F.linear(xs, gate[e])) * F.linear(xs, up[e]), down[e])
        out.index_add_(0, t, (y * w[t, s, None]).float())
    return out


def attention_case(mk, positions: int, layers: int = 16) -> tuple:
    """One decode step through 16 OLMoE attention layers (q/k norm over all heads, 16 heads of 128,
    `positions` cached): the torch module path vs the fused native call."""
    from tilemem.config import ModelConfig
    from tilemem.layers.attention import Attention
    from tilemem.layers.kv_cache import ForwardContext, KVCache
    from tilemem.layers.rope import RotaryEmbedding

    cfg = ModelConfig(
        family="olmoe", architecture="OlmoeForCausalLM", vocab_size=8, hidden_size=D, num_layers=layers,
        num_heads=16, num_kv_heads=16, head_dim=128, intermediate_size=I, moe_intermediate_size=I, num_experts=E,
        top_k=K, qk_norm="full",
    )  # fmt: skip
    mods = []
    for i in range(layers):
        a = Attention(cfg, i)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(a, name).weight = torch.nn.Parameter(mk(D, D), requires_grad=False)
        for name in ("q_norm", "k_norm"):
            getattr(a, name).weight = torch.nn.Parameter(torch.ones(D, dtype=torch.bfloat16), requires_grad=False)
        mods.append(a)
    rope = RotaryEmbedding(cfg.rope, 128, positions + 1)
    cache = KVCache.allocate(layers, 1, positions + 1, 16, 128, 128, torch.bfloat16)
    ctx = ForwardContext.build(cache, [0], [positions], [1])
    x = torch.randn(1, 1, D).to(torch.bfloat16)
    cos, sin = rope.table(ctx.positions, x.dtype)
    native = Attention.native

    def run(on: bool) -> None:
        Attention.native = native if on else (lambda self: None)
        try:
            for a in mods:
                a(x, ctx, rope, cos, sin)
        finally:
            Attention.native = native

    return (f"attn {layers}L", lambda: run(False), lambda: run(True), layers, 4 * D * D * 2, 2 * 4 * D * D)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=3, help="working set: this many layers of experts")
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit("native kernels unavailable here (needs AVX512-BF16 and gcc)")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    mk = lambda *s: (torch.randn(*s) * 0.02).to(torch.bfloat16)  # noqa: E731
    layers = [  # per layer: gate [I, D], up [I, D], down [D, I] of every expert
        ([mk(I, D) for _ in range(E)], [mk(I, D) for _ in range(E)], [mk(D, I) for _ in range(E)])
        for _ in range(args.layers)
    ]
    tables = [kernels.ExpertTable(*ws) for ws in layers]
    x12_tables = [kernels.ExpertTable(*ws, compress=True) for ws in layers]  # the same weights, 12 bits each
    ws = kernels.Workspace()
    dense = [mk(D, D) for _ in range(64)]  # 512 MiB of attention-sized matrices
    big = torch.ones(2**28)  # 1 GiB fp32 for the read-bandwidth reference
    cases = []
    for t in (1, 4, 256):
        x = torch.randn(t, D).to(torch.bfloat16)
        w = torch.rand(t, K)
        ids = torch.stack([torch.randperm(E)[:K] for _ in range(t)])
        nbytes = len(ids.unique()) * 3 * I * D * 2
        flops = 2 * t * K * 3 * I * D
        reps = 2 if t > 16 else 12

        def run_t(x=x, w=w, ids=ids, reps=reps):
            for r in range(reps):
                torch_moe(x, w, ids, layers[r % len(layers)])

        def run_k(x=x, w=w, ids=ids, reps=reps):
            for r in range(reps):
                kernels.moe(x, w, ids, tables[r % len(tables)], "silu", ws)

        cases.append((f"moe T={t}", run_t, run_k, reps, nbytes, flops))
    if kernels.amx_supported():  # the prefill GEMMs on AVX512-BF16 ("torch" column) vs AMX tiles
        for t in (256, 1024):
            x = torch.randn(t, D).to(torch.bfloat16)
            w = torch.rand(t, K)
            ids = torch.stack([torch.randperm(E)[:K] for _ in range(t)])

            def run_on(amx, x=x, w=w, ids=ids):
                kernels.set_amx(amx)
                for r in range(2):
                    kernels.moe(x, w, ids, tables[r % len(tables)], "silu", ws)
                kernels.set_amx(True)

            nbytes, flops = len(ids.unique()) * 3 * I * D * 2, 2 * t * K * 3 * I * D
            cases.append((f"moe T={t} amx", lambda f=run_on: f(False), lambda f=run_on: f(True), 2, nbytes, flops))
    for t in (1, 4, 256):  # the bf16 kernel ("torch" column) vs the same kernel on x12 weights; bf16 bytes
        x = torch.randn(t, D).to(torch.bfloat16)
        w = torch.rand(t, K)
        ids = torch.stack([torch.randperm(E)[:K] for _ in range(t)])
        reps = 2 if t > 16 else 12

        def run_x12(packed, x=x, w=w, ids=ids, reps=reps):
            for r in range(reps):
                kernels.moe(x, w, ids, (x12_tables if packed else tables)[r % len(tables)], "silu", ws)

        nbytes, flops = len(ids.unique()) * 3 * I * D * 2, 2 * t * K * 3 * I * D
        cases.append((f"moe T={t} x12", lambda f=run_x12: f(False), lambda f=run_x12: f(True), reps, nbytes, flops))
    dense_x12 = [kernels.X12Matrix(wd) for wd in dense]
    for m in (1, 4):
        x = torch.randn(m, D).to(torch.bfloat16)
        cases.append(
            (
                f"linear M={m} x12",
                lambda x=x: [kernels.linear(x, wd) for wd in dense],
                lambda x=x: [kernels.linear(x, wd, c) for wd, c in zip(dense, dense_x12, strict=True)],
                len(dense),
                D * D * 2,
                2 * m * D * D,
            )
        )
    for m in (1, 4):
        x = torch.randn(m, D).to(torch.bfloat16)
        cases.append(
            (
                f"linear M={m}",
                lambda x=x: [F.linear(x, wd) for wd in dense],
                lambda x=x: [kernels.linear(x, wd) for wd in dense],
                len(dense),
                D * D * 2,
                2 * m * D * D,
            )
        )
    cases.append(attention_case(mk, positions=300))
    for b in (1, 4):  # a prefill's causal attention, 256 tokens per prompt, 16 heads of 128
        q, k, v = (torch.randn(b, 16, 256, 128).to(torch.bfloat16) for _ in range(3))
        cases.append(
            (
                f"prefill attn B={b}",
                lambda q=q, k=k, v=v: [F.scaled_dot_product_attention(q, k, v, is_causal=True) for _ in range(16)],
                lambda q=q, k=k, v=v: [kernels.attn_prefill(q, k, v, 128**-0.5) for _ in range(16)],
                16,
                3 * q.numel() * 2,
                2 * 2 * b * 16 * 128 * 256 * 257 / 2,  # q.k and p.v over the causal half
            )
        )
    times = {(name, p): [] for name, *_ in cases for p in ("torch", "kernel")}
    bws = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        big.sum()
        bws.append(big.numel() * 4 / (time.perf_counter() - t0))
        for name, run_t, run_k, *_ in cases:
            for path, fn in (("torch", run_t), ("kernel", run_k)):
                t0 = time.perf_counter()
                fn()
                times[(name, path)].append(time.perf_counter() - t0)
    print(f"read bandwidth (2-thread fp32 sum, median): {statistics.median(bws) / 1e9:.1f} GB/s")
    print(f"{'case':17s} {'torch GB/s':>10s} {'kernel GB/s':>11s} {'torch GFLOP/s':>13s} {'kernel GFLOP/s':>14s} ratio")
    for name, _, _, reps, nbytes, flops in cases:
        tt = statistics.median(times[(name, "torch")]) / reps
        tk = statistics.median(times[(name, "kernel")]) / reps
        print(
            f"{name:17s} {nbytes / tt / 1e9:10.1f} {nbytes / tk / 1e9:11.1f} {flops / tt / 1e9:13.0f} "
            f"{flops / tk / 1e9:14.0f} {tt / tk:5.2f}x"
        )


if __name__ == "__main__":
    main()
