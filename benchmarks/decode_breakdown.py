"""Where a decode token's (or a prefill's) time goes: milliseconds inside the native kernels
(a decode step's decoder layers in one call, or the attention block and experts of layers that run
as modules, other linears incl. the LM head), torch's GEMMs and attention, against whole modules
and the whole forward pass.

Wraps the kernel entry points and module forwards with timers. Decode (the default): decodes
`--tokens` tokens at batch 1 after a prompt of `--prompt-len`, timing only forward passes of one new
token, and prints ms per token. `--prefill`: prefills `--batch` prompts of `--prompt-len` tokens,
timing only forward passes of prompt tokens, and prints ms per prefill. Two passes each (the memory
bandwidth and the machine's speed drift).

`--vs-modules`: decode steps alternate between the one-call native decoder layers and the modules
(`model.fused_decode` on and off, the same tokens), and the per-step time ratio is printed: steps
next to each other see the same machine, which drifts too much between runs to compare those.

    .venv/bin/python benchmarks/decode_breakdown.py [--dir checkpoints/olmoe-1b-7b] [--threads 2]
    .venv/bin/python benchmarks/decode_breakdown.py --prefill [--batch 1]
    .venv/bin/python benchmarks/decode_breakdown.py --vs-modules [--batch 1] [--tokens 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch.nn.functional as F
from decode import dram_read_bandwidth  # benchmarks/decode.py

from tilemem import kernels
from tilemem.engine.llm import LLM
from tilemem.engine.sampling import SamplingParams
from tilemem.kernels import bf16 as bf16_kernels
from tilemem.kernels import bf16_ffn, paged, paged_decode, portable_decode, x12_tiles
from tilemem.kernels import fp8 as fp8_kernels
from tilemem.kernels import ggml as ggml_kernels
from tilemem.layers.attention import Attention
from tilemem.layers.moe import MoEBlock
from tilemem.layers.norm import RMSNorm
from tilemem.layers.router import Router
from tilemem.models.model import MoECausalLM

TIMED = [
    (kernels, "decode_layers", "decoder layers kernel (all, one call)"),
    (portable_decode, "decode_layers", "portable decoder layers (all, one call)"),
    (kernels, "attn_decode", "attention kernel"),
    (kernels, "attn_prefill", "attention kernel (prefill)"),
    (kernels, "moe", "expert kernel"),
    (kernels, "linear", "other linears (router, LM head)"),
    (ggml_kernels, "ffn_routed", "portable GGUF expert kernel (routed)"),
    (ggml_kernels, "ffn_tasks", "portable GGUF FFN kernel (shared, dense)"),
    (ggml_kernels, "matmul_nt", "portable GGUF linears"),
    (fp8_kernels, "ffn_routed", "portable FP8 expert kernel (routed)"),
    (fp8_kernels, "ffn_tasks", "portable FP8 FFN kernel (shared, dense)"),
    (bf16_ffn, "ffn_routed", "portable bf16 expert kernel (routed)"),
    (bf16_ffn, "ffn_tasks", "portable bf16 FFN kernel (shared, dense)"),
    (fp8_kernels, "matmul_nt", "portable FP8 linears"),
    (x12_tiles, "ffn_tasks", "portable x12 expert kernel"),
    (bf16_kernels, "matmul_nt", "portable bf16 linears"),
    (paged, "paged_attention", "portable paged attention"),
    (paged_decode, "decode_block", "portable decode attention block"),
    (F, "linear", "torch linears (prefill q/k/v/o, router)"),
    (F, "scaled_dot_product_attention", "torch attention (prefill with a cached prefix)"),
    (Attention, "forward", "attention module"),
    (MoEBlock, "forward", "MoE block"),
    (Router, "forward", "router"),
    (RMSNorm, "forward", "RMSNorm modules"),
    (MoECausalLM, "forward", "whole forward"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="checkpoints/olmoe-1b-7b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--prefill", action="store_true", help="time prefills instead of decode steps")
    ap.add_argument("--batch", type=int, default=1, help="prompts per prefill (--prefill) or rows (--vs-modules)")
    ap.add_argument("--vs-modules", action="store_true", help="fused decode vs the modules, step by step")
    args = ap.parse_args()
    batch = args.batch if args.prefill or args.vs_modules else 1
    # --prefill: no prefix caching, else the timed passes reuse the warm-up's KV blocks and prefill a few tokens
    llm = LLM(args.dir, dtype="bf16", threads=args.threads, max_batch=batch, prefix_caching=not args.prefill)
    if args.vs_modules:
        vs_modules(llm, batch, args.prompt_len, args.tokens)
        return
    spent: dict[str, float] = {}
    timing = [False]  # inside a timed forward pass
    for owner, name, label in TIMED:
        fn = getattr(owner, name)

        def timed(*a, _fn=fn, _label=label, **kw):
            if _label == "whole forward":
                new_tokens = a[1].shape[1]  # input_ids [B, T]
                timing[0] = new_tokens > 1 if args.prefill else new_tokens == 1
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                if timing[0]:
                    spent[_label] = spent.get(_label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, timed)
    prompts = [list(range(100 + b, 100 + b + args.prompt_len)) for b in range(batch)]
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0))  # warm-up
    for run in range(2):
        spent.clear()
        if args.prefill:
            llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0))
            per, unit = 1, "prefill"
            rate = f"prefill {llm.stats().prefill_tok_s:.1f} tok/s ({batch} x {args.prompt_len} tokens)"
        else:
            llm.generate(prompts, SamplingParams(max_tokens=args.tokens + 1, temperature=0, ignore_eos=True))
            per, unit = args.tokens, "decode token"
            tok_s = llm.stats().decode_tok_s
            rate = f"decode {tok_s:.2f} tok/s ({1e3 / tok_s:.1f} ms per token)"
        print(f"pass {run}: {rate}; per {unit}, ms:")
        for label, s in spent.items():
            print(f"  {label:38s} {1e3 * s / per:9.2f}")
        print(f"  read bandwidth right after: {dram_read_bandwidth(args.threads, gib=0.25, repeats=5) / 1e9:.1f} GB/s")


def vs_modules(llm: LLM, batch: int, prompt_len: int, tokens: int) -> None:
    """Decode `tokens` steps of `batch` rows, alternating the fused native layers and the modules."""
    steps: dict[bool, list[float]] = {True: [], False: []}
    forward = MoECausalLM.forward

    def alternating(model, input_ids, *a, **kw):
        if input_ids.shape[1] != 1:
            return forward(model, input_ids, *a, **kw)
        fused = model.fused_decode = len(steps[True]) <= len(steps[False])
        t0 = time.perf_counter()
        try:
            return forward(model, input_ids, *a, **kw)
        finally:
            steps[fused].append(time.perf_counter() - t0)

    MoECausalLM.forward = alternating
    prompts = [list(range(100 + b, 100 + b + prompt_len)) for b in range(batch)]
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0))  # warm-up
    for s in steps.values():
        s.clear()
    llm.generate(prompts, SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True))
    ratios = [m / f for f, m in zip(steps[True], steps[False], strict=False)]  # adjacent steps; one may be left over
    for fused, s in steps.items():
        name = "one native call" if fused else "modules"
        print(f"{name:16s} median {1e3 * statistics.median(s):.1f} ms per step ({len(s)} steps, batch {batch})")
    q = statistics.quantiles(ratios, n=4)
    print(f"fused speed-up, per pair of adjacent steps: median {q[1]:.3f}x (quartiles {q[0]:.3f}-{q[2]:.3f})")


if __name__ == "__main__":
    main()
