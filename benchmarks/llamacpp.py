"""TileMEM vs llama.cpp on the same GGUF files: prefill, batch-1 and batch-4 decode, interleaved rounds.

For each file, every round runs (A B A B: this machine's memory bandwidth drifts by tens of percent):
- llama.cpp: `llama-bench -p PROMPT -n 0 -r 1` (prefill pp) and `llama-bench -p 0 -n DECODE -d PROMPT -r 1`
  (batch-1 decode tg at a depth of PROMPT tokens, as TileMEM decodes after its prompt), and
  `llama-batched-bench -npp 128 -ntg DECODE -npl 4` (batch-4 decode: S_TG, the tokens of all 4 sequences per s);
- TileMEM, each case in its own subprocess: a PROMPT-token prefill then DECODE greedy tokens at batch 1, and 4
  prompts of 128 tokens then DECODE tokens each (aggregate decode tok/s), after a warm-up; the fast path
  (8-bit activations, as llama.cpp) unless `--exact`.
Both use `--threads` threads; page cache warm (the file read once first).

    .venv/bin/python benchmarks/llamacpp.py --llamacpp /work/llamacpp \\
        --gguf Q8_0=/work/gguf/olmoe-q8_0.gguf --gguf Q4_K_M=/work/gguf/olmoe-q4_k_m.gguf --rounds 2

`--memory-share 0.5` instead runs both inside a hard memory limit of that share of each file's size (a fresh
cgroup that counts the page cache, page cache dropped first: `benchmarks/autofit.py`'s `run_limited`), batch-1
decode after a 16-token prompt: llama.cpp as it runs by default (mmap, paging), TileMEM with no flags (it
reads the limit and plans automatically: tiles beyond the budget are read from its tile store, built first).
llama.cpp's default run is killed there (its CPU backend repacks Q4_K weights into anonymous memory, the whole
model), so it is run again with `--repack 0 -lm mmap`, paging the file, and that figure is the baseline.

Make the files with llama.cpp's own tools from a synthetic checkpoint (`tilemem synth olmoe --preset
olmoe-1b-7b --out CKPT`): `python DIR/convert_gguf.py CKPT --outtype bf16 --outfile m-bf16.gguf`, then
`DIR/bin/llama-quantize m-bf16.gguf m-q4_k_m.gguf Q4_K_M 2` (and Q8_0).
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

BATCH4_PROMPT = 128


def warm(path: Path) -> None:
    """Read the file once, so both engines start from a warm page cache."""
    with path.open("rb") as f:
        while f.read(64 << 20):
            pass


def run_case(args: argparse.Namespace) -> dict:
    """One TileMEM case in this process."""
    from tilemem.engine.llm import LLM
    from tilemem.engine.sampling import SamplingParams
    from tilemem.layers import ggml

    ggml.FAST = not args.exact
    path = Path(args.file)
    if not args.cold:
        warm(path)
    t0 = time.perf_counter()
    llm = LLM(str(path), dtype="bf16", threads=args.threads, max_batch=args.batch)
    load_s = time.perf_counter() - t0
    vocab = llm.config.vocab_size
    length = args.prompt_len if args.batch == 1 else BATCH4_PROMPT
    llm.generate(warmup_batch(vocab, args.batch, 16), SamplingParams(max_tokens=2, temperature=0))
    llm.generate(prompt_batch(vocab, args.batch, length), SamplingParams(max_tokens=args.decode, temperature=0,
                                                                         ignore_eos=True))  # fmt: skip
    s = llm.stats()
    return {"prefill_tok_s": s.prefill_tok_s, "decode_tok_s": s.decode_tok_s, "load_s": load_s}


def tilemem(args: argparse.Namespace, path: str, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--file", path, "--batch", str(batch), "--threads", str(args.threads)]
    cmd += ["--prompt-len", str(args.prompt_len), "--decode", str(args.decode)] + (["--exact"] if args.exact else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"TileMEM on {path} b{batch} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def llama_bench(args: argparse.Namespace, path: str) -> dict:
    """llama-bench's pp and tg tok/s (batch 1): tg at a depth of the prompt's tokens (`-d`), as TileMEM decodes
    after its prompt (llama-bench's tg alone starts from an empty context)."""
    exe = Path(args.llamacpp) / "bin" / "llama-bench"
    cmd = [str(exe), "-m", path, "-t", str(args.threads), "-r", "1", "-o", "json"]
    rows = []
    for test in (
        ["-p", str(args.prompt_len), "-n", "0"],
        ["-p", "0", "-n", str(args.decode), "-d", str(args.prompt_len)],
    ):
        rows += json.loads(subprocess.run([*cmd, *test], capture_output=True, text=True, check=True).stdout)
    pp = next(r for r in rows if r["n_prompt"] and not r["n_gen"])
    tg = next(r for r in rows if r["n_gen"] and not r["n_prompt"])
    return {"prefill_tok_s": pp["avg_ts"], "decode_tok_s": tg["avg_ts"]}


def llama_batched(args: argparse.Namespace, path: str, batch: int) -> float:
    """llama-batched-bench's S_TG (decode tok/s of all `batch` sequences together)."""
    exe = Path(args.llamacpp) / "bin" / "llama-batched-bench"
    cmd = [str(exe), "-m", path, "-c", "2048", "-b", "2048", "-ub", "512", "-t", str(args.threads)]
    cmd += ["-npp", str(BATCH4_PROMPT), "-ntg", str(args.decode), "-npl", str(batch), "--output-format", "jsonl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return float(rows[-1]["speed_tg"])


def limited(args: argparse.Namespace, files: dict[str, str]) -> None:
    """Both engines inside a memory limit of `--memory-share` of each file (needs root: cgroups, drop_caches)."""
    from autofit import run_limited

    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.runtime.setup import default_store_dir, default_tile
    from tilemem.runtime.tile_store import convert

    for path in files.values():  # the tile store, built once outside the limit (`tilemem convert`)
        ckpt = Checkpoint.open(path)
        tile = default_tile(ckpt)
        convert(path, default_store_dir(ckpt, tile), tile)
    runs: dict[tuple[str, str], list[float]] = {(n, e): [] for n in files for e in ("llama.cpp", "TileMEM")}
    for r in range(args.rounds):
        for name, path in files.items():
            limit = int(args.memory_share * Path(path).stat().st_size)
            bench = [str(Path(args.llamacpp) / "bin" / "llama-bench"), "-m", path, "-t", str(args.threads), "-p", "0"]
            bench += ["-n", str(args.decode), "-r", "1", "-o", "json"]
            ll = run_limited(bench, limit, args.timeout)  # as it runs by default
            default_rc = ll.rc
            if ll.rc != 0:  # killed (its CPU backend repacks K-quant weights into anonymous memory): what a user
                ll = run_limited([*bench, "--repack", "0", "-lm", "mmap"], limit, args.timeout)  # tries next
            ll_tok = float(json.loads(ll.out[ll.out.index("[") :])[0]["avg_ts"]) if ll.rc == 0 else 0.0
            cmd = [sys.executable, __file__, "--worker", "--file", path, "--batch", "1", "--threads", str(args.threads)]
            ours = run_limited(
                [*cmd, "--prompt-len", "16", "--decode", str(args.decode), "--cold"], limit, args.timeout
            )
            res = json.loads(ours.out.strip().splitlines()[-1]) if ours.rc == 0 else {"decode_tok_s": 0.0}
            said = [line for line in ours.out.splitlines() if "planning automatically" in line]
            runs[(name, "llama.cpp")].append(ll_tok)
            runs[(name, "TileMEM")].append(res["decode_tok_s"])
            print(f"round {r + 1} {name} in {limit / 2**30:.2f} GiB: TileMEM {res['decode_tok_s']:.2f} tok/s "
                  f"(rc {ours.rc}, working set peak {ours.working_set_peak / 2**30:.2f} GiB, OOM kills "
                  f"{ours.oom_kills}), llama.cpp {ll_tok:.2f} tok/s (default run: rc {default_rc}"
                  f"{'' if default_rc == 0 else ', then --repack 0 -lm mmap: rc ' + str(ll.rc)})",
                  flush=True)  # fmt: skip
            if said and r == 0:
                print("  TileMEM said:", said[0][:300])
    print(f"\nbatch-1 decode of {args.decode} tokens inside a memory limit of {args.memory_share:.0%} of the file, "
          f"cold page cache, {args.threads} threads; tok/s, medians (per round)")  # fmt: skip
    print("| file | limit | llama.cpp | TileMEM | ratio |")
    print("|---|---|---|---|---|")
    for name, path in files.items():
        a, b = runs[(name, "llama.cpp")], runs[(name, "TileMEM")]
        per = ", ".join(f"{y / x:.2f}" if x else "-" for x, y in zip(a, b, strict=True))
        ma, mb = statistics.median(a), statistics.median(b)
        limit = args.memory_share * Path(path).stat().st_size / 2**30
        print(f"| {name} | {limit:.2f} GiB | {ma:.2f} | {mb:.2f} | {mb / ma if ma else float('inf'):.2f} ({per}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llamacpp", help="a llama.cpp build (../shared/tools/build_llamacpp.sh DIR)")
    ap.add_argument("--gguf", action="append", default=[], help="NAME=PATH of a GGUF file (repeatable)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--exact", action="store_true", help="TileMEM's exact path (fp32 activations) instead")
    ap.add_argument(
        "--memory-share", type=float, default=None, help="run inside a memory limit of this share of the file"
    )
    ap.add_argument("--timeout", type=float, default=900, help="seconds per limited run")
    ap.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_case(args)))
        return
    if not args.llamacpp or not args.gguf:
        ap.error("give --llamacpp DIR and at least one --gguf NAME=PATH")
    files = dict(g.split("=", 1) for g in args.gguf)
    if args.memory_share:
        limited(args, files)
        return
    keys = ("pp", "tg1", "tg4")
    runs: dict[tuple[str, str], list[dict]] = {(n, e): [] for n in files for e in ("llama.cpp", "TileMEM")}
    for r in range(args.rounds):
        for name, path in files.items():
            warm(Path(path))
            lb = llama_bench(args, path)
            ll = {"pp": lb["prefill_tok_s"], "tg1": lb["decode_tok_s"], "tg4": llama_batched(args, path, 4)}
            one, four = tilemem(args, path, 1), tilemem(args, path, 4)
            ours = {"pp": one["prefill_tok_s"], "tg1": one["decode_tok_s"], "tg4": four["decode_tok_s"]}
            runs[(name, "llama.cpp")].append(ll)
            runs[(name, "TileMEM")].append(ours)
            print(f"round {r + 1} {name}: " + ", ".join(
                f"{k} {ours[k]:.1f} vs {ll[k]:.1f} ({ours[k] / ll[k]:.2f}x)" for k in keys), flush=True)  # fmt: skip
    mode = "exact" if args.exact else "fast (8-bit activations)"
    print(f"\n{args.threads} threads, {args.rounds} rounds, prefill {args.prompt_len} tokens, decode {args.decode}; "
          f"batch 4: {BATCH4_PROMPT}-token prompts; TileMEM {mode}. tok/s, medians; ratio TileMEM / llama.cpp "
          "(per round)")  # fmt: skip
    print("| file | prefill llama.cpp | TileMEM | ratio | decode b1 llama.cpp | TileMEM | ratio | decode b4 llama.cpp "
          "| TileMEM | ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in files:
        ll, ours = runs[(name, "llama.cpp")], runs[(name, "TileMEM")]
        cells = []
        for k in keys:
            a, b = statistics.median(x[k] for x in ll), statistics.median(x[k] for x in ours)
            per = ", ".join(f"{y[k] / x[k]:.2f}" for x, y in zip(ll, ours, strict=True))
            cells.append(f"{a:.1f} | {b:.1f} | {b / a:.2f} ({per})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
