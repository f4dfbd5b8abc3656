"""Speculative decoding benchmark on the `small` synthetic checkpoint, batch 1.

For each drafter (n-gram prompt lookup, a separate small draft checkpoint, MTP when the checkpoint
has it) and k = 1..4: mean accepted length, verify-step time vs plain-step time, and effective tok/s
vs plain decoding measured in the same run (plain runs interleaved with speculative ones).

    .venv/bin/python benchmarks/spec.py [--decode 96] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from tilemem.engine.llm import LLM
from tilemem.engine.sampling import SamplingParams
from tilemem.synth.writer import synthesize

PROMPTS = [
    "def fibonacci(n):\n    ",
    "The quick brown fox jumps over the lazy dog. The quick brown",
    "import os\nimport",
]


def ensure(path: Path, **kw) -> Path:
    if not (path / "config.json").exists():
        synthesize("olmoe", "small", path, seed=kw.pop("seed", 0), routing_skew=1.0, dtype="bf16", **kw)
    return path


def run(llm: LLM, decode: int) -> tuple[float, float, list[str]]:
    """Decode tok/s and mean decode-step seconds over the prompts."""
    params = SamplingParams(max_tokens=decode, temperature=0, ignore_eos=True)
    toks, secs, steps, outs = 0, 0.0, [], []
    for p in PROMPTS:
        out = llm.generate([p], params)[0]
        st = llm.stats()
        toks += st.decode_tokens
        secs += st.decode_tokens / st.decode_tok_s if st.decode_tok_s else 0.0
        steps += [s["seconds"] for s in st.steps if not s["prefill"]]
        outs.append(out.token_ids)
    return toks / secs, statistics.mean(steps), outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="checkpoints/demo-small")
    ap.add_argument("--draft-dir", default="checkpoints/draft-small")
    ap.add_argument("--decode", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = ensure(Path(args.dir))
    # A 2-layer, 8-expert model with the same tokenizer (same vocab, deterministic BPE training).
    draft = ensure(Path(args.draft_dir), seed=1, overrides={"num_hidden_layers": 2, "num_experts": 8})
    plain_llm = LLM(target, threads=args.threads, max_batch=1)
    drafters = ["ngram", f"draft:{draft}"]
    if getattr(plain_llm.model, "mtp", None) is not None:
        drafters.append("mtp")
    rows = []
    plain_runs = []
    for spec in drafters:
        for k in range(1, 5):
            res = []
            for _ in range(args.rounds):  # interleave plain and speculative runs
                plain = run(plain_llm, args.decode)
                plain_runs.append(plain)
                llm = LLM(target, threads=args.threads, max_batch=1, speculative=spec, num_draft=k)
                sp = run(llm, args.decode)
                assert sp[2] == plain[2], "speculative greedy output differs from plain decoding"
                res.append((plain, sp, statistics.mean(llm.speculator.stats.accepted)))
                llm.close()
            plain_tps = statistics.median(r[0][0] for r in res)
            plain_step = statistics.median(r[0][1] for r in res)
            spec_tps = statistics.median(r[1][0] for r in res)
            verify_step = statistics.median(r[1][1] for r in res)
            acc = statistics.median(r[2] for r in res)
            rows.append((spec.split(":")[0], k, acc, verify_step / plain_step, spec_tps, plain_tps))
            ratio = verify_step / plain_step
            name = spec.split(":")[0]
            print(f"{name} k={k}: accepted {acc:.2f}, verify/plain {ratio:.2f}x, {spec_tps:.1f} vs {plain_tps:.1f}")
    print(
        f"\nsmall synthetic OLMoE, batch 1, {args.threads} threads, {args.decode} tokens x {len(PROMPTS)} prompts, "
        f"{args.rounds} rounds; greedy outputs identical to plain decoding in every run\n"
    )
    print("| drafter | k | mean accepted length | verify step / plain step | spec tok/s | plain tok/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, k, acc, ratio, s, p in rows:
        flag = " (target >= 1.8x)" if acc >= 2.5 else ""
        print(f"| {name} | {k} | {acc:.2f} | {ratio:.2f}x | {s:.1f} | {p:.1f} | {s / p:.2f}x{flag} |")


if __name__ == "__main__":
    main()
