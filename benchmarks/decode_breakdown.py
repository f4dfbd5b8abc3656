"""Where a decode token's time goes: per-token milliseconds inside the native kernels (attention
block, experts, other linears incl. the LM head) against whole modules and the whole forward pass.

Wraps the kernel entry points and module forwards with timers, decodes `--tokens` tokens at batch 1
after a prompt of `--prompt-len` (only forward passes of one new token are timed), twice, and prints
both passes (the memory bandwidth drifts).

    .venv/bin/python benchmarks/decode_breakdown.py [--dir checkpoints/olmoe-1b-7b] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

from decode import dram_read_bandwidth  # benchmarks/decode.py

from tilemem import kernels
from tilemem.engine.llm import LLM
from tilemem.engine.sampling import SamplingParams
from tilemem.layers.attention import Attention
from tilemem.layers.moe import MoEBlock
from tilemem.layers.norm import RMSNorm
from tilemem.layers.router import Router
from tilemem.models.model import MoECausalLM

TIMED = [
    (kernels, "attn_decode", "attention kernel"),
    (kernels, "moe", "expert kernel"),
    (kernels, "linear", "other linears (router, LM head)"),
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
    args = ap.parse_args()
    llm = LLM(args.dir, dtype="bf16", threads=args.threads, max_batch=1)
    spent: dict[str, float] = {}
    decoding = [False]  # inside a forward pass of one new token per row
    for owner, name, label in TIMED:
        fn = getattr(owner, name)

        def timed(*a, _fn=fn, _label=label, **kw):
            if _label == "whole forward":
                decoding[0] = a[1].shape[1] == 1  # input_ids [B, T]
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                if decoding[0]:
                    spent[_label] = spent.get(_label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, timed)
    prompt = list(range(100, 100 + args.prompt_len))
    llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    for run in range(2):
        spent.clear()
        llm.generate([prompt], SamplingParams(max_tokens=args.tokens + 1, temperature=0, ignore_eos=True))
        per = llm.stats().decode_tok_s
        print(f"pass {run}: decode {per:.2f} tok/s ({1e3 / per:.1f} ms per token); per decode token, ms:")
        for label, s in spent.items():
            print(f"  {label:34s} {1e3 * s / args.tokens:7.2f}")
        print(f"  read bandwidth right after: {dram_read_bandwidth(args.threads, gib=0.25, repeats=5) / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
