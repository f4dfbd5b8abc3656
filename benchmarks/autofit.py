"""Auto-fit benchmark (issue 24, acceptance 3): `auto` vs hand-set budgets and policies vs llama.cpp, each run
inside a hard memory limit that counts the page cache, from a cold cache.

On the synthetic OLMoE-1B-7B checkpoint (bf16) and the same weights converted to GGUF by llama.cpp's own
converter, for every limit (default 4, 6 and 8 GiB):
- `auto`: `LLM(model)` with no budget, policy or plan (default = fit: it reads the cgroup's limit itself);
- the sweep: `budget=cpu=F x limit` for every F in --fractions and every policy in --policies, set by hand
  as a user would (they may not fit: a run the kernel kills is reported as such), and for every F with
  kt_expert and a tile cache of --cache-share of the budget left after the non-expert weights (`--cache`);
- llama.cpp: `llama-bench` on the GGUF file (mmap, its default: it pages the weights in and out).
Each run is its own process in a fresh cgroup (v1 `memory.limit_in_bytes` or v2 `memory.max`, with the exact
byte count), the page cache dropped first. Rounds interleave every run of every limit (A B C A B C), the
figure is the median of the rounds, with the spread. Memory: the cgroup's peak (it counts the page cache, so
any run that reads more than the limit shows the limit there: the kernel reclaims it), its working set
sampled every 20 ms (usage less inactive page cache: what must fit), and whether the kernel killed it.

Prints the sweep, where `auto` landed, and the two ratios the issue asks for: auto / best of the sweep
(target >= 0.90) and auto / llama.cpp (target >= 3.0), per limit. Needs root (cgroups, drop_caches).

    .venv/bin/python benchmarks/autofit.py --llamacpp /work/llamacpp [--limits 4,6,8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

GIB = 1 << 30


# -- cgroups ---------------------------------------------------------------------------------------------
@dataclass
class Limited:
    """One run in a fresh memory cgroup: its output and the cgroup's counters."""

    rc: int
    out: str
    seconds: float
    peak: int
    """The cgroup's peak usage (page cache included), bytes."""
    working_set_peak: int
    """Peak of usage less inactive page cache, sampled every 20 ms, bytes."""
    oom_kills: int


def cgroup_mount() -> tuple[Path, bool]:
    """(mount, is_v2) of the memory controller, or exit with the reason."""
    v1, v2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
    if (v1 / "memory.limit_in_bytes").is_file():
        return v1, False
    if "memory" in (v2 / "cgroup.controllers").read_text().split():
        sub = v2 / "cgroup.subtree_control"
        if "memory" not in sub.read_text().split():
            sub.write_text("+memory")
        return v2, True
    sys.exit("autofit: no memory cgroup controller (v1 /sys/fs/cgroup/memory or v2 with 'memory')")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_limited(cmd: list[str], limit: int, timeout: float) -> Limited:
    """Run `cmd` in a new cgroup of `limit` bytes from a cold page cache."""
    mount, v2 = cgroup_mount()
    cg = mount / f"tilemem_autofit_{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        (cg / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(limit))
        if v2 and (cg / "memory.swap.max").exists():
            (cg / "memory.swap.max").write_text("0")
        drop_caches()
        usage_file = "memory.current" if v2 else "memory.usage_in_bytes"
        inactive = "inactive_file" if v2 else "total_inactive_file"

        def working_set() -> int:
            stat = dict(line.split() for line in (cg / "memory.stat").read_text().splitlines())
            return int((cg / usage_file).read_text()) - int(stat[inactive])

        t0 = time.perf_counter()
        proc = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh", *cmd],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        chunks: list[str] = []
        reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
        reader.start()
        ws = 0
        while proc.poll() is None:
            ws = max(ws, working_set())
            if time.perf_counter() - t0 > timeout:
                proc.kill()
            time.sleep(0.02)
        reader.join()
        seconds = time.perf_counter() - t0
        if v2:
            events = dict(line.split() for line in (cg / "memory.events").read_text().splitlines())
            peak, ooms = int((cg / "memory.peak").read_text()), int(events["oom_kill"])
        else:
            oom = dict(line.split() for line in (cg / "memory.oom_control").read_text().splitlines())
            peak, ooms = int((cg / "memory.max_usage_in_bytes").read_text()), int(oom.get("oom_kill", 0))
        return Limited(proc.returncode, "".join(chunks), seconds, peak, ws, ooms)
    finally:
        for _ in range(100):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


