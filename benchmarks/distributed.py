"""Expert parallelism vs one process: the same DRAM budget per process, the rest of the experts on cold disk.

- A (baseline, what a user runs on one machine today): one process x `--threads` threads, `--budget` =
  `--budget-share` of the model's bytes in DRAM (`cpu=...`), the other tiles streamed from the tile store with
  O_DIRECT (page cache dropped first: cold).
- B: `--world-size` ranks x 1 thread each on this machine (`LLM(world_size=N)`: rank 0 starts the others), each
  rank with the same DRAM budget as A: together they hold every expert, so nothing is read from disk.

Each case runs in its own process, rounds interleaved (A B A B: this machine's memory bandwidth drifts); per case a
warm-up, then a `--prompt`-token prompt and `--decode` greedy tokens at batch 1 and at batch 4. B also reports rank
0's all-reduce time per decoded token and its share of the decode step (the all-reduce includes waiting for the
slower rank: per-layer imbalance shows up there).

    .venv/bin/python benchmarks/distributed.py --model /work/ckpt/olmoe-1b-7b-fp8 --rounds 2

The model: `tilemem synth olmoe --preset olmoe-1b-7b --routing-skew 1 --dtype fp8 --out CKPT` (or bf16); the tile
store is built once beside it (`tilemem convert`) before the first round.
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
from decode import prompt_batch, warmup_batch  # noqa: E402


def drop_page_cache() -> bool:
    """Drop the page cache (root only); False where this process may not."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_case(args: argparse.Namespace) -> dict:
    """One case (A or B) in this process: decode tok/s at each batch, all-reduce time per token (B)."""
    from tilemem.engine.llm import LLM
    from tilemem.engine.sampling import SamplingParams

    world = args.world_size
    kw = {"world_size": world, "rank_split": args.rank_split} if world > 1 else {}
    threads = 1 if world > 1 else args.threads
    t0 = time.perf_counter()
    llm = LLM(args.model, threads=threads, budget=args.budget, max_batch=max(args.batches), **kw)
    out = {"load_s": time.perf_counter() - t0}
    vocab = llm.config.vocab_size
    ranks = llm.parts.ranks
    for batch in args.batches:
        llm.generate(warmup_batch(vocab, batch, args.prompt), SamplingParams(max_tokens=2, temperature=0))
        before = (ranks.stats.seconds, ranks.stats.calls) if ranks is not None else (0.0, 0)
        params = SamplingParams(max_tokens=args.decode, temperature=0, ignore_eos=True)
        llm.generate(prompt_batch(vocab, batch, args.prompt), params)
        s = llm.stats()
        row = {"decode_tok_s": s.decode_tok_s, "disk_MiB": (s.runtime or {}).get("disk_bytes", 0) / 2**20}
        if ranks is not None:
            decode_steps = [st for st in s.steps if not st["prefill"]]
            step_s = sum(st["seconds"] for st in decode_steps)
            # the all-reduces of the decode steps: the share of the calls made after the prompt's (prefill) pass
            reduce_s = ranks.stats.seconds - before[0]
            prefill_calls = len(llm.model.moe_blocks()) * sum(1 for st in s.steps if st["prefill"])
            calls = ranks.stats.calls - before[1]
            decode_reduce_s = reduce_s * (calls - prefill_calls) / calls if calls else 0.0
            tokens = s.decode_tokens
            row["allreduce_ms_per_token"] = 1e3 * decode_reduce_s / max(1, len(decode_steps))
            row["allreduce_share"] = decode_reduce_s / step_s if step_s else 0.0
            row["tokens"] = tokens
        out[f"b{batch}"] = row
    llm.close()
    return out


def case(args: argparse.Namespace, world: int) -> dict:
    drop_page_cache()
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--budget", args.budget]
    cmd += ["--world-size", str(world), "--threads", str(args.threads), "--prompt", str(args.prompt)]
    cmd += ["--decode", str(args.decode), "--rank-split", args.rank_split]
    cmd += ["--batches", ",".join(map(str, args.batches))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"world size {world} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/work/ckpt/olmoe-1b-7b-fp8")
    p.add_argument("--budget-share", type=float, default=0.55, help="DRAM budget per process, share of the model")
    p.add_argument("--budget", default=None, help="(set from --budget-share)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads of the one-process baseline")
    p.add_argument("--rank-split", default="tile", choices=("expert", "tile", "even"))
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batches = [int(b) for b in str(args.batches).split(",")]
    if args.worker:
        print(json.dumps(run_case(args)))
        return
    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.runtime.setup import default_store_dir, default_tile
    from tilemem.runtime.tile_store import convert

    ckpt = Checkpoint.open(args.model)
    model_bytes = ckpt.nbytes()
    args.budget = f"cpu={int(args.budget_share * model_bytes)}B"
    tile = default_tile(ckpt)
    convert(args.model, default_store_dir(ckpt, tile), tile)  # built once, before the rounds
    print(f"{args.model}: {model_bytes / 2**30:.2f} GiB; DRAM budget per process {args.budget_share:.0%} "
          f"({args.budget}); A = 1 process x {args.threads} threads, B = {args.world_size} ranks x 1 thread; "
          f"{args.prompt}-token prompt, {args.decode} decoded tokens; page cache dropped before each case",
          flush=True)  # fmt: skip
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    for r in range(args.rounds):
        for name, world in (("A", 1), ("B", args.world_size)):
            res = case(args, world)
            runs[name].append(res)
            line = ", ".join(
                f"b{b} {res[f'b{b}']['decode_tok_s']:.2f} tok/s (disk {res[f'b{b}']['disk_MiB']:.0f} MiB)"
                for b in args.batches
            )
            print(f"round {r + 1} {name}: load {res['load_s']:.1f} s, {line}", flush=True)
    head = "| batch | A: 1 process tok/s | B: ranks tok/s | B / A (per round) | all-reduce ms per decode step"
    print(f"\n{head} | share of step |")
    print("|---|---|---|---|---|---|")
    for b in args.batches:
        a = [x[f"b{b}"]["decode_tok_s"] for x in runs["A"]]
        bb = [x[f"b{b}"]["decode_tok_s"] for x in runs["B"]]
        ratios = [y / x for x, y in zip(a, bb, strict=True)]
        ar = statistics.median(x[f"b{b}"]["allreduce_ms_per_token"] for x in runs["B"])
        share = statistics.median(x[f"b{b}"]["allreduce_share"] for x in runs["B"])
        per = ", ".join(f"{x:.2f}" for x in ratios)
        print(f"| {b} | {statistics.median(a):.2f} | {statistics.median(bb):.2f} | "
              f"{statistics.median(ratios):.2f} ({per}) | {ar:.1f} | {share:.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()
