"""FP8 vs bf16 fused expert kernels at decode sizes, interleaved in one process (not a test: prints ratios).

One MoE layer of OLMoE-1B-7B shape (D = 2048 hidden, I = 1024 per expert, E = 64 experts, top-8) in both
formats from the same random weights: fp8 e4m3 with 128x128 block scales (`kernels.fp8.ffn_tasks`) and bf16
(`kernels.bf16_ffn.ffn_tasks`), the entry points a decode step calls. Each step routes T tokens to 8 random
experts each (the same routings for both formats), and several layers' copies are cycled through so that the
weights come from DRAM (far beyond the last-level cache). Rounds alternate the two formats (A B A B): this
machine's bandwidth drifts by tens of percent. Prints, per T: weights/s and GB/s of each (median over rounds),
and the bf16 / fp8 step-time ratio (the fp8 speed-up) with its spread over rounds. Where the AVX512 library
runs (`kernels.available()`), its bf16 expert kernel too: a bf16 model's decode takes it there.

Then a decode token's weight kernels, the bound they put on the end-to-end speed-up: 16 layers of the four
2048 x 2048 attention projections (`matmul_nt` of each format) and the routed FFN, and the LM head (50304 x
2048), bf16 in both (an FP8 checkpoint keeps it: `synth.writer.FP8_SKIP`). Everything else a decode step does
(attention over the KV cache, norms, routing, sampling, Python) costs the same in both formats and only lowers
the end-to-end ratio below this one.

    .venv/bin/python benchmarks/fp8_kernels.py [--tokens 1,4] [--rounds 7] [--steps 24] [--threads 2]

With `--prefill 8,32,128,512`, prefill sizes instead, where the CPU has avx512bf16: the AVX512-BF16 GEMM
(`fp8.gemm_nt`, bf16-valued x) against the path it replaced (the streamed kernel up to NT_MAX_TOKENS tokens,
dequantized rows + torch's fp32 GEMM beyond) and torch's bf16 GEMM (`F.linear`, the bf16 model's prefill) on the
attention (2048 x 2048), gate/up (1024 x 2048) and down (2048 x 1024) shapes, GMAC/s; then one routed MoE layer
of that many tokens, fp8 `ffn_routed` (h rounded to bf16, as a bf16-mode model runs it) against the AVX512 library's
bf16 `kernels.moe` (the bf16 model's).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from tilemem import kernels
from tilemem.kernels import bf16, bf16_ffn, fp8, portable

D, I, E, K = 2048, 1024, 64, 8  # OLMoE-1B-7B: hidden, expert intermediate, experts, top-k
LAYERS, VOCAB = 16, 50304
BLOCK = 128


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w fp32 [R, C] -> (e4m3 [R, C], fp32 scale [R/128, C/128]): each block's largest |w| maps to 448."""
    r, c = w.shape
    blocks = w.reshape(r // BLOCK, BLOCK, c // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)) / 448.0  # [R/128, C/128]
    data = (blocks / scale[:, None, :, None]).reshape(r, c).to(torch.float8_e4m3fn)
    return data, scale.contiguous()


def make_layer(gen: torch.Generator) -> tuple[list, list]:
    """One layer's E experts as (fp8 FfnWeights, bf16 FfnWeights) lists, from the same random weights."""
    f8, b16 = [], []
    for _ in range(E):
        gate, up = (torch.randn(I, D, generator=gen) * 0.02 for _ in range(2))
        down = torch.randn(D, I, generator=gen) * 0.02
        f8.append(fp8.FfnWeights(quantize(gate), quantize(up), quantize(down)))
        b16.append(bf16_ffn.FfnWeights(gate.bfloat16(), up.bfloat16(), down.bfloat16()))
    return f8, b16


def tasks_of(mod, layer: list, ids: torch.Tensor) -> tuple[list, int]:
    """A step's tasks (one per distinct expert of ids [T, K]) and the number of distinct experts."""
    out = []
    experts = ids.unique().tolist()
    for e in experts:
        tok = (ids == e).any(dim=1).nonzero().flatten().to(torch.int32)
        out.append(mod.FfnTask(layer[e], tok, torch.full((tok.numel(),), 0.125)))
    return out, len(experts)


def run(mod, layers: list, steps: list, x: torch.Tensor) -> tuple[float, int]:
    """Seconds for every step (step i on layer i % len(layers)) and the weights they read."""
    out = torch.zeros_like(x)
    weights = 0
    t0 = time.perf_counter()
    for i, (tasks, n) in enumerate(steps):
        mod.ffn_tasks(x, tasks[i % len(layers)], "silu", out)
        weights += n * 3 * I * D
    return time.perf_counter() - t0, weights


def run_avx512(tables: list, ids: list, x: torch.Tensor, ws) -> tuple[float, int]:
    """`run` for the AVX512 library's bf16 expert kernel (`kernels.moe`), which a bf16 model's decode takes
    instead of the portable one where that library runs: seconds and weights read."""
    xb, weights = x.bfloat16(), 0
    w = torch.full((x.shape[0], K), 0.125)
    t0 = time.perf_counter()
    for i, r in enumerate(ids):
        kernels.moe(xb, w, r, tables[i % len(tables)], "silu", ws)
        weights += len(r.unique()) * 3 * I * D
    return time.perf_counter() - t0, weights


def make_attn(gen: torch.Generator, n: int) -> tuple[list, list]:
    """n sets of the four [D, D] attention projections as (fp8 (data, scale) lists, bf16 tensor lists)."""
    ws = [torch.randn(D, D, generator=gen) * 0.02 for _ in range(4 * n)]
    return [quantize(w) for w in ws], [w.bfloat16() for w in ws]


def token(fmt: str, x: torch.Tensor, attn: list, steps: list, head: torch.Tensor) -> float:
    """Seconds of one decode token's weight kernels in format fmt ("fp8" or "bf16"): LAYERS layers of the four
    attention projections and the routed FFN (layer l on copy l % copies), then the bf16 LM head."""
    out = torch.zeros_like(x)
    t0 = time.perf_counter()
    for layer in range(LAYERS):
        for k in range(4):
            w = attn[(4 * layer + k) % len(attn)]
            fp8.matmul_nt(x, *w) if fmt == "fp8" else bf16.matmul_nt(x, w)
        tasks, _ = steps[layer % len(steps)]
        (fp8 if fmt == "fp8" else bf16_ffn).ffn_tasks(x, tasks[layer % len(tasks)], "silu", out)
    bf16.matmul_nt(x, head)
    return time.perf_counter() - t0


def interleaved(cases: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each case (a callable) per round, the cases alternating within each round (after a warm-up)."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for f in cases.values():
        f()
    for _ in range(rounds):
        for k, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def matmul_before(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> None:
    """fp8.matmul_nt as it ran before the AVX512-BF16 GEMM (streamed, or dequantized rows + torch's fp32 GEMM)."""
    before, fp8.GEMM_MIN_TOKENS = fp8.GEMM_MIN_TOKENS, 1 << 62
    try:
        fp8.matmul_nt(x, data, scale)
    finally:
        fp8.GEMM_MIN_TOKENS = before


def speed(times: dict[str, list[float]], fast: str, base: str) -> str:
    """The base / fast time ratio per round: median (min, max)."""
    r = [b / f for f, b in zip(times[fast], times[base], strict=True)]
    return f"median {statistics.median(r):.2f} (min {min(r):.2f}, max {max(r):.2f})"


def prefill(tokens: list[int], rounds: int, gen: torch.Generator) -> None:
    """The `--prefill` cases: GMAC/s of each (median over rounds, cases interleaved) and the fp8 / bf16 speed ratio
    (bf16's time / fp8's) with its spread."""
    if not fp8.gemm_on():
        raise SystemExit("the AVX512-BF16 fp8 GEMM does not run here (no avx512bf16, or TILEMEM_FP8_BF16=0)")
    for r, c in ((D, D), (I, D), (D, I)):
        w = torch.randn(r, c, generator=gen) * 0.02
        data, scale = quantize(w)
        wb = w.bfloat16()
        for n in tokens:
            xb = torch.randn(n, c, generator=gen).bfloat16()
            x = xb.float()
            cases = {
                "fp8 gemm": partial(fp8.gemm_nt, x, data, scale),
                "fp8 before": partial(matmul_before, x, data, scale),
                "torch bf16": partial(torch.nn.functional.linear, xb, wb),
            }
            times = interleaved(cases, rounds)
            mac = n * r * c / 1e9
            rates = "  ".join(f"{k} {mac / statistics.median(v):6.1f}" for k, v in times.items())
            ratio = speed(times, "fp8 gemm", "torch bf16")
            print(f"{r}x{c} N={n:4d} GMAC/s: {rates};  fp8 gemm / torch bf16 speed {ratio}")
    f8, b16 = make_layer(gen)
    table = portable.RoutedTable(f8)
    experts = kernels.ExpertTable(*([getattr(w, name) for w in b16] for name in ("gate", "up", "down")))
    work = kernels.Workspace()
    for n in tokens:
        xb = torch.randn(n, D, generator=gen).bfloat16()
        x = xb.float()
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(n)])  # [T, K]
        wts = torch.rand(n, K, generator=gen)
        cases = {
            "fp8 ffn_routed": partial(fp8.ffn_routed, x, table, ids, wts, "silu", torch.zeros_like(x), True),
            "bf16 kernels.moe": partial(kernels.moe, xb, wts, ids, experts, "silu", work),
        }
        times = interleaved(cases, rounds)
        ms = "  ".join(f"{k} {statistics.median(v) * 1e3:6.1f} ms" for k, v in times.items())
        ratio = speed(times, "fp8 ffn_routed", "bf16 kernels.moe")
        print(f"MoE layer T={n:4d} top-{K} of {E}: {ms};  fp8 / bf16 speed {ratio}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,4", help="tokens per step, comma-separated")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=24, help="steps per round and format")
    ap.add_argument("--layers", type=int, default=2, help="layer copies cycled through (each 384 MB fp8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", default="", help="prefill token counts, comma-separated: the GEMM cases instead")
    args = ap.parse_args()
    if not (fp8.available() and bf16_ffn.available()):
        raise SystemExit("the portable fp8 / bf16 kernels are unavailable here (AVX2 + FMA + F16C and a C compiler)")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    if args.prefill:
        prefill([int(s) for s in args.prefill.split(",")], args.rounds, gen)
        return
    pairs = [make_layer(gen) for _ in range(args.layers)]
    f8_layers, b16_layers = [p[0] for p in pairs], [p[1] for p in pairs]
    avx512 = kernels.available()  # the AVX512 library, whose bf16 expert kernel a bf16 decode then takes
    tables = (
        [
            kernels.ExpertTable(*(list(ws) for ws in zip(*((w.gate, w.up, w.down) for w in lay), strict=True)))
            for lay in b16_layers
        ]
        if avx512
        else []
    )
    work = kernels.Workspace() if avx512 else None
    f8_attn, b16_attn = make_attn(gen, LAYERS)  # 256 MB fp8: from DRAM too
    head = (torch.randn(VOCAB, D, generator=gen) * 0.02).bfloat16()
    print(f"OLMoE expert shapes D={D} I={I} E={E} top-{K}, {args.layers} layers, {args.threads} threads")
    for t in (int(s) for s in args.tokens.split(",")):
        x = torch.randn(t, D, generator=gen)
        routes = [torch.randperm(E, generator=gen)[:K] for _ in range(args.steps * t)]
        ids = [torch.stack(routes[i * t : (i + 1) * t]) for i in range(args.steps)]  # [T, K] each
        # steps[i] = (tasks on every layer, distinct experts): the per-layer tasks picked in `run`
        f8_steps = [([tasks_of(fp8, lay, r)[0] for lay in f8_layers], tasks_of(fp8, f8_layers[0], r)[1]) for r in ids]
        b16_steps = [([tasks_of(bf16_ffn, lay, r)[0] for lay in b16_layers], f8_steps[i][1]) for i, r in enumerate(ids)]
        run(fp8, f8_layers, f8_steps, x), run(bf16_ffn, b16_layers, b16_steps, x)  # warm-up
        rates: dict[str, list[float]] = {"fp8": [], "bf16": [], "bf16 avx512": []}
        ratios, ratios512 = [], []
        for _ in range(args.rounds):
            sf, wf = run(fp8, f8_layers, f8_steps, x)
            sb, wb = run(bf16_ffn, b16_layers, b16_steps, x)
            rates["fp8"].append(wf / sf)
            rates["bf16"].append(wb / sb)
            ratios.append(sb / sf)
            if avx512:
                s5, w5 = run_avx512(tables, ids, x, work)
                rates["bf16 avx512"].append(w5 / s5)
                ratios512.append(s5 / sf)
        for name, nbytes in (("fp8", 1), ("bf16", 2), ("bf16 avx512", 2)):
            if rates[name]:
                r = statistics.median(rates[name])
                print(f"T={t} {name:11s} {r / 1e9:6.2f} G weights/s  {r * nbytes / 1e9:6.2f} GB/s  (median)")
        for name, rs in (("bf16", ratios), ("bf16 avx512", ratios512)):
            if rs:
                print(
                    f"T={t} fp8 speed-up over {name} (its time / fp8 time): median {statistics.median(rs):.3f}  "
                    f"min {min(rs):.3f}  max {max(rs):.3f}"
                )
        times: dict[str, list[float]] = {"fp8": [], "bf16": []}
        for _ in range(args.rounds):
            for name, attn, steps in (("fp8", f8_attn, f8_steps), ("bf16", b16_attn, b16_steps)):
                times[name].append(token(name, x, attn, steps, head))
        ratios = [b / f for f, b in zip(times["fp8"], times["bf16"], strict=True)]
        ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
        print(
            f"T={t} decode token's weight kernels: fp8 {ms['fp8']:.1f} ms, bf16 {ms['bf16']:.1f} ms; speed-up median "
            f"{statistics.median(ratios):.3f}  min {min(ratios):.3f}  max {max(ratios):.3f}"
        )


if __name__ == "__main__":
    main()