# -- the runs --------------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    """In the cgroup: load as a user would (`LLM(model, **flags)`), generate, print one RESULT line."""
    from tilemem.engine.llm import LLM
    from tilemem.engine.sampling import SamplingParams

    kw = json.loads(args.flags)
    t0 = time.perf_counter()
    if "cache" in kw:  # a hand-set tile cache reserve: `tilemem plan --cache`, then the plan
        from tilemem.loader.checkpoint import Checkpoint
        from tilemem.runtime.setup import make_plan

        ckpt = Checkpoint.open(args.model)
        kw["plan"] = make_plan(ckpt, kw.pop("budget"), kw.pop("policy"), None, 128, cache=kw.pop("cache"))
    llm = LLM(args.model, threads=args.threads, max_batch=1, **kw)
    load_s = time.perf_counter() - t0
    prompt = json.loads(Path(args.prompt_file).read_text())
    llm.generate([prompt], SamplingParams(max_tokens=args.decode, temperature=0, ignore_eos=True))
    st = llm.stats()
    plan = llm.parts.plan
    out = dict(decode_tok_s=st.decode_tok_s, prefill_tok_s=st.prefill_tok_s, load_s=load_s)
    if plan is not None:
        cpu = plan.usage("cpu")
        out.update(policy=plan.policy, budget=cpu.capacity, tile=plan.tile)
    print("RESULT " + json.dumps(out), flush=True)


@dataclass
class Case:
    name: str
    limit: int
    kind: str  # auto | hand | llama
    flags: dict = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)


def run_case(case: Case, args: argparse.Namespace) -> dict:
    if case.kind == "llama":
        bench = Path(args.llamacpp) / "bin" / "llama-bench"
        cmd = [str(bench), "-m", args.gguf, "-t", str(args.threads), "-p", "0", "-n", str(args.decode), "-r", "1",
               "-o", "json"]  # fmt: skip
    else:
        cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--flags", json.dumps(case.flags)]
        cmd += ["--prompt-file", args.prompt_file, "--decode", str(args.decode), "--threads", str(args.threads)]
    r = run_limited(cmd, case.limit, args.timeout)
    res: dict = dict(rc=r.rc, seconds=r.seconds, peak=r.peak, ws=r.working_set_peak, oom=r.oom_kills, tok_s=0.0)
    if r.rc == 0 and case.kind == "llama":
        rows = json.loads(r.out[r.out.index("[") :])
        res["tok_s"] = float(rows[0]["avg_ts"])
    elif r.rc == 0:
        line = next(x for x in r.out.splitlines() if x.startswith("RESULT "))
        res.update(json.loads(line[7:]))
        res["tok_s"] = res["decode_tok_s"]
        res["said"] = [x for x in r.out.splitlines() if "auto" in x and ("--budget" in x or "--policy" in x)]
    else:
        res["error"] = "killed by the kernel (OOM)" if r.oom_kills else r.out.strip().splitlines()[-1:]
    return res


