"""This CPU's multiply-accumulate ceiling, and how much of it a prefill uses: the bound a prefill target meets.

A prefill of a few hundred tokens is compute-bound: every weight is multiplied by every token it serves. What a
CPU can do there is fixed by its vector units, whatever the kernel: this script times loops over a 2 KiB operand
buffer in L1 (no DRAM traffic, 8 independent accumulators) on `--threads` threads:
- fp32: `_mm256_fmadd_ps`, 8 multiply-adds an instruction (a prefill on dequantized weights, torch's GEMM);
- int8: `_mm256_maddubs_epi16` then `_mm256_madd_epi16` by 16-bit scales, 32 multiply-adds a pair (the integer
  dot products of a K-quant or Q8_0 block with 8-bit activations, as llama.cpp and TileMEM's fast path run them);
- int8, no scale multiply: `maddubs` then a 16-bit add (an upper bound: a kernel can add a few 16-bit sums that
  share a scale before applying it, as llama.cpp's repacked Q4_K GEMM does, but every scale is applied).
Then, given a model's shape and a prefill rate (`--pp TOK_S`, or measured with `--llamacpp DIR --gguf FILE`:
`llama-bench -p PROMPT -n 0`), it prints the multiply-adds a token takes, the rate that prefill reaches, the rate
a 1.5x faster prefill would need, and both as shares of the measured int8 and fp32 ceilings.

    .venv/bin/python benchmarks/cpu_peak.py --threads 2
    .venv/bin/python benchmarks/cpu_peak.py --config /work/ckpt/olmoe-1b-7b --llamacpp /work/llamacpp \\
        --gguf /work/gguf/olmoe-q4_k_m.gguf --prompt 256
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import tempfile
import time
from pathlib import Path

SPAN = 64
"""32-byte operand vectors a pass of the loops reads (`SPAN` in the C source)."""

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <omp.h>

#define CHAINS 8
#define SPAN 64 /* 32-byte vectors of operands per pass: 2 KiB, in L1 */
/* Each loop multiplies register weights by operands loaded from a small buffer in L1 (as a kernel streams its
 * activations or weights), into CHAINS independent accumulators, and returns a value that depends on them all,
 * so nothing is optimized away. */
double fp32_loop(int64_t iters, int nthreads, const float *buf) {
    double total = 0.0;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        __m256 acc[CHAINS], w[CHAINS];
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm256_setzero_ps(), w[c] = _mm256_set1_ps(1e-3f * (float)(c + 1));
        for (int64_t i = 0; i < iters; i++)
            for (int v = 0; v < SPAN; v += CHAINS) {
#pragma GCC unroll 8
                for (int c = 0; c < CHAINS; c++)
                    acc[c] = _mm256_fmadd_ps(_mm256_loadu_ps(buf + 8 * (v + c)), w[c], acc[c]);
            }
        float lanes[8];
        __m256 s = acc[0];
        for (int c = 1; c < CHAINS; c++) s = _mm256_add_ps(s, acc[c]);
        _mm256_storeu_ps(lanes, s);
        total += lanes[0];
    }
    return total;
}

double int8_loop(int64_t iters, int nthreads, int scaled, const int8_t *buf) {
    double total = 0.0;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        __m256i acc[CHAINS], q[CHAINS];
        const __m256i sc = _mm256_set1_epi16(2);
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm256_setzero_si256(), q[c] = _mm256_set1_epi8((char)(c + 1));
        for (int64_t i = 0; i < iters; i++)
            for (int v = 0; v < SPAN; v += CHAINS) {
#pragma GCC unroll 8
                for (int c = 0; c < CHAINS; c++) {
                    const __m256i p =
                        _mm256_maddubs_epi16(q[c], _mm256_loadu_si256((const __m256i *)(buf + 32 * (v + c))));
                    acc[c] = scaled ? _mm256_add_epi32(acc[c], _mm256_madd_epi16(p, sc)) : _mm256_add_epi16(acc[c], p);
                }
            }
        int32_t lanes[8];
        __m256i s = acc[0];
        for (int c = 1; c < CHAINS; c++) s = _mm256_add_epi32(s, acc[c]);
        _mm256_storeu_si256((__m256i *)lanes, s);
        total += lanes[0];
    }
    return total;
}
"""


