"""Decode/prefill benchmark: TileMEM vs Hugging Face transformers on a synthetic OLMoE-1B-7B.

Runs each engine in its own subprocess (both models do not fit in RAM together), alternating
tilemem / transformers / tilemem / ... so the machine's drifting memory bandwidth hits both alike,
and prints medians, ratios, and decode speed against the read-bandwidth bound
(bytes touched per token / measured DRAM read bandwidth). Each engine run times `--prefills`
prefills of the same prompts (one of them followed by the decode) and reports their median: one
prefill lasts 1-8 s, and this machine's speed swings by tens of percent within seconds.

    .venv/bin/python benchmarks/decode.py                      # olmoe-1b-7b, bf16, 2 threads
    .venv/bin/python benchmarks/decode.py --preset small --family olmoe --repeats 3
    .venv/bin/python benchmarks/decode.py --engines tilemem,tilemem-bf16 --batches 1   # x12 vs bf16 weights
    git worktree add /tmp/before HEAD~3   # the code before a change, interleaved with it (A B A B):
    .venv/bin/python benchmarks/decode.py --engines tilemem,tilemem-base --base-src /tmp/before/src
    .venv/bin/python benchmarks/decode.py --preset small --family olmoe --dtype fp32   # CPUs without AVX512-BF16

`--dtype fp32` computes in fp32 in both engines (the checkpoint stays bf16 on disk): on a CPU without
AVX512-BF16, torch's bf16 GEMMs run at ~1 GFLOP/s and the native kernels are off, so a bf16 prefill of the
full-size model would take minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tilemem.engine.llm import peak_rss_bytes

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
"""Compute dtypes `--dtype` takes."""


def dram_read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 7) -> float:
    """Best-of-N bytes/s of a multi-threaded sum over a buffer far larger than the caches."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t0))
    return best


def bytes_per_token(path: Path) -> int:
    """Weight bytes one decode token reads at batch 1 (embedding: one row)."""
    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.models.topology import Topology

    cfg = Checkpoint.open(path).config
    topo = Topology.from_config(cfg)
    embed = dict(topo.non_expert)["model.embed_tokens.weight"]  # its own dtype (bf16 in an FP8 checkpoint)
    routed = sum(lt.top_k * topo.expert_bytes(lt.index) for lt in topo.layers)
    return topo.non_expert_bytes - embed + routed + topo.shared_and_dense_bytes


def stored_bytes_saved(llm) -> int:
    """Bytes a batch-1 decode token reads less than `bytes_per_token` counts, because the engine keeps
    weights as x12 (routed experts: the top-k's average share; attention projections; LM head)."""
    from tilemem.layers.linear import Linear

    model, saved = llm.model, 0
    for i, block in model.moe_blocks().items():
        table = block.executor.table(i)
        if table is not None and table.x12 is not None:
            bf16 = sum(t.numel() * 2 for ts in table.tensors for t in ts)
            saved += (bf16 - table.nbytes) * block.gate.cfg.top_k // len(block.experts)
    for m in model.modules():
        if isinstance(m, Linear) and m.x12 is not None:
            saved += m.weight.numel() * 2 - m.x12.nbytes
    return saved


def flops_per_prefill_token(path: Path, prompt_len: int) -> float:
    """Multiply-add FLOPs of one prompt token: every weight it uses but the embedding and the LM head
    (prefill computes logits at the last position only), plus attention scores and values over half
    the prompt on average."""
    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.models.topology import Topology

    cfg = Checkpoint.open(path).config
    topo = Topology.from_config(cfg)
    head = cfg.vocab_size * cfg.hidden_size * topo.dtype_bytes
    weights = (bytes_per_token(path) - head) / topo.dtype_bytes
    attention = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * prompt_len / 2
    return 2 * (weights + attention)


def best_gemm_flops(threads: int, dtype: str = "bf16", n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the machine's best GEMM in `dtype` (oneDNN through torch, n x n x n): a practical ceiling
    for prefill, which is GEMM-bound."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n).to(TORCH_DTYPES[dtype]), torch.randn(n, n).to(TORCH_DTYPES[dtype])
    a @ b
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def prompt_batch(vocab: int, batch: int, length: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab - 1, (length,), generator=gen).tolist() for _ in range(batch)]


def warmup_batch(vocab: int, batch: int, length: int) -> list[list[int]]:
    """Prompts of the measured shape but other tokens: both engines warm up on one full-size prefill
    (first-call costs such as oneDNN kernel generation for new shapes and first-touch of buffers stay
    out of the timing, for both alike)."""
    return [[(t * 7 + 3) % (vocab - 11) + 10 for t in p] for p in prompt_batch(vocab, batch, length)]


