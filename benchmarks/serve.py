"""Serving benchmark: aggregate decode tok/s, TTFT and TPOT (p50/p95) at 1, 4 and 16 concurrent clients.

Starts `tilemem serve` in a subprocess (so clients and server do not share a GIL), then for each
concurrency level runs that many closed-loop streaming clients (asyncio + httpx), each sending
`--requests` greedy completions of distinct random prompts back to back. Synthetic checkpoints are
written on first use. Prints a markdown table and writes the rows as JSON.

    .venv/bin/python benchmarks/serve.py                                  # small, then olmoe-1b-7b
    .venv/bin/python benchmarks/serve.py --presets small --max-tokens 64 --requests 3
    .venv/bin/python benchmarks/serve.py --presets small --budget cpu=150MiB   # tiered, disk fetches

Target: aggregate tok/s at 16 clients >= 3x the single-client figure on `small`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

SERVE = (
    "import argparse, sys; from tilemem.cli import serve_command as s; p = argparse.ArgumentParser(); "
    "s.register(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
)


def checkpoint(preset: str, root: Path, dtype: str) -> Path:
    """The synthetic checkpoint of `preset`: `root/preset` if there (as `tilemem synth --preset P --out
    checkpoints/P` writes it), else `root/bench-preset-dtype`, written if missing."""
    existing = root / preset
    if (existing / "config.json").exists() and (existing / "model.safetensors.index.json").exists():
        return existing
    path = root / f"bench-{preset}-{dtype}"
    if not (path / "config.json").exists():
        from tilemem.synth.writer import synthesize

        print(f"synthesizing {preset} ({dtype}) into {path} ...", flush=True)
        synthesize("olmoe" if preset == "small" else None, preset, path, dtype=dtype, routing_skew=1.0)
    return path


@contextlib.contextmanager
def server(path: Path, args: argparse.Namespace, port: int):
    cmd = [sys.executable, "-c", SERVE, "serve", str(path), "--port", str(port), "--log-level", "warning"]
    cmd += ["--max-batch", str(max(args.clients)), "--max-queue", "256", "--threads", str(args.threads)]
    cmd += ["--max-model-len", str(args.max_model_len), "--dtype", args.dtype, "--model-name", "bench"]
    if args.budget:
        cmd += ["--budget", args.budget, "--tile-size", str(args.tile_size)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not come up in time")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                now = time.perf_counter()
                first = first or now
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    tpot = (last - first) / (tokens - 1) if tokens > 1 and first is not None else None
    return {"ttft": first - t0, "tpot": tpot, "tokens": tokens}


async def run_level(url: str, clients: int, args: argparse.Namespace, vocab: int, rng: random.Random) -> dict:
    prompts = [
        [[rng.randrange(10, vocab) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
        for _ in range(clients)
    ]
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await one_request(client, url, prompts[0][0][:8], 4)  # warm-up

        async def client_loop(i: int) -> list[dict]:
            return [await one_request(client, url, p, args.max_tokens) for p in prompts[i]]

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    rows = [r for rs in per_client for r in rs]
    ttft = sorted(r["ttft"] for r in rows)
    tpot = sorted(r["tpot"] for r in rows if r["tpot"] is not None)
    tokens = sum(r["tokens"] for r in rows)
    return {
        "clients": clients,
        "requests": len(rows),
        "tokens": tokens,
        "wall_s": wall,
        "agg_tok_s": tokens / wall,
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p95_s": pct(ttft, 0.95),
        "tpot_p50_s": pct(tpot, 0.5),
        "tpot_p95_s": pct(tpot, 0.95),
    }


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def table(rows: list[dict]) -> str:
    lines = [
        "| model | clients | requests | tokens | agg tok/s | x 1 client | TTFT p50 | TTFT p95 | TPOT p50 | TPOT p95 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base: dict[str, float] = {}
    for r in rows:
        base.setdefault(r["model"], r["agg_tok_s"])
        lines.append(
            f"| {r['model']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['agg_tok_s']:.1f} | "
            f"{r['agg_tok_s'] / base[r['model']]:.2f} | {ms(r['ttft_p50_s'])} | {ms(r['ttft_p95_s'])} | "
            f"{ms(r['tpot_p50_s'])} | {ms(r['tpot_p95_s'])} |"
        )
    return "\n".join(lines)


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="small,olmoe-1b-7b")
    ap.add_argument("--clients", default="1,4,16", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--requests", type=int, default=2, help="requests per client, back to back")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64, help="generated tokens per request")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--budget", default=None, help="DRAM budget (tiered serving), e.g. cpu=150MiB")
    ap.add_argument("--tile-size", type=int, default=128)
    ap.add_argument("--dir", default="checkpoints", help="where synthetic checkpoints live")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--out", default="bench_out/serve.json")
    args = ap.parse_args()

    rows = []
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        path = checkpoint(preset, Path(args.dir), args.dtype)
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        with server(path, args, args.port) as url:
            for clients in args.clients:
                row = {"model": preset, **asyncio.run(run_level(url, clients, args, vocab, random.Random(clients)))}
                print(json.dumps(row), flush=True)
                rows.append(row)
    print()
    print(table(rows))
    env = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "args": {k: v for k, v in vars(args).items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
