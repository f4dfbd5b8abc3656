"""FP8 vs bf16: the same synthetic model as published in FP8 (e4m3 + 128x128 block scales) and in bf16.

Each case runs in its own subprocess (peak RSS per run), and the rounds interleave every case (A B A B):
this machine's memory bandwidth drifts by tens of percent. Cases, for each of the two checkpoints:
- `resident` at each `--batches` size: prefill of `--prompt-len` tokens per sequence, then `--decode` greedy
  tokens; peak RSS; the weight bytes a batch-1 decode token reads, and the bound that puts on tok/s at the
  DRAM bandwidth measured right after the run;
- `tiered` (with `--budget-share`): a DRAM budget of that share of the bf16 checkpoint's bytes (the same GiB
  for both), the rest read from the tile store on disk, page cache dropped first (root), batch 1; disk bytes
  per token.
Every case sizes its KV cache to the run (`max_model_len` = prompt + decode tokens, as llama-bench sizes its
context to the test): the model's default 4096-token cache per sequence (512 MiB a sequence for OLMoE) is the
same bytes in both formats and would hide the weights' difference in the peak RSS.

    .venv/bin/python benchmarks/fp8.py --bf16 /work/ckpt/olmoe-1b-7b --fp8 /work/ckpt/olmoe-1b-7b-fp8
    .venv/bin/python benchmarks/fp8.py --bf16 B --fp8 F --rounds 2 --batches 1,4 --budget-share 0.35

The checkpoints are written by `tilemem synth ... --dtype bf16|fp8` with the same seed (the FP8 one is the
bf16 one's weights quantized per block); missing ones are not made here (tens of GB).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from decode import (  # noqa: E402
    bytes_per_token,
    dram_read_bandwidth,
    prompt_batch,
    stored_bytes_saved,
    warm_page_cache,
    warmup_batch,
)

from tilemem.bench.runner import drop_page_cache  # noqa: E402


def run_case(args: argparse.Namespace) -> dict:
    """One case in this process: build the engine, warm up, time prefill and decode."""
    from tilemem.engine.llm import LLM, peak_rss_bytes
    from tilemem.engine.sampling import SamplingParams

    path = Path(args.dir)
    kw = dict(dtype="bf16", threads=args.threads, max_batch=args.batch, max_model_len=args.prompt_len + args.decode)
    if args.case == "tiered":
        kw.update(budget=f"cpu={args.budget_bytes}B", policy="kt_expert", store=args.store)
        cold = drop_page_cache()
    else:
        warm_page_cache(path)
        cold = False
    t0 = time.perf_counter()
    llm = LLM(path, **kw)
    load_s = time.perf_counter() - t0
    vocab = llm.config.vocab_size
    llm.generate(warmup_batch(vocab, args.batch, args.prompt_len), SamplingParams(max_tokens=2, temperature=0))
    before = dict(llm.stats().runtime) if llm.tiered is not None else {}
    prompts = prompt_batch(vocab, args.batch, args.prompt_len)
    llm.generate(prompts, SamplingParams(max_tokens=args.decode, temperature=0, ignore_eos=True))
    s = llm.stats()
    disk = (s.runtime.get("disk_bytes", 0) - before.get("disk_bytes", 0)) if llm.tiered is not None else 0
    out = {
        "prefill_tok_s": s.prefill_tok_s,
        "decode_tok_s": s.decode_tok_s,
        "peak_rss": peak_rss_bytes(),
        "load_s": load_s,
        "cold": cold,
        "disk_bytes_per_token": disk / max(1, args.batch * args.decode),  # prefill's reads included
        # as stored: a bf16 model's x12 experts, attention and LM head (an FP8 model's bf16 LM head too) count 12 bits
        "bytes_per_token": bytes_per_token(path) - (stored_bytes_saved(llm) if args.case == "resident" else 0),
    }
    out["bw"] = dram_read_bandwidth(args.threads, gib=0.25, repeats=5)
    return out


def spawn(args: argparse.Namespace, name: str, path: str, case: str, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", case, "--dir", path, "--batch", str(batch)]
    cmd += ["--prompt-len", str(args.prompt_len), "--decode", str(args.decode), "--threads", str(args.threads)]
    if case == "tiered":
        cmd += ["--budget-bytes", str(args.budget_bytes), "--store", f"{path}.tiles128", "--prompt-len", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} {case} b{batch} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bf16", help="the bf16 checkpoint")
    ap.add_argument("--fp8", help="the same model's FP8 checkpoint")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-share", type=float, default=0.35, help="tiered DRAM budget, share of the bf16 bytes")
    ap.add_argument("--no-tiered", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--budget-bytes", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.case = args.worker
        print(json.dumps(run_case(args)))
        return
    if not (args.bf16 and args.fp8):
        ap.error("give --bf16 and --fp8 checkpoints (tilemem synth FAMILY --preset P --dtype bf16|fp8 --seed S)")
    from tilemem.runtime.tile_store import convert

    models = {"bf16": args.bf16, "fp8": args.fp8}
    bf16_bytes = sum(f.stat().st_size for f in Path(args.bf16).glob("*.safetensors"))
    args.budget_bytes = int(args.budget_share * bf16_bytes)
    cases = [(m, "resident", int(b)) for b in args.batches.split(",") for m in models]
    if not args.no_tiered:
        for path in models.values():  # conversion is not timed
            convert(path, f"{path}.tiles128", tile_size=128)
        cases += [(m, "tiered", 1) for m in models]
    runs: dict[tuple, list[dict]] = {c: [] for c in cases}
    for r in range(args.rounds):
        for c in cases:
            res = spawn(args, c[0], models[c[0]], c[1], c[2])
            runs[c].append(res)
            rss = res["peak_rss"] / 2**30
            print(f"round {r + 1} {c[0]} {c[1]} b{c[2]}: prefill {res['prefill_tok_s']:.2f} decode "
                  f"{res['decode_tok_s']:.3f} tok/s, peak RSS {rss:.2f} GiB", flush=True)  # fmt: skip
    med = {c: {k: statistics.median(x[k] for x in v) for k in v[0]} for c, v in runs.items()}
    print(f"\nbf16 checkpoint {bf16_bytes / 2**30:.2f} GiB; {args.threads} threads; {args.rounds} rounds; prompt "
          f"{args.prompt_len}, decode {args.decode}")  # fmt: skip
    print("| case | batch | bf16 prefill | fp8 prefill | ratio | bf16 decode | fp8 decode | ratio (per round) |")
    print("|---|---|---|---|---|---|---|---|")
    for _, case, b in [c for c in cases if c[0] == "bf16"]:
        a, f = (runs[(m, case, b)] for m in models)
        per_round = ", ".join(f"{y['decode_tok_s'] / x['decode_tok_s']:.2f}" for x, y in zip(a, f, strict=True))
        ma, mf = med[("bf16", case, b)], med[("fp8", case, b)]
        print(f"| {case} | {b} | {ma['prefill_tok_s']:.2f} | {mf['prefill_tok_s']:.2f} | "
              f"{mf['prefill_tok_s'] / ma['prefill_tok_s']:.2f} | {ma['decode_tok_s']:.3f} | {mf['decode_tok_s']:.3f} "
              f"| {mf['decode_tok_s'] / ma['decode_tok_s']:.2f} ({per_round}) |")  # fmt: skip
    print("\n| model | weight bytes / decode token | bound at measured DRAM bw | resident b1 decode | peak RSS | "
          "RSS / bf16 ckpt | tiered disk bytes / generated token (8-token prefill included) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for m in models:
        res = med[(m, "resident", int(args.batches.split(",")[0]))]
        tiered = med.get((m, "tiered", 1), {})
        bound = res["bw"] / res["bytes_per_token"]
        print(f"| {m} | {res['bytes_per_token'] / 2**20:.0f} MiB | {bound:.2f} tok/s | {res['decode_tok_s']:.3f} | "
              f"{res['peak_rss'] / 2**30:.2f} GiB | {res['peak_rss'] / bf16_bytes:.2f} | "
              f"{tiered.get('disk_bytes_per_token', 0) / 2**20:.0f} MiB |")  # fmt: skip
    if not args.no_tiered:
        print(f"tiered: DRAM budget {args.budget_bytes / 2**30:.2f} GiB ({args.budget_share:.0%} of the bf16 bytes), "
              f"page cache dropped: {runs[('bf16', 'tiered', 1)][0]['cold']}")  # fmt: skip


if __name__ == "__main__":
    main()