def warm_page_cache(path: Path) -> None:
    """Read the checkpoint's files once, so that its pages are in DRAM."""
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def run_tilemem(
    path: Path,
    batch: int,
    prompt_len: int,
    decode: int,
    threads: int,
    prefills: int,
    dtype: str = "bf16",
    codec: str = "x12",
) -> dict:
    from tilemem.engine.llm import LLM
    from tilemem.engine.sampling import SamplingParams

    # The transformers run before this one held ~1.75x the checkpoint in its own memory, which pushed
    # part of the checkpoint out of the page cache; transformers reads all its weights while loading,
    # so read them back here too, before anything is timed (else experts the warm-up prompts missed
    # come from disk inside the timed prefill and decode).
    warm_page_cache(path)
    t0 = time.perf_counter()
    llm = LLM(path, dtype=dtype, threads=threads, max_batch=batch, weight_codec=codec)
    load_s = time.perf_counter() - t0
    prompts = prompt_batch(llm.config.vocab_size, batch, prompt_len)
    params = SamplingParams(max_tokens=decode, temperature=0, ignore_eos=True)
    llm.generate(warmup_batch(llm.config.vocab_size, batch, prompt_len), SamplingParams(max_tokens=4, temperature=0))
    prefill = []
    for _ in range(prefills - 1):  # prefill only (the first token), then one more with the decode
        llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        prefill.append(llm.stats().prefill_tok_s)
    llm.generate(prompts, params)
    s = llm.stats()
    prefill.append(s.prefill_tok_s)
    rss = peak_rss_bytes()  # before the bandwidth probe's buffer
    # The bandwidth drifts by tens of percent over minutes: judge each run by what the memory
    # gives right after it, in the same process.
    bw = dram_read_bandwidth(threads, gib=0.25, repeats=5)
    saved = stored_bytes_saved(llm)
    return {
        "prefill_tok_s": statistics.median(prefill), "decode_tok_s": s.decode_tok_s, "bw": bw, "peak_rss": rss,
        "bytes_saved": saved, "load_s": load_s,
    }  # fmt: skip


