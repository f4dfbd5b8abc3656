"""GPU benchmark: expert tiles split between VRAM and DRAM (the KTransformers setting), on one GPU.

On a synthetic OLMoE-1B-7B (bf16, routing skew 1.0; `--layers` keeps the first N layers to save
time), batch 1, 256-token prompt, interleaved over rounds in one process:
- all-resident on the GPU (tilemem and transformers), the ceiling;
- all-resident on the CPU (tilemem, every core), the host-only baseline;
- a VRAM budget of non-expert weights + `--cuda-pct` % of the expert bytes, the rest in DRAM:
  kt_expert (whole hot experts in VRAM, as KTransformers places them) vs TilePO policies, planned
  from a profile of the mixed workload. VRAM tiles run on the GPU while the CPU computes its tiles;
  prefill ships DRAM tiles to the GPU (`gpu_min_tokens`).
Prints prefill / decode tok/s medians, the spread, ratios, and the share of expert bytes each plan
computes on the GPU per decode token.

    python benchmarks/gpu.py [--layers 8] [--rounds 3] [--cuda-pct 35] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

POLICIES = ["kt_expert", "tilepo_fine", "tilepo_adaptive"]


def prompt(vocab: int, n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 1, (n,), generator=gen).tolist()


def run_tilemem(llm, ids: list[int], decode: int) -> dict:
    from tilemem.engine.sampling import SamplingParams

    before = llm.tiered.counters.gpu_bytes if llm.tiered else 0
    before_dram = llm.tiered.counters.dram_bytes if llm.tiered else 0
    llm.generate([ids], SamplingParams(max_tokens=decode, temperature=0, ignore_eos=True))
    s = llm.stats()
    out = {"prefill": s.prefill_tok_s, "decode": s.decode_tok_s}
    if llm.tiered:
        gpu = llm.tiered.counters.gpu_bytes - before
        dram = llm.tiered.counters.dram_bytes - before_dram
        out["gpu_share"] = gpu / max(gpu + dram, 1)
    return out


def run_transformers(model, ids: list[int], decode: int) -> dict:
    x = torch.tensor([ids], device="cuda")
    with torch.inference_mode():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(x, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
        cache = out.past_key_values
        t0 = time.perf_counter()
        for _ in range(decode - 1):
            out = model(tok, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        decode_s = time.perf_counter() - t0
    return {"prefill": len(ids) / prefill_s, "decode": (decode - 1) / decode_s}


def build(args: argparse.Namespace):
    from tilemem.engine.llm import LLM
    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.models.topology import Topology
    from tilemem.placement.profile import Profile
    from tilemem.runtime.setup import make_plan
    from tilemem.runtime.tiered import TieredConfig
    from tilemem.synth.writer import synthesize
    from tilemem.tools.profiler import profile_checkpoint
    from tilemem.workloads.workload import load_workload

    path = Path(args.dir)
    if not (path / "config.json").exists():
        over = {"num_hidden_layers": args.layers} if args.layers else None
        synthesize("olmoe", "olmoe-1b-7b", path, seed=0, routing_skew=1.0, dtype="bf16", overrides=over)
    ckpt = Checkpoint.open(path)
    topo = Topology.from_config(ckpt.config)
    prof_file = path.parent / f"{path.name}.profile.json"
    if prof_file.exists():
        profile = Profile.load(prof_file, topo)
    else:
        profile = profile_checkpoint(path, load_workload("mixed", seed=0), args.profile_tokens, dtype="bf16")
        profile.save(prof_file)
    cuda = topo.non_expert_bytes + topo.shared_and_dense_bytes + int(args.cuda_pct / 100 * topo.routed_expert_bytes)
    engines = {"gpu resident": LLM(path, dtype="bf16", device="cuda")}
    for pol in POLICIES:
        plan = make_plan(ckpt, f"cuda={cuda}B,cpu=inf", pol, profile, args.tile)
        engines[f"{pol} {args.cuda_pct:g}%"] = LLM(
            path, dtype="bf16", plan=plan, profile=profile, tile=args.tile, runtime=TieredConfig(prefetch=False)
        )
    engines["cpu resident"] = LLM(path, dtype="bf16", device="cpu")
    shares = [lp.top_share(0.25) for lp in profile.layers]
    return path, topo, engines, shares


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="checkpoint dir (built if missing)")
    ap.add_argument("--layers", type=int, default=0, help="keep the first N layers (0: all 16)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--cuda-pct", type=float, default=35.0)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--profile-tokens", type=int, default=512)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="host threads (0: every core); fewer mimics a desktop")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU; on a CPU-only machine use benchmarks/offload.py")
    args.dir = args.dir or f"checkpoints/olmoe-1b-7b{f'-l{args.layers}' if args.layers else ''}"
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    path, topo, engines, shares = build(args)
    hf = None
    if not args.no_transformers:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    ids = prompt(engines["gpu resident"].config.vocab_size, args.prompt_len)
    warm = ids[:16]
    for llm in engines.values():
        run_tilemem(llm, warm, 4)
    if hf is not None:
        run_transformers(hf, warm, 4)
    runs: dict[str, list[dict]] = {k: [] for k in [*engines, *(["transformers gpu"] if hf else [])]}
    for r in range(args.rounds):
        for name, llm in engines.items():
            runs[name].append(run_tilemem(llm, ids, args.decode))
        if hf is not None:
            runs["transformers gpu"].append(run_transformers(hf, ids, args.decode))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]['decode']:.1f}" for k, v in runs.items()), flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[name])

    def spread(name: str, key: str) -> float:
        v = [x[key] for x in runs[name]]
        return (max(v) - min(v)) / statistics.median(v)

    gpu_name = torch.cuda.get_device_name(0)
    print(f"\n{gpu_name}, {threads} of {os.cpu_count()} CPU threads; checkpoint {path} ({len(topo.layers)} layers)")
    print(f"routing mass on the top quarter of experts (profile, median over layers): {statistics.median(shares):.2f}")
    print(f"VRAM budget: non-expert + shared + {args.cuda_pct:g}% of routed expert bytes; rest in DRAM\n")
    print("| engine | prefill tok/s | decode tok/s | decode spread | expert bytes on GPU / token |")
    print("|---|---|---|---|---|")
    for name, v in runs.items():
        share = f"{100 * statistics.median(x['gpu_share'] for x in v):.0f}%" if "gpu_share" in v[0] else "-"
        dec, pre, sp = med(name, "decode"), med(name, "prefill"), 100 * spread(name, "decode")
        print(f"| {name} | {pre:.0f} | {dec:.2f} | {sp:.0f}% | {share} |")
    base = f"kt_expert {args.cuda_pct:g}%"
    tile_runs = [k for k in runs if k.startswith("tilepo")]
    best = max(tile_runs, key=lambda k: med(k, "decode"))
    print(
        f"\nbest TilePO ({best}) decode {med(best, 'decode') / med(base, 'decode'):.2f}x kt_expert, "
        f"prefill {med(best, 'prefill') / med(base, 'prefill'):.2f}x; vs cpu resident decode "
        f"{med(best, 'decode') / med('cpu resident', 'decode'):.2f}x; gpu resident / cpu resident decode "
        f"{med('gpu resident', 'decode') / med('cpu resident', 'decode'):.2f}x"
    )
    if hf is not None:
        ratio = {k: med("gpu resident", k) / med("transformers gpu", k) for k in ("decode", "prefill")}
        print(f"gpu resident vs transformers (GPU): decode {ratio['decode']:.2f}x, prefill {ratio['prefill']:.2f}x")


if __name__ == "__main__":
    main()
