"""Long contexts (issue 23): KV bytes per token, decode time per token up to 32K context, multi-turn chat TTFT.

Three parts (`--part kv|dsa|chat|all`):

- kv: KV-cache bytes per token per layer of the DeepSeek-V3 (the `deepseek-v3.2` preset's shape, with and without
  its DSA indexer keys), GLM-5 and DeepSeek-V2-Lite shapes, bf16: expanded (per-head keys [dn + dr] and values [dv],
  what the cache held before) vs latent (the model's own cache). Both come from the code's own allocation, not a
  formula: `KVCache.paged(..., heads=H, k_dim=dn+dr, v_dim=dv, device="meta")` and `model.allocate_paged(1, 1)` of
  the model skeleton built on the meta device (no weights; ~20 s per 256-expert skeleton). Also the ratio and the
  bytes a 32K-token conversation needs.
- dsa: batch-1 decode time per output token (TPOT) at `--contexts` (1K, 4K, 16K, 32K) on a small DeepSeek-V3.2-style
  (DSA) synthetic bf16 model written to a temporary folder (`DSA_SHAPE`, printed; `--dsa-config` changes fields):
  a random prompt of each length, prefilled in chunks of `--prefill-chunk`, then `--decode` greedy tokens
  (ignore_eos); TPOT = the decode steps' mean seconds (`llm.stats().steps`; the first token comes from the prefill
  step). Rounds are interleaved over the contexts (1K 4K 16K 32K 1K ...). One `LLM` with prefix caching and a KV
  budget that could hold every context: prompt blocks still cached from an earlier round are reused (printed as
  cached tokens; the engine evicts cached blocks before it grows its pool, so most are recomputed); decode is what
  is timed. The 32K prefill is quadratic (dense attention over the expanded latents, indexer scores): estimated at
  several minutes per round on this 2-core CPU, most of the part's time.
  Target: 32K TPOT <= 1.5x 1K TPOT.
- chat: a multi-turn chat on `--model`: `--turns` turns; turn 1 is `--turn-tokens` random token ids, turn i's prompt
  is turn i-1's plus `--turn-tokens` new ids (the reply and the next user message, fixed so that every system sees
  the same conversation), `--reply` greedy tokens per turn. Time to first token per turn of
  A = TileMEM with prefix caching (one `LLM`, turns in order), B = TileMEM with `prefix_caching=False`,
  C = `llama-server` on `--gguf` (the same model as a bf16 GGUF) with its prompt cache (`/completion`,
  `cache_prompt`, prompts as token-id lists, one slot), timed by its HTTP response (first streamed chunk with
  `--reply` > 1); its own `timings.prompt_n` / `prompt_ms` show what it recomputed. Each system runs alone (a
  subprocess for A and B, the server stopped after C: a 13 GB model does not fit twice in 24 GiB), rounds
  interleaved A B C A B C; each warms up on an unrelated prompt first. Same `--threads` for all.
  Targets: A's turn-8 TTFT <= 1.5x its turn-1 TTFT, and <= llama-server's turn-8 TTFT.

    .venv/bin/python benchmarks/long_context.py --part kv
    .venv/bin/python benchmarks/long_context.py --part dsa --rounds 2 --json bench_out/long_context_dsa.json
    .venv/bin/python benchmarks/long_context.py --part chat --model /work/ckpt/olmoe-1b-7b \\
        --gguf /work/gguf/olmoe-1b-7b-bf16.gguf --rounds 2 --json bench_out/long_context_chat.json

The GGUF: `/work/convenv/bin/python /work/llamacpp/convert_gguf.py CKPT --outtype bf16 --outfile X.gguf` (a Python
with torch and gguf: /work/llamacpp/venv has neither).
Ratios are per round (the spread is printed); nothing is asserted. `--json OUT` writes every figure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

KV_SHAPES = (
    ("DeepSeek-V3 (deepseek-v3.2 shape, no indexer)", "deepseek-v3.2", False),
    ("DeepSeek-V3.2 (with DSA indexer keys)", "deepseek-v3.2", True),
    ("GLM-5 (with DSA indexer keys)", "glm-5", True),
    ("DeepSeek-V2-Lite", "deepseek-v2-lite", False),
)
CONVERSATION = 32768

DSA_SHAPE: dict[str, Any] = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1536,
    moe_intermediate_size=512,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=8,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=4,
    first_k_dense_replace=1,
    n_group=4,
    topk_group=2,
    q_lora_rank=256,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    index_topk=512,
    index_n_heads=4,
    index_head_dim=128,
    max_position_embeddings=34816,
    rope_scaling=dict(
        type="yarn", factor=8.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0,
        mscale_all_dim=1.0,
    ),
)  # fmt: skip
"""The DSA model of `--part dsa`: DeepSeek-V3's latent shape (kv_lora_rank 512, rope 64, nope 128, v 128), the
indexer at half the attention heads and index_head_dim 128 as DeepSeek-V3.2, top-512 keys; ~85 MB of weights read
per token against ~8.6 MB of latent + indexer keys at 1K context, so weights dominate there, as in a real model."""


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def spread(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


# -- part kv --------------------------------------------------------------------------------------------------
def skeleton(preset: str):
    """The model of a preset's config, built on the meta device without weights, in bf16."""
    from tilemem.models.model import MoECausalLM
    from tilemem.models.registry import config_from_hf
    from tilemem.synth.presets import resolve_preset
    from tilemem.synth.writer import hf_config

    fam, fields = resolve_preset(None, preset)
    cfg = config_from_hf(hf_config(fam, fields, torch.bfloat16, 1), preset)
    return cfg, MoECausalLM(cfg).to(torch.bfloat16)