def run_transformers(
    path: Path, batch: int, prompt_len: int, decode: int, threads: int, prefills: int, dtype: str = "bf16"
) -> dict:
    import transformers

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[dtype]).eval()
    load_s = time.perf_counter() - t0
    prompts = torch.tensor(prompt_batch(model.config.vocab_size, batch, prompt_len))
    with torch.inference_mode():
        warm = torch.tensor(warmup_batch(model.config.vocab_size, batch, prompt_len))
        model(warm, logits_to_keep=1)  # warm-up, same shape
        prefill_s = []
        for _ in range(prefills):  # as generate() does: last position only
            t0 = time.perf_counter()
            out = model(prompts, use_cache=True, logits_to_keep=1)
            prefill_s.append(time.perf_counter() - t0)
        cache = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(decode - 1):
            out = model(tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        decode_s = time.perf_counter() - t0
    prefill = statistics.median(batch * prompt_len / t for t in prefill_s)
    return {"prefill_tok_s": prefill, "decode_tok_s": batch * (decode - 1) / decode_s, "load_s": load_s}


def worker(args: argparse.Namespace) -> None:
    run = (Path(args.dir), args.batch, args.prompt_len, args.decode, args.threads, args.prefills, args.dtype)
    if args.worker == "transformers":
        result = run_transformers(*run)
    else:  # tilemem or tilemem-base (x12 weights, the default) or tilemem-bf16 (weight_codec="none")
        result = run_tilemem(*run, codec="none" if args.worker == "tilemem-bf16" else "x12")
    result.setdefault("peak_rss", peak_rss_bytes())
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args: argparse.Namespace, engine: str, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--dir", args.dir, "--batch", str(batch)]
    cmd += ["--prompt-len", str(args.prompt_len), "--decode", str(args.decode), "--threads", str(args.threads)]
    cmd += ["--prefills", str(args.prefills), "--dtype", args.dtype]
    env = None
    if engine == "tilemem-base":  # the same script, importing tilemem from the other checkout
        env = {**os.environ, "PYTHONPATH": str(Path(args.base_src).resolve())}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{engine} worker failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="olmoe-1b-7b")
    ap.add_argument("--family", default=None)
    ap.add_argument("--dir", default=None, help="checkpoint dir (built if missing)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--prefills", type=int, default=3, help="prefills per engine run (their median is reported)")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument(
        "--engines",
        default="tilemem,transformers",
        help="of tilemem, transformers, tilemem-bf16 (bf16 weights), tilemem-base (tilemem from --base-src)",
    )
    ap.add_argument("--base-src", default=None, help="for tilemem-base: another checkout's src/ (e.g. a git worktree)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(TORCH_DTYPES), help="compute dtype of both engines")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dir = args.dir or f"checkpoints/{args.preset}"
    if args.worker:
        worker(args)
        return
    if "tilemem-base" in args.engines.split(",") and not (args.base_src and Path(args.base_src, "tilemem").is_dir()):
        ap.error("tilemem-base needs --base-src DIR, a checkout's src/ folder holding tilemem/")
    path = Path(args.dir)
    if not (path / "config.json").exists():
        from tilemem.synth.writer import synthesize

        synthesize(args.family, args.preset, path, seed=0, routing_skew=1.0, dtype="bf16")
    ckpt_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    warm_page_cache(path)  # both engines read from DRAM
    engines = args.engines.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    runs: dict[tuple[str, int], list[dict]] = {(e, b): [] for e in engines for b in batches}
    bandwidths, gemms = [], []
    for r in range(args.repeats):
        bandwidths.append(dram_read_bandwidth(args.threads))
        gemms.append(best_gemm_flops(args.threads, args.dtype))
        for b in batches:
            for e in engines:  # interleaved: every engine once per round
                res = spawn(args, e, b)
                runs[(e, b)].append(res)
                print(f"round {r} {e:12s} batch {b}: " + json.dumps({k: round(v, 2) for k, v in res.items()}))
    bw = statistics.median(bandwidths)
    bpt = bytes_per_token(path)
    bound = bw / bpt
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
    print(f"\ncheckpoint {path} ({ckpt_bytes / 2**30:.2f} GiB), threads {args.threads}, repeats {args.repeats}")
    print(f"DRAM read bandwidth (median of rounds): {bw / 1e9:.1f} GB/s; bytes per decode token {bpt / 1e9:.3f} GB")
    print(f"read-bandwidth bound at batch 1: {bound:.2f} tok/s\n")
    print("| engine | batch | prefill tok/s | decode tok/s | peak RSS GiB | RSS / ckpt | load s |")
    print("|---|---|---|---|---|---|---|")
    for (e, b), m in med.items():
        print(
            f"| {e} | {b} | {m['prefill_tok_s']:.1f} | {m['decode_tok_s']:.2f} | "
            f"{m['peak_rss'] / 2**30:.2f} | {m['peak_rss'] / ckpt_bytes:.2f} | {m['load_s']:.1f} |"
        )
    fpt, gemm = flops_per_prefill_token(path, args.prompt_len), statistics.median(gemms)
    print(f"\nprefill: {fpt / 1e9:.2f} GFLOP per prompt token; best {args.dtype} GEMM here {gemm / 1e9:.0f} GFLOP/s")
    for (e, b), m in med.items():
        gf = m["prefill_tok_s"] * fpt
        print(f"  {e} batch {b}: {gf / 1e9:.0f} GFLOP/s = {100 * gf / gemm:.0f}% of the best GEMM")
    if "transformers" in engines:
        for b in batches:
            need = 1.5 * med[("transformers", b)]["prefill_tok_s"] * fpt
            print(f"  1.5x transformers at batch {b} needs {need / 1e9:.0f} GFLOP/s = {100 * need / gemm:.0f}% of it")
    if "tilemem" in engines:
        print()
        for b in batches:
            t = med[("tilemem", b)]
            line = f"batch {b}: "
            if "transformers" in engines:
                h = med[("transformers", b)]
                pairs = list(zip(runs[("tilemem", b)], runs[("transformers", b)], strict=True))  # side by side

                def rounds(key: str, pairs=pairs) -> str:
                    ratios = [x[key] / y[key] for x, y in pairs]
                    return ", ".join(f"{r:.2f}x" for r in ratios) + f"; median {statistics.median(ratios):.2f}x"

                line += (
                    f"decode {t['decode_tok_s'] / h['decode_tok_s']:.2f}x transformers (per round: "
                    f"{rounds('decode_tok_s')}), prefill {t['prefill_tok_s'] / h['prefill_tok_s']:.2f}x "
                    f"transformers (per round: {rounds('prefill_tok_s')})"
                )
            if b == 1:
                line += f"; decode at {100 * t['decode_tok_s'] / bound:.0f}% of the read-bandwidth bound"
                own = [x["decode_tok_s"] * bpt / x["bw"] for x in runs[("tilemem", 1)]]
                line += (
                    f" ({100 * statistics.median(own):.0f}% against the bandwidth measured right after each run: "
                    + ", ".join(f"{100 * f:.0f}%" for f in own)
                    + ")"
                )
                saved = statistics.median(x["bytes_saved"] for x in runs[("tilemem", 1)])
                if saved:  # x12 weights: the bytes it reads per token, and the bound those give
                    read = bpt - saved
                    share = 100 * t["decode_tok_s"] / (bw / read)
                    line += f"; it reads {read / 1e9:.3f} GB per token (x12 weights): {share:.0f}% of the bound"
                    line += f" those bytes give ({bw / read:.2f} tok/s)"
            if "tilemem-base" in engines:
                for key in ("decode_tok_s", "prefill_tok_s"):
                    pairs = zip(runs[("tilemem", b)], runs[("tilemem-base", b)], strict=True)
                    ratios = [x[key] / y[key] for x, y in pairs]
                    line += f"; {key.split('_')[0]} {statistics.median(ratios):.3f}x tilemem-base (per round: "
                    line += ", ".join(f"{r:.3f}x" for r in ratios) + ")"
            if "tilemem-bf16" in engines:
                pairs = zip(runs[("tilemem", b)], runs[("tilemem-bf16", b)], strict=True)
                ratios = [x["decode_tok_s"] / y["decode_tok_s"] for x, y in pairs]
                line += f"; x12 weights decode {statistics.median(ratios):.2f}x bf16 weights (per round: "
                line += ", ".join(f"{r:.2f}x" for r in ratios) + ")"
            print(line.replace(": ; ", ": "))


if __name__ == "__main__":
    main()
