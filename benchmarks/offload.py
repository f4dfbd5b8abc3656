"""Offload benchmark: tile-level placement vs expert-level (KTransformers-style) placement, cold disk.

On the synthetic OLMoE-1B-7B (bf16, routing skew), with a DRAM budget of about 35% of the expert
bytes and the rest read from disk with O_DIRECT (page cache dropped before every run), 2 threads:
- decode tok/s of kt_expert vs every TilePO policy, interleaved over rounds;
- at a 100% budget, the tiered engine vs the all-resident engine;
- streaming: a 0% budget run's disk read rate vs the disk's raw O_DIRECT read bandwidth;
- peak RSS of each run vs budget + non-expert weights + KV cache.
Each run is its own subprocess (clean peak RSS, cold caches).

    .venv/bin/python benchmarks/offload.py [--rounds 3] [--decode 24] [--budget-pct 35]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

POLICIES = ["kt_expert", "tilepo_coarse", "tilepo_fine", "tilepo_hybrid", "tilepo_adaptive"]


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        print("warning: cannot drop the page cache (not root); disk tiles still bypass it (O_DIRECT)")


def disk_bandwidth(path: Path, request: int, depth: int = 4, total: int = 2 << 30) -> float:
    """Raw O_DIRECT read bandwidth of `path` (bytes/s) with `depth` requests of `request` bytes in flight."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    size = min(os.fstat(fd).st_size, total) // request * request
    bufs = [mmap.mmap(-1, request) for _ in range(depth)]

    def read(i: int) -> int:
        n = 0
        for off in range(i * request, size, depth * request):
            n += os.preadv(fd, [bufs[i]], off)
        return n

    drop_caches()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(depth) as pool:
        n = sum(pool.map(read, range(depth)))
    dt = time.perf_counter() - t0
    os.close(fd)
    return n / dt


def worker(args: argparse.Namespace) -> None:
    import torch

    from tilemem.artifacts.mir import load_plan
    from tilemem.engine.llm import LLM, peak_rss_bytes
    from tilemem.engine.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    base_rss = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) * 1024
    kw = {}
    if args.plan:
        kw = dict(plan=load_plan(args.plan), store=args.store)
    t0 = time.perf_counter()
    llm = LLM(args.dir, dtype="bf16", threads=args.threads, max_batch=1, **kw)
    load_s = time.perf_counter() - t0
    prompt = json.loads(Path(args.prompt_file).read_text())
    llm.generate([prompt], SamplingParams(max_tokens=args.decode, temperature=0, ignore_eos=True))
    st = llm.stats()
    decode_s = sum(s["seconds"] for s in st.steps if not s["prefill"])
    decode_disk = sum(s.get("disk_bytes", 0) for s in st.steps if not s["prefill"])
    cache = llm.engine().cache.nbytes()
    out = dict(
        decode_tok_s=st.decode_tok_s,
        prefill_tok_s=st.prefill_tok_s,
        load_s=load_s,
        peak_rss=peak_rss_bytes() - base_rss,
        decode_s=decode_s,
        decode_disk=decode_disk,
        kv_bytes=cache,
        runtime=st.runtime or {},
    )
    print("RESULT " + json.dumps(out), flush=True)


