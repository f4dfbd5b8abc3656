"""The FP8 rows of a bf16 model's decode, A/B in one process (not a test: prints G weights/s and ratios).

One MoE layer's worth of OLMoE-1B-7B experts (D = 2048, I = 1024; 48 experts, ~290 MB, so the weights come from
DRAM) run as fused FFN tasks of n tokens (`kernels.fp8.ffn_tasks`, h rounded to bf16 as a bf16 model runs it),
rounds alternating the two sides (A B A B: this machine's bandwidth drifts by tens of percent):
- `lut`: the byte-table e4m3 decode (AVX512-VBMI) against the integer decode (`tmp_fp8_lut_path`), bf16 x;
- `bf16x`: bf16-valued x (one VDPBF16PS per token and 32 weights) against the same x perturbed off bf16 (x times
  the block scales split into three bf16 parts), both with the default decode.
Prints the median over rounds of each side and the ratio with its spread over rounds.

    .venv/bin/python benchmarks/fp8_rows.py [--tokens 1,2,4] [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from fp8_kernels import D, I, quantize  # benchmarks/fp8_kernels.py

from tilemem.kernels import fp8

EXPERTS = 48


def timed(x: torch.Tensor, tasks: list, out: torch.Tensor) -> float:
    """G weights/s of one pass over every task."""
    out.zero_()
    t = time.perf_counter()
    fp8.ffn_tasks(x, tasks, "silu", out, bf16_h=True)
    return len(tasks) * 3 * I * D / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = fp8.lib()
    if lib is None or not lib.tmp_fp8_bf16_path(-1):
        raise SystemExit("needs the portable kernels' AVX512-BF16 path (a CPU with avx512bf16)")
    has_lut = bool(lib.tmp_fp8_lut_path(1))
    g = torch.Generator().manual_seed(0)
    experts = []
    for _ in range(EXPERTS):
        gate, up = (torch.randn(I, D, generator=g) * 0.02 for _ in range(2))
        experts.append(fp8.FfnWeights(quantize(gate), quantize(up), quantize(torch.randn(D, I, generator=g) * 0.02)))
    print(f"{EXPERTS} experts of D={D} I={I}, {args.threads} threads, {args.rounds} rounds; G weights/s (median)")
    for n in (int(t) for t in args.tokens.split(",")):
        tasks = [fp8.FfnTask(e, torch.arange(n, dtype=torch.int32), torch.full((n,), 0.125)) for e in experts]
        xb = torch.randn(n, D, generator=g).bfloat16().float()
        xf = xb + 1e-6 * torch.randn(n, D, generator=g)  # not bf16 numbers
        out = torch.zeros(n, D)
        cases = {"bf16x": ((xf, 1), (xb, 1))}
        if has_lut:
            cases["lut"] = ((xb, 0), (xb, 1))
        for name, sides in cases.items():
            runs: tuple[list[float], list[float]] = ([], [])
            for _ in range(args.rounds):
                for k, (x, lut) in enumerate(sides):
                    lib.tmp_fp8_lut_path(lut)
                    runs[k].append(timed(x, tasks, out))
            lib.tmp_fp8_lut_path(1)
            ratios = [b / a for a, b in zip(*runs, strict=True)]
            a, b = (statistics.median(r) for r in runs)
            spread = f"min {min(ratios):.2f}, max {max(ratios):.2f}"
            print(f"n={n} {name:6s}: {a:6.1f} -> {b:6.1f}, ratio median {statistics.median(ratios):.2f} ({spread})")


if __name__ == "__main__":
    main()
