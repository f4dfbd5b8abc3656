"""ggml quant kernels (`kernels/ggml.py`): GB/s of the weights a matmul_nt reads, exact vs fast, at a few
token counts, next to torch's bf16 matmul on the same shape. Small and synthetic (random blocks); rounds
interleave every case (A B A B) as this machine's memory bandwidth drifts.

    .venv/bin/python benchmarks/ggml_kernels.py
    .venv/bin/python benchmarks/ggml_kernels.py --rows 4096 --cols 4096 --tokens 1,4,8 --rounds 7

Session 14, 2 threads of a Zen 1 EPYC (AVX2), W 2048 x 2048, GB/s of weights read (GMAC/s):
    N=1: bf16 torch 12.9 (6.4); q8_0 exact 11.0 (10.3), fast 20.2 (19.0); q4_k exact 4.0 (7.1), fast 11.4 (20.3);
         q6_k exact 4.6 (5.6), fast 13.9 (17.0)
    N=4: bf16 torch 3.3 (6.6); q8_0 exact 6.4 (24.1), fast 6.6 (24.7); q4_k exact 2.7 (19.4), fast 3.9 (27.8);
         q6_k exact 3.2 (15.5), fast 5.7 (27.6)
Past NT_MAX_TOKENS (prefill), exact is `tmg_matmul_dq` and fast on the K-quants `tmg_matmul_q8`; session 20, a
2-thread EPYC Zen 4 (another host), W 1024 x 2048, `--tokens 16,32,64,256 --types q4_k,q6_k`, GMAC/s exact ->
fast (median of 3 rounds, matmul_nt's Python overhead included): q4_k N=16 71 -> 116, N=32 87 -> 131, N=64 92 -> 167,
N=256 98 -> 172; q6_k N=16 63 -> 120, N=32 82 -> 142, N=64 90 -> 184, N=256 98 -> 202. Q8_0 (AVX512-VNNI there;
TILEMEM_GGML_AVX2=1 picks its AVX2 kernel), `--tokens 16,32,64,256 --types q8_0 --rounds 3`, --rows 1024 --cols
2048: N=16 85 -> 173, N=32 92 -> 217, N=64 98 -> 238, N=256 101 -> 248; --rows 2048 --cols 1024: N=16 86 -> 193,
N=32 98 -> 217, N=64 104 -> 254, N=256 103 -> 265.
Decode row kernels, AVX512-VNNI (ggml_quant_avx512.c) vs AVX2 (`--avx2`), same host, `--rows 16384 --cols 2048
--tokens 1,4 --types q4_k,q6_k,q8_0 --rounds 3 --threads 2 --repeat 10`, GMAC/s AVX2 -> AVX512: N=1 q4_k 64 -> 68,
q6_k 63 -> 69, q8_0 58 -> 57 (DRAM-bound: 34 MiB); N=4 q4_k 107 -> 125, q6_k 119 -> 143, q8_0 78 -> 96.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from tilemem.kernels import ggml


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random valid rows of `qtype` blocks: random quant bytes, finite fp16 scales."""
    rng = np.random.default_rng(seed)
    nb, bb = cols // ggml.BLOCK_WEIGHTS[qtype], ggml.BLOCK_BYTES[qtype]
    raw = rng.integers(0, 256, (rows, nb, bb), dtype=np.uint8)  # [R, blocks, bytes]
    scales = {"q6_k": [208], "q4_k": [0, 2], "q5_k": [0, 2], "q4_1": [0, 2], "q5_1": [0, 2]}.get(qtype, [0])
    for p in scales:
        raw[:, :, p : p + 2] = (rng.standard_normal((rows, nb, 1)) * 0.01).astype(np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(rows, nb * bb))


def seconds(fn: Callable[[], object], repeat: int) -> float:
    """Best-of-3 mean seconds of `repeat` calls."""
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best


def avx2(fn: Callable[[], object]) -> object:
    """fn with the AVX2 fast kernels (TILEMEM_GGML_AVX2=1: tmg_lookup reads it per call)."""
    os.environ["TILEMEM_GGML_AVX2"] = "1"
    try:
        return fn()
    finally:
        del os.environ["TILEMEM_GGML_AVX2"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--tokens", default="1,4")
    p.add_argument("--types", default="q8_0,q4_k,q6_k")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch (and kernel) threads; 0: torch's default")
    p.add_argument("--avx2", action="store_true", help="also the fast AVX2 kernels where AVX512 ones are chosen")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not ggml.available():
        raise SystemExit("the ggml kernels cannot run here (ggml.available() is False)")
    r, c = args.rows, args.cols
    tokens = [int(t) for t in args.tokens.split(",")]
    wb = torch.randn(r, c).bfloat16()  # [R, C]
    cases: dict[str, tuple[int, Callable[[], object]]] = {}
    for n in tokens:
        xb = torch.randn(n, c).bfloat16()  # [N, C]
        cases[f"bf16 torch N={n}"] = (wb.numel() * 2, lambda xb=xb: torch.nn.functional.linear(xb, wb))
        for qtype in args.types.split(","):
            data = random_blocks(qtype, r, c)
            x = torch.randn(n, c)  # [N, C]
            for exact in (True, False):
                name = f"{qtype} {'exact' if exact else 'fast'} N={n}"
                fn = lambda x=x, q=qtype, d=data, e=exact: ggml.matmul_nt(x, q, d, c, e)  # noqa: E731
                cases[name] = (data.numel(), fn)
                if args.avx2 and not exact:
                    cases[f"{qtype} avx2 N={n}"] = (data.numel(), lambda fn=fn: avx2(fn))
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (_, fn) in cases.items():
            times[name].append(seconds(fn, args.repeat))
    print(f"W [{r}, {c}], {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    print(f"{'case':<22} {'MiB':>7} {'us':>9} {'GB/s':>7} {'GMAC/s':>7}")
    for name, (nbytes, _) in cases.items():
        t = statistics.median(times[name])
        n = int(name.rsplit("=", 1)[1])
        print(f"{name:<22} {nbytes / 2**20:7.2f} {t * 1e6:9.1f} {nbytes / t / 1e9:7.2f} {n * r * c / t / 1e9:7.2f}")


if __name__ == "__main__":
    main()