def build(tmp: Path) -> ctypes.CDLL:
    """The loops compiled with the portable library's instruction sets (AVX2, FMA)."""
    src, lib = tmp / "peak.c", tmp / "peak.so"
    src.write_text(SOURCE)
    cmd = ["gcc", "-O2", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared", str(src), "-o", str(lib)]
    subprocess.run(cmd, check=True)
    out = ctypes.CDLL(str(lib))
    out.fp32_loop.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
    out.int8_loop.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    out.fp32_loop.restype = out.int8_loop.restype = ctypes.c_double
    return out


def rate(fn, macs_per_iter: int, threads: int, seconds: float = 0.5) -> float:
    """G multiply-adds per second of `fn(iters)` over `threads` threads: the best of 5 runs of ~`seconds` (a
    ceiling: whatever else runs on the machine only lowers a run)."""
    iters = 1 << 14
    while True:  # size a run to ~seconds
        t = time.perf_counter()
        fn(iters)
        if (dt := time.perf_counter() - t) > 0.1:
            break
        iters *= 4
    iters = int(iters * seconds / dt)
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        fn(iters)
        runs.append(iters * macs_per_iter * threads / (time.perf_counter() - t) / 1e9)
    return max(runs)


def macs_per_token(config: dict, prompt: int) -> float:
    """Multiply-adds one prefill token takes in a MoE model of this HF config: the attention projections, the
    routed (and shared) experts' three matrices, the scores and values over the causal context (prompt / 2 on
    average), the LM head once per prompt (llama-bench computes the last token's logits only)."""
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    hd = config.get("head_dim") or d // heads
    kv = config.get("num_key_value_heads", heads)
    inter = config.get("moe_intermediate_size") or config["intermediate_size"]
    top_k = config.get("num_experts_per_tok", 1)
    shared = config.get("n_shared_experts") or 0
    attn = d * heads * hd * 2 + d * kv * hd * 2 + 2 * heads * hd * prompt / 2
    ffn = 3 * d * inter * (top_k + shared)
    return layers * (attn + ffn) + d * config["vocab_size"] / prompt


def llama_pp(exe_dir: str, gguf: str, prompt: int, threads: int) -> float:
    """llama-bench's prefill tok/s on the file."""
    exe = Path(exe_dir) / "bin" / "llama-bench"
    cmd = [str(exe), "-m", gguf, "-t", str(threads), "-p", str(prompt), "-n", "0", "-r", "2", "-o", "json"]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return float(out[0]["avg_ts"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", help="a checkpoint directory (its config.json gives the model's shape)")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--pp", type=float, help="a prefill rate, tok/s, to compare with the ceilings")
    ap.add_argument("--llamacpp", help="llama.cpp build directory: measure --pp with llama-bench on --gguf")
    ap.add_argument("--gguf")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(tmp))
        n = args.threads
        buf = ctypes.create_string_buffer(SPAN * 32)  # operands: small values, no int16 overflow in 8 passes
        ctypes.memset(buf, 1, len(buf))
        fp32 = rate(lambda i: lib.fp32_loop(i, n, buf), SPAN * 8, n)
        int8 = rate(lambda i: lib.int8_loop(i, n, 1, buf), SPAN * 32, n)
        int8_unscaled = rate(lambda i: lib.int8_loop(i, n, 0, buf), SPAN * 32, n)
    print(f"{n} threads, loops over operands in L1, G multiply-adds/s (best of 5):")
    print(f"  fp32 FMA                          {fp32:8.1f}")
    print(f"  int8 maddubs + madd (K-quant dot) {int8:8.1f}")
    print(f"  int8 maddubs + add16 (no scales)  {int8_unscaled:8.1f}")
    if not args.config:
        return
    config = json.loads((Path(args.config) / "config.json").read_text())
    per_token = macs_per_token(config, args.prompt)
    print(f"model: {per_token / 1e9:.3f} G multiply-adds per prefill token ({args.prompt}-token prompt)")
    pp = args.pp
    if args.llamacpp:
        pp = llama_pp(args.llamacpp, args.gguf, args.prompt, n)
        print(f"llama-bench pp{args.prompt} on {args.gguf}: {pp:.2f} tok/s")
    if pp:
        for name, tok_s in (("this prefill", pp), ("1.5x of it", 1.5 * pp)):
            used = tok_s * per_token / 1e9
            shares = f"{used / fp32:4.0%} / {used / int8:4.0%} / {used / int8_unscaled:4.0%}"
            print(f"  {name:14s} {tok_s:7.2f} tok/s = {used:6.1f} G MAC/s: {shares} of the three ceilings above")


if __name__ == "__main__":
    main()