def prepare(args: argparse.Namespace) -> None:
    """The checkpoint, its tile store, the GGUF file (llama.cpp's converter) and the prompt."""
    from tokenizers import Tokenizer

    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.runtime.setup import default_store_dir
    from tilemem.runtime.tile_store import convert
    from tilemem.synth.writer import synthesize

    path = Path(args.model)
    if not (path / "config.json").exists():
        synthesize(None, "olmoe-1b-7b", path, seed=0, routing_skew=1.0, dtype="bf16")
    store = default_store_dir(Checkpoint.open(path), 128)
    if not (store / "store.json").exists():  # built once, outside the limits (as `tilemem convert` would be)
        convert(path, store, 128)
    if not Path(args.gguf).exists():
        converter = Path(args.llamacpp) / "convert_gguf.py"
        subprocess.run([args.convert_python, str(converter), str(path), "--outtype", "bf16", "--outfile", args.gguf],
                       check=True)  # fmt: skip
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = tok.encode("def fibonacci(n):\n    " * 8).ids[: args.prompt]
    Path(args.prompt_file).parent.mkdir(parents=True, exist_ok=True)
    Path(args.prompt_file).write_text(json.dumps(ids))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="checkpoints/olmoe-1b-7b", help="bf16 checkpoint (synthesized if missing)")
    ap.add_argument("--gguf", default=None, help="the same weights as GGUF (default: MODEL-bf16.gguf, converted)")
    ap.add_argument("--llamacpp", default=None, help="a build by ../shared/tools/build_llamacpp.sh (required)")
    ap.add_argument("--convert-python", default=sys.executable, help="python with torch, transformers, sentencepiece")
    ap.add_argument("--limits", default="4,6,8", help="GiB, comma-separated")
    ap.add_argument("--fractions", default="0.35,0.5,0.65,0.8", help="hand-set DRAM budgets, as shares of the limit")
    ap.add_argument("--policies", default="kt_expert,tilepo_fine")
    ap.add_argument("--cache-share", type=float, default=0.9, help="the hand-set cache runs' share (0: none)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default="bench_out/autofit")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--flags", default="{}")
    ap.add_argument("--prompt-file", default=None)
    args = ap.parse_args()
    args.prompt_file = args.prompt_file or str(Path(args.out) / "prompt.json")
    if args.worker:
        worker(args)
        return
    if args.llamacpp is None or not (Path(args.llamacpp) / "bin" / "llama-bench").exists():
        sys.exit("autofit: --llamacpp DIR must name a build of ../shared/tools/build_llamacpp.sh DIR")
    if os.geteuid() != 0:
        sys.exit("autofit: needs root (memory cgroups, dropping the page cache)")
    args.gguf = args.gguf or f"{args.model.rstrip('/')}-bf16.gguf"
    prepare(args)
    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.models.topology import Topology

    fixed = Topology.from_config(Checkpoint.open(args.model).config).non_expert_bytes
    cases: list[Case] = []
    for gib in (float(x) for x in args.limits.split(",")):
        limit = int(gib * GIB)
        cases.append(Case(f"{gib:g} GiB llama.cpp", limit, "llama"))
        cases.append(Case(f"{gib:g} GiB auto", limit, "auto"))
        for pol in args.policies.split(","):
            for f in (float(x) for x in args.fractions.split(",")):
                cases.append(Case(f"{gib:g} GiB cpu={f * gib:.2f}GiB {pol}", limit, "hand",
                                  dict(budget=f"cpu={int(f * limit)}B", policy=pol)))  # fmt: skip
        for f in (float(x) for x in args.fractions.split(",")) if args.cache_share > 0 else ():
            cache = int(args.cache_share * (f * limit - fixed))
            flags = dict(budget=f"cpu={int(f * limit)}B", policy="kt_expert", cache=f"cpu={cache}B")
            name = f"{gib:g} GiB cpu={f * gib:.2f}GiB kt_expert cache {cache / GIB:.2f}GiB"
            cases.append(Case(name, limit, "hand", flags))
    log = Path(args.out) / "runs.jsonl"
    for r in range(args.rounds):
        for case in cases:
            res = run_case(case, args)
            case.runs.append(res)
            with log.open("a") as f:
                f.write(json.dumps(dict(case=case.name, round=r, **res)) + "\n")
            print(
                f"round {r} {case.name:34s} {res['tok_s']:7.3f} tok/s  peak {res['peak'] / GIB:5.2f} GiB  working set "
                f"{res['ws'] / GIB:5.2f} GiB  {res['seconds']:5.0f} s  {res.get('error', '')}",
                flush=True,
            )
    report(cases, args)


def report(cases: list[Case], args: argparse.Namespace) -> None:
    def med(c: Case) -> float:
        return statistics.median(x["tok_s"] for x in c.runs)

    def spread(c: Case) -> float:
        v = [x["tok_s"] for x in c.runs]
        return max(v) - min(v)

    print(f"\nOLMoE-1B-7B synthetic bf16, {args.threads} threads, {args.decode} decode tokens, cold cache, "
          f"{args.rounds} rounds interleaved; tok/s = median (spread)\n")  # fmt: skip
    print("| limit | run | decode tok/s | spread | peak GiB | working set GiB | killed |")
    print("|---|---|---|---|---|---|---|")
    for c in cases:
        gib = c.limit / GIB
        killed = sum(1 for x in c.runs if x["oom"])
        peak, ws = max(x["peak"] for x in c.runs) / GIB, max(x["ws"] for x in c.runs) / GIB
        name = c.name.split(" ", 2)[2]
        print(f"| {gib:g} | {name} | {med(c):.3f} | {spread(c):.3f} | {peak:.2f} | {ws:.2f} | {killed} |")
    print()
    for limit in sorted({c.limit for c in cases}):
        group = [c for c in cases if c.limit == limit]
        auto = next(c for c in group if c.kind == "auto")
        llama = next(c for c in group if c.kind == "llama")
        best = max((c for c in group if c.kind == "hand"), key=med)
        landed = auto.runs[-1]
        where = (f"budget {landed.get('budget', 0) / GIB:.2f} GiB, {landed.get('policy')}, tile {landed.get('tile')}"
                 if "policy" in landed else "all resident")  # fmt: skip
        ws_ok = all(x["ws"] < limit for c in group if c.kind != "llama" for x in c.runs if x["rc"] == 0)
        vs_best = med(auto) / med(best) if med(best) else float("nan")
        vs_llama = med(auto) / med(llama) if med(llama) else float("inf")
        print(
            f"{limit / GIB:g} GiB: auto {med(auto):.3f} tok/s ({where}); best hand-set {best.name.split(' ', 2)[2]} "
            f"{med(best):.3f} -> auto/best {vs_best:.2f} (target >= 0.90); llama.cpp {med(llama):.3f} -> "
            f"auto/llama.cpp {vs_llama:.1f}x (target >= 3.0); TileMEM working sets under the limit: {ws_ok}"
        )
        for line in auto.runs[-1].get("said", []):
            print(f"    auto said: {line}")


if __name__ == "__main__":
    main()