def spawn(args: argparse.Namespace, plan: Path | None) -> dict:
    drop_caches()
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--dir",
        args.dir,
        "--decode",
        str(args.decode),
        "--threads",
        str(args.threads),
        "--prompt-file",
        args.prompt_file,
        "--store",
        str(args.store),
    ]
    if plan is not None:
        cmd += ["--plan", str(plan)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker failed:\n{proc.stderr[-4000:]}")


def prepare(args: argparse.Namespace) -> tuple[dict[str, Path], Path, Path, dict]:
    """Checkpoint, tile store, profile and plans (built once, reused across rounds)."""
    from tilemem.artifacts.mir import save_plan
    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.models.topology import Topology
    from tilemem.runtime.setup import make_plan
    from tilemem.runtime.tile_store import convert
    from tilemem.synth.writer import synthesize
    from tilemem.tools.profiler import profile_checkpoint
    from tilemem.workloads.workload import load_workload

    path = Path(args.dir)
    if not (path / "config.json").exists():
        synthesize(None, args.preset, path, seed=0, routing_skew=args.skew, dtype="bf16")
    ckpt = Checkpoint.open(path)
    topo = Topology.from_config(ckpt.config)
    convert(path, args.store, args.tile)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prof_file = work / "profile.json"
    if prof_file.exists():
        from tilemem.placement.profile import Profile

        profile = Profile.load(prof_file, topo)
    else:
        profile = profile_checkpoint(path, load_workload("mixed", seed=0), args.profile_tokens, dtype="bf16")
        profile.save(prof_file)
    fixed = topo.non_expert_bytes + topo.shared_and_dense_bytes
    budgets = {
        "main": fixed + int(args.budget_pct / 100 * topo.routed_expert_bytes),
        "full": fixed + topo.routed_expert_bytes + (64 << 20),
        "zero": fixed,
    }
    plans = {}
    for name, pol in [("main", p) for p in POLICIES] + [("full", "tilepo_fine"), ("zero", "tilepo_fine")]:
        cache = f"cpu={int(0.1 * (budgets[name] - fixed))}B" if name == "main" else None
        plan = make_plan(ckpt, f"cpu={budgets[name]}B", pol, profile, args.tile, cache=cache)
        d = work / f"plan_{name}_{pol}"
        save_plan(plan, d, heatmap=False)
        plans[f"{name}:{pol}"] = d
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    text = " ".join(r.prompt or " ".join(c for _, c in r.messages) for r in load_workload("mixed", seed=1).requests)
    Path(args.prompt_file).write_text(json.dumps(tok.encode(text).ids[: args.prompt]))
    shares = [lp.top_share(0.25) for lp in profile.layers]
    info = dict(budgets=budgets, topo=topo, shares=shares)
    return plans, path, Path(args.store), info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="olmoe-1b-7b")
    ap.add_argument("--dir", default="checkpoints/olmoe-1b-7b")
    ap.add_argument("--store", default=None)
    ap.add_argument("--work", default="bench_out/offload")
    ap.add_argument("--skew", type=float, default=1.0)
    ap.add_argument("--budget-pct", type=float, default=35.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode", type=int, default=24)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--profile-tokens", type=int, default=1024)
    ap.add_argument("--prompt-file", default=None)
    ap.add_argument("--plan", default=None)
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    args.store = args.store or f"{args.dir}.tiles{args.tile}"
    args.prompt_file = args.prompt_file or str(Path(args.work) / "prompt.json")
    if args.worker:
        worker(args)
        return
    plans, path, store, info = prepare(args)
    topo, budgets = info["topo"], info["budgets"]
    print(
        f"routing mass on the top quarter of experts per layer (profile): "
        f"{' '.join(f'{s:.2f}' for s in info['shares'])}"
    )
    runs: dict[str, list[dict]] = {}
    order = [f"main:{p}" for p in POLICIES] + ["full:tilepo_fine", "resident", "zero:tilepo_fine"]
    for r in range(args.rounds):
        for key in order:
            res = spawn(args, None if key == "resident" else plans[key])
            runs.setdefault(key, []).append(res)
            print(
                f"round {r} {key:22s} decode {res['decode_tok_s']:.3f} tok/s, peak RSS "
                f"{res['peak_rss'] / 2**30:.2f} GiB, disk {res['runtime'].get('disk_bytes', 0) / 2**30:.2f} GiB, "
                f"hit rate {res['runtime'].get('hit_rate', 0):.2f}",
                flush=True,
            )
    bw = statistics.median(disk_bandwidth(store / "tiles.bin", 1 << 20) for _ in range(2))

    def med(key: str, field: str = "decode_tok_s") -> float:
        return statistics.median(x[field] for x in runs[key])

    def rng(key: str) -> float:
        v = [x["decode_tok_s"] for x in runs[key]]
        return max(v) - min(v)

    gib = 2**30
    print(
        f"\nOLMoE-1B-7B synthetic (skew {args.skew}), experts {topo.routed_expert_bytes / gib:.2f} GiB, "
        f"non-expert {topo.non_expert_bytes / gib:.2f} GiB, {args.threads} threads, {args.rounds} rounds, "
        f"{args.decode} decode tokens, page cache dropped before each run\n"
    )
    print("| run | DRAM budget GiB | decode tok/s (median) | spread | vs kt_expert | RSS growth GiB | limit GiB |")
    print("|---|---|---|---|---|---|---|")
    kt = med("main:kt_expert")
    for key in order:
        name = key.split(":")[0]
        budget = budgets.get(name)
        kv = runs[key][0]["kv_bytes"]
        limit = (budget + kv) * 1.10 if budget else None
        limit_s = f"{limit / gib:.2f}" if limit else "-"
        print(
            f"| {key} | {budget / gib if budget else float('nan'):.2f} | {med(key):.3f} | {rng(key):.3f} | "
            f"{med(key) / kt:.2f}x | {med(key, 'peak_rss') / gib:.2f} | {limit_s} |"
        )
    best = max((p for p in POLICIES if p != "kt_expert"), key=lambda p: med(f"main:{p}"))
    print(
        f"\nbest TilePO at {args.budget_pct:.0f}%: {best} {med(f'main:{best}'):.3f} tok/s = "
        f"{med(f'main:{best}') / kt:.2f}x kt_expert (target >= 1.3x)"
    )
    print(
        f"100% budget: tiered {med('full:tilepo_fine'):.3f} vs all-resident {med('resident'):.3f} tok/s = "
        f"{med('full:tilepo_fine') / med('resident'):.2f} (target >= 0.90)"
    )
    zero = runs["zero:tilepo_fine"]
    stream = statistics.median(z["decode_disk"] / z["decode_s"] for z in zero)
    print(
        f"streaming at 0% budget: {stream / 1e9:.2f} GB/s vs raw O_DIRECT {bw / 1e9:.2f} GB/s = "
        f"{100 * stream / bw:.0f}% (target >= 70%)"
    )


if __name__ == "__main__":
    main()