def layer_bytes(pools: list, layers: int) -> float:
    """Mean bytes of one position over the first `layers` pools (the decoder layers; MTP layers left out)."""
    return sum(t.numel() * t.element_size() for t in pools[:layers] if t is not None) / layers


def part_kv(args: argparse.Namespace) -> dict:
    """Bytes per token per layer, expanded vs latent, from the allocations of `KVCache.paged` and the model."""
    from tilemem.layers.kv_cache import KVCache

    models = {}
    rows = []
    for label, preset, with_index in KV_SHAPES:
        if preset not in models:
            t0 = time.perf_counter()
            models[preset] = skeleton(preset)
            print(f"built the {preset} skeleton on meta in {time.perf_counter() - t0:.1f} s", flush=True)
        cfg, model = models[preset]
        layers = cfg.num_layers
        cache = model.allocate_paged(1, 1)  # one block of one position, every layer (+ MTP layers)

        latent = layer_bytes(cache.keys, layers) + layer_bytes(cache.values, layers)
        index = layer_bytes(cache.index_keys, layers) if with_index else 0.0
        h, dn, dr, dv = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        expanded = KVCache.paged(1, 1, 1, heads=h, k_dim=dn + dr, v_dim=dv, dtype=torch.bfloat16, device="meta")
        exp = float(expanded.nbytes())
        whole = model.kv_block_bytes(1) / len(cache.keys)  # the engine's own figure per block, per cache layer
        rows.append(
            dict(
                shape=label, preset=preset, layers=layers, heads=h, kv_lora_rank=cfg.kv_lora_rank, dn=dn, dr=dr,
                dv=dv, expanded=exp + index, latent=latent + index, index=index, ratio=(exp + index) / (latent + index),
                expanded_32k=(exp + index) * layers * CONVERSATION, latent_32k=(latent + index) * layers * CONVERSATION,
                kv_block_bytes_per_layer=whole,
            )
        )  # fmt: skip
    print(
        f"\nKV cache per token per layer, bf16, from the code's own allocation, not a formula: expanded = "
        f"KVCache.paged(heads=H, k_dim=dn+dr, v_dim=dv).nbytes() (what the cache held before), latent = the model's "
        f"allocate_paged (kv_lora_rank + rope dim); 'indexer' rows add the DSA indexer keys to both. A "
        f"{CONVERSATION // 1024}K-token conversation over every decoder layer."
    )
    print("| shape | layers | H x (dn+dr, dv) | expanded B/token/layer | latent B/token/layer | expanded / latent "
          f"| {CONVERSATION // 1024}K tokens expanded | latent |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['shape']} | {r['layers']} | {r['heads']} x ({r['dn'] + r['dr']}, {r['dv']}) "
        print(
            f"{head}| {r['expanded']:,.0f} | {r['latent']:,.0f} | {r['ratio']:.1f}x | {fmt_bytes(r['expanded_32k'])} "
            f"| {fmt_bytes(r['latent_32k'])} |"
        )
    print("(model.kv_block_bytes(1) per cache layer, MTP layers included: "
          + ", ".join(f"{p} {models[p][1].kv_block_bytes(1) / len(models[p][1].allocate_paged(1, 1).keys):,.0f} B"
                      for p in models) + ")")  # fmt: skip
    return {"rows": rows}


# -- part dsa -------------------------------------------------------------------------------------------------
def dsa_checkpoint(args: argparse.Namespace, root: Path) -> tuple[Path, dict]:
    from tilemem.synth.writer import synthesize

    shape = {**DSA_SHAPE, **json.loads(args.dsa_config or "{}")}
    shape["max_position_embeddings"] = max(shape["max_position_embeddings"], max(args.contexts) + args.decode + 64)
    out = root / "dsa"
    synthesize("deepseek_v32", "tiny", out, dtype="bf16", overrides=shape, progress=False)
    return out, shape


def meta_model(path: Path):
    """The model of a checkpoint's config.json on the meta device (no weights), in bf16."""
    from tilemem.models.model import MoECausalLM
    from tilemem.models.registry import config_from_hf

    return MoECausalLM(config_from_hf(json.loads((path / "config.json").read_text()))).to(torch.bfloat16)


def part_dsa(args: argparse.Namespace) -> dict:
    """Batch-1 TPOT at each context on the small DSA model, rounds interleaved over the contexts."""
    from tilemem.engine.llm import LLM
    from tilemem.engine.sampling import SamplingParams

    root = Path(tempfile.mkdtemp(prefix="tilemem-long-", dir="/tmp"))
    try:
        path, shape = dsa_checkpoint(args, root)
        weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        longest = max(args.contexts) + args.decode + 16
        per_token = sum(args.contexts) + len(args.contexts) * (args.decode + 32)
        kv_token = meta_model(path).kv_block_bytes(16) / 16  # the engine's own figure: latent + indexer keys
        kv_budget = int(per_token * kv_token * 1.25) + (64 << 20)  # every context's blocks stay cached
        t0 = time.perf_counter()
        llm = LLM(
            str(path), dtype="bf16", threads=args.threads, max_batch=1, max_model_len=longest,
            prefill_chunk=args.prefill_chunk or 1024, kv_memory=f"{kv_budget}B",
        )  # fmt: skip
        print(f"DSA model (deepseek_v32 tiny + {json.dumps(shape)}): {weights / 2**20:.0f} MiB of weights, KV "
              f"{kv_token:,.0f} B per token (all layers, latent + indexer keys); loaded in "
              f"{time.perf_counter() - t0:.1f} s; KV budget {fmt_bytes(kv_budget)}, prefill chunk "
              f"{llm.prefill_chunk}, {args.threads} threads", flush=True)  # fmt: skip
        vocab = llm.config.vocab_size
        gen = torch.Generator().manual_seed(1)
        prompts = {c: torch.randint(10, vocab - 1, (c,), generator=gen).tolist() for c in args.contexts}
        params = SamplingParams(max_tokens=args.decode, temperature=0, ignore_eos=True)
        warm = [(7 * i + 3) % (vocab - 11) + 10 for i in range(64)]
        llm.generate([warm], SamplingParams(max_tokens=4, temperature=0))
        runs: dict[int, list[dict]] = {c: [] for c in args.contexts}
        for r in range(args.rounds):
            for c in args.contexts:
                t1 = time.perf_counter()
                out = llm.generate([prompts[c]], params)[0]
                wall = time.perf_counter() - t1
                s = llm.stats()
                steps = [st["seconds"] for st in s.steps if not st["prefill"]]
                tpot = sum(steps) / len(steps) if steps else float("nan")
                row = dict(tpot_s=tpot, steps_s=steps, decode_tokens=len(out.token_ids), ttft_s=out.ttft_s,
                           cached_tokens=out.cached_tokens, wall_s=wall, kv=s.kv)  # fmt: skip
                runs[c].append(row)
                print(f"round {r + 1} context {c}: TPOT {1e3 * tpot:.2f} ms over {len(steps)} decode steps "
                      f"(min {1e3 * min(steps, default=0):.2f}), prefill {out.ttft_s:.1f} s with {out.cached_tokens} "
                      f"cached tokens, KV {fmt_bytes(s.kv['kv_bytes'])}, preemptions {s.kv['preemptions']}",
                      flush=True)  # fmt: skip
        llm.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = args.contexts[0]
    print(
        f"\nbatch-1 decode, {args.decode} greedy tokens after a random prompt of each length, {args.threads} "
        f"threads; TPOT in ms, median over {args.rounds} rounds; ratio to the {base}-token context (per round)"
    )
    print("| context | TPOT ms | rounds ms | ratio to " + str(base) + " |")
    print("|---|---|---|---|")
    result = {"shape": shape, "contexts": {}}
    for c in args.contexts:
        t = [x["tpot_s"] for x in runs[c]]
        ratios = [x / y for x, y in zip(t, [x["tpot_s"] for x in runs[base]], strict=True)]
        med = statistics.median(ratios)
        print(f"| {c} | {1e3 * statistics.median(t):.2f} | {spread([1e3 * x for x in t])} | {med:.2f} "
              f"({spread(ratios)}) |")  # fmt: skip
        result["contexts"][c] = {"runs": runs[c], "tpot_s": statistics.median(t), "ratio": med, "ratios": ratios}
    last = args.contexts[-1]
    print(f"\n{last}-token TPOT / {base}-token TPOT: {result['contexts'][last]['ratio']:.2f} (target <= 1.5)")
    return result


# -- part chat ------------------------------------------------------------------------------------------------
def conversation(vocab: int, turns: int, tokens: int) -> list[list[int]]:
    """The prompts of every turn: turn i's is turn i-1's plus `tokens` new random ids."""
    gen = torch.Generator().manual_seed(23)
    ids: list[int] = []
    out = []
    for _ in range(turns):
        ids = ids + torch.randint(10, vocab - 1, (tokens,), generator=gen).tolist()
        out.append(ids)
    return out


def warmup_prompt(vocab: int, tokens: int) -> list[int]:
    """A prompt sharing no prefix with the conversation (warms up a full-size turn)."""
    gen = torch.Generator().manual_seed(99)
    return torch.randint(10, vocab - 1, (tokens,), generator=gen).tolist()


def chat_vocab(model: str) -> int:
    from tilemem.loader.checkpoint import Checkpoint

    return Checkpoint.open(model).config.vocab_size


def tilemem_turns(args: argparse.Namespace) -> dict:
    """One TileMEM system (worker process): every turn in order on one LLM; TTFT per turn."""
    from tilemem.engine.llm import LLM
    from tilemem.engine.sampling import SamplingParams

    caching = args.worker == "A"
    t0 = time.perf_counter()
    kw = {"prefill_chunk": args.prefill_chunk} if args.prefill_chunk else {}
    llm = LLM(args.model, dtype="bf16", threads=args.threads, max_batch=1, prefix_caching=caching,
              max_model_len=args.turns * args.turn_tokens + args.reply + 32, **kw)  # fmt: skip
    load_s = time.perf_counter() - t0
    vocab = llm.config.vocab_size
    params = SamplingParams(max_tokens=args.reply, temperature=0, ignore_eos=True)
    llm.generate([warmup_prompt(vocab, args.turn_tokens)], params)
    turns = []
    timed = {int(t) for t in args.b_turns.split(",")} if not caching else set(range(1, args.turns + 1))
    for i, prompt in enumerate(conversation(vocab, args.turns, args.turn_tokens), 1):
        if i not in timed:  # without a prefix cache a turn does not depend on the others: skip it
            turns.append(dict(ttft_s=None, wall_s=None, prompt=len(prompt), cached=0))
            continue
        t1 = time.perf_counter()
        out = llm.generate([prompt], params)[0]
        wall = time.perf_counter() - t1
        turns.append(dict(ttft_s=out.ttft_s, wall_s=wall, prompt=len(prompt), cached=out.cached_tokens))
    kv = llm.stats().kv
    llm.close()
    return {"load_s": load_s, "turns": turns, "kv": kv}


def tilemem_system(args: argparse.Namespace, name: str) -> dict:
    cmd = [sys.executable, __file__, "--part", "chat", "--worker", name, "--model", args.model]
    cmd += ["--threads", str(args.threads), "--turns", str(args.turns), "--turn-tokens", str(args.turn_tokens)]
    cmd += ["--reply", str(args.reply), "--b-turns", args.b_turns]
    cmd += ["--prefill-chunk", str(args.prefill_chunk)] if args.prefill_chunk else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"system {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def llama_server(args: argparse.Namespace):
    """`llama-server` on `--gguf`, one slot, context for the whole conversation; yields its port."""
    port = free_port()
    ctx = max(4608, args.turns * args.turn_tokens + args.reply + 64)
    exe = Path(args.llama_server)
    cmd = [str(exe), "-m", args.gguf, "-c", str(ctx), "-np", "1", "-t", str(args.threads), "-tb", str(args.threads)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--no-webui"]
    env = {**os.environ, "LD_LIBRARY_PATH": f"{exe.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + args.server_timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"llama-server exited ({proc.returncode}):\n{log.read().decode()[-3000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            finally:
                conn.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server not ready after {args.server_timeout} s")
            time.sleep(0.5)
        yield port
    except Exception:
        log.seek(0)
        print(f"llama-server's log, last lines:\n{log.read().decode(errors='replace')[-3000:]}", file=sys.stderr)
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def completion(port: int, prompt: list[int], n_predict: int) -> dict:
    """One `/completion` with the prompt cache, on a fresh connection (stdlib http.client: no client set-up cost, no
    stale kept-alive connection): seconds to the first token, the whole response, and the server's timings."""
    body = {"prompt": prompt, "n_predict": n_predict, "cache_prompt": True, "temperature": 0, "ignore_eos": True}
    body["stream"] = n_predict > 1
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    try:
        conn.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"llama-server answered {r.status}: {r.read()[:500]!r}")
        if n_predict == 1:
            data = r.read()
            ttft = time.perf_counter() - t0
            return {"ttft_s": ttft, "wall_s": ttft, "timings": json.loads(data).get("timings", {})}
        ttft, timings = None, {}
        while line := r.readline():
            if not line.startswith(b"data: "):
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            timings = json.loads(line[6:]).get("timings", timings)
        return {"ttft_s": ttft, "wall_s": time.perf_counter() - t0, "timings": timings}
    finally:
        conn.close()


def llama_turns(args: argparse.Namespace, vocab: int) -> dict:
    """System C: every turn in order on a fresh llama-server; TTFT per turn and what the server recomputed."""
    t0 = time.perf_counter()
    with llama_server(args) as port:
        load_s = time.perf_counter() - t0
        completion(port, warmup_prompt(vocab, args.turn_tokens), args.reply)
        turns = []
        for prompt in conversation(vocab, args.turns, args.turn_tokens):
            res = completion(port, prompt, args.reply)
            t = res["timings"]
            turns.append(dict(ttft_s=res["ttft_s"], wall_s=res["wall_s"], prompt=len(prompt), cached=t.get("cache_n"),
                              prompt_n=t.get("prompt_n"), prompt_ms=t.get("prompt_ms")))  # fmt: skip
    return {"load_s": load_s, "turns": turns}


def check_chat_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a chat run that would fail after the other parts ran."""
    if not args.model:
        p.error("--part chat needs --model (and --gguf for llama-server, or --no-llama-server)")
    if args.no_llama_server:
        return
    if not (args.gguf and Path(args.gguf).is_file()):
        p.error(f"--gguf {args.gguf!r} is not a file: give the model as a bf16 GGUF, or --no-llama-server")
    if not Path(args.llama_server).is_file():
        p.error(f"no llama-server at {args.llama_server}: build it (../shared/tools/build_llamacpp.sh)")


def part_chat(args: argparse.Namespace) -> dict:
    vocab = chat_vocab(args.model)
    systems = ["A", "B"] + ([] if args.no_llama_server else ["C"])
    names = {"A": "TileMEM, prefix caching", "B": "TileMEM, no prefix caching", "C": "llama-server, prompt cache"}
    print(f"chat on {args.model}: {args.turns} turns of +{args.turn_tokens} tokens (turn {args.turns}: "
          f"{args.turns * args.turn_tokens} tokens), {args.reply} reply token(s), {args.threads} threads; "
          f"systems: {', '.join(f'{s} = {names[s]}' for s in systems)}", flush=True)  # fmt: skip
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for r in range(args.rounds):
        for s in systems:
            res = tilemem_system(args, s) if s != "C" else llama_turns(args, vocab)
            runs[s].append(res)
            line = ", ".join("-" if t["ttft_s"] is None else f"{t['ttft_s']:.3f}" for t in res["turns"])
            extra = ""
            if s == "A":
                extra = "; cached tokens " + ", ".join(str(t["cached"]) for t in res["turns"])
            if s == "C":
                extra = "; prompt_n " + ", ".join(str(t["prompt_n"]) for t in res["turns"])
                extra += " (prompt_ms " + ", ".join(f"{t['prompt_ms'] or 0:.0f}" for t in res["turns"]) + ")"
            print(f"round {r + 1} {s}: load {res['load_s']:.1f} s, TTFT per turn s: {line}{extra}", flush=True)

    def median_ttft(s: str, i: int) -> float | None:
        times = [x["turns"][i]["ttft_s"] for x in runs[s] if x["turns"][i]["ttft_s"] is not None]
        return statistics.median(times) if times else None

    med = {s: [median_ttft(s, i) for i in range(args.turns)] for s in systems}
    print(f"\nTTFT per turn, seconds, median over {args.rounds} rounds (wall clock, request to first token)")
    print("| turn | prompt tokens | " + " | ".join(f"{s}: {names[s]}" for s in systems) + " |")
    print("|---" * (2 + len(systems)) + "|")
    for i in range(args.turns):
        cells = " | ".join("-" if med[s][i] is None else f"{med[s][i]:.3f}" for s in systems)
        print(f"| {i + 1} | {(i + 1) * args.turn_tokens} | {cells} |")
    last = args.turns - 1
    a_ratio = [x["turns"][last]["ttft_s"] / x["turns"][0]["ttft_s"] for x in runs["A"]]
    b_ratio = [x["turns"][last]["ttft_s"] / x["turns"][0]["ttft_s"] for x in runs["B"]]
    print(f"\nA turn-{args.turns} / turn-1 TTFT: {statistics.median(a_ratio):.2f} ({spread(a_ratio)}) "
          "(target <= 1.5)")  # fmt: skip
    print(f"B turn-{args.turns} / turn-1 TTFT: {statistics.median(b_ratio):.2f} ({spread(b_ratio)})")
    ab = [a["turns"][last]["ttft_s"] / b["turns"][last]["ttft_s"] for a, b in zip(runs["A"], runs["B"], strict=True)]
    print(f"A / B turn-{args.turns} TTFT: {statistics.median(ab):.2f} ({spread(ab)})")
    result: dict[str, Any] = {"runs": runs, "median_ttft_s": med, "a_last_over_first": a_ratio, "a_over_b": ab}
    if "C" in systems:
        pairs = zip(runs["A"], runs["C"], strict=True)
        ac = [a["turns"][last]["ttft_s"] / c["turns"][last]["ttft_s"] for a, c in pairs]
        print(f"A / llama-server turn-{args.turns} TTFT: {statistics.median(ac):.2f} ({spread(ac)}) (target <= 1)")
        result["a_over_c"] = ac
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="all", choices=("kv", "dsa", "chat", "all"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (dsa: over the contexts; chat: A B C)")
    p.add_argument("--json", default=None, help="write every figure to this file")
    p.add_argument("--prefill-chunk", type=int, default=None, help="prompt tokens per step (dsa: 1024; chat: LLM's)")
    g = p.add_argument_group("dsa")
    g.add_argument("--contexts", default="1024,4096,16384,32768", help="context lengths, comma-separated")
    g.add_argument("--decode", type=int, default=16, help="greedy tokens decoded per context")
    g.add_argument("--dsa-config", default=None, help="JSON of config fields to change in DSA_SHAPE")
    g = p.add_argument_group("chat")
    g.add_argument("--model", default=None, help="checkpoint (the lead's: /work/ckpt/olmoe-1b-7b)")
    g.add_argument("--gguf", default=None, help="the same model as a bf16 GGUF, for llama-server")
    g.add_argument("--llama-server", default="/work/llamacpp/bin/llama-server")
    g.add_argument("--no-llama-server", action="store_true", help="run A and B only")
    g.add_argument("--turns", type=int, default=8)
    g.add_argument("--turn-tokens", type=int, default=500, help="new tokens per turn (turn 1's prompt too)")
    g.add_argument("--reply", type=int, default=1, help="tokens generated per turn")
    g.add_argument("--b-turns", default="1,8", help="turns B (no prefix cache: each turn independent) times")
    g.add_argument("--server-timeout", type=float, default=600, help="seconds llama-server may take to load")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.contexts = [int(c) for c in str(args.contexts).split(",")]
    if args.worker:
        print(json.dumps(tilemem_turns(args)))
        return
    if args.part in ("chat", "all"):
        check_chat_args(p, args)
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} (1 min), {os.cpu_count()} CPUs", flush=True)
    if load[0] > 0.5:  # seen here: 2 threads on a 2-core machine with one busy core run tiny steps 30x slower
        print("WARNING: other processes are running; timings at --threads = the core count are unreliable", flush=True)
    result: dict[str, Any] = {"load_average": load}
    if args.part in ("kv", "all"):
        result["kv"] = part_kv(args)
    if args.part in ("dsa", "all"):
        result["dsa"] = part_dsa(args)
    if args.part in ("chat", "all"):
        result["chat"] = part_chat(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
