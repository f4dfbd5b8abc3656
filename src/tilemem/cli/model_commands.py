"""Sub-commands that work on one checkpoint: synth, inspect, generate, demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tilemem.cli.engine_flags import add_engine_args, checkpoint_tile, engine_args_from_namespace
from tilemem.engine.sampling import SamplingParams
from tilemem.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    """Add synth, inspect, generate and demo to `sub`."""
    p = sub.add_parser("synth", help="write a synthetic Hugging Face checkpoint with random weights")
    p.add_argument("family", nargs="?", help="model family (implied by real-shape presets)")
    p.add_argument("--preset", default="tiny", help="tiny, small, olmoe-1b-7b, mixtral-8x7b, qwen3-30b-a3b, ...")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--routing-skew",
        type=float,
        default=0.0,
        help="0 = even; 1 = realistic (top quarter of experts: ~53%% of routing)",
    )
    p.add_argument(
        "--dtype",
        default="bf16",
        help="bf16, fp16, fp32, or fp8 (FP8 e4m3 with 128x128 block scales, as DeepSeek-V3 publishes)",
    )
    p.add_argument(
        "--scale-fmt",
        choices=["float32", "ue8m0"],
        default="float32",
        help="fp8: block scales as fp32 or ue8m0 powers of two",
    )
    p.add_argument(
        "--format", choices=["hf", "gguf"], default="hf", help="hf: a safetensors folder; gguf: one .gguf file (--out)"
    )
    p.add_argument(
        "--quant",
        default="q4_k_m",
        help="gguf: f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m or q6_k (llama.cpp's mixes)",
    )
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--mtp", action="store_true", help="also write multi-token-prediction layers (DeepSeek/GLM)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out that is not an earlier synth checkpoint (replaces only synth's files)",
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("inspect", help="print a checkpoint's MoE topology")
    p.add_argument("model")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("generate", help="generate text, streaming to the terminal")
    p.add_argument("model")
    add_generation_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "follow",
        help="run one rank (not 0) of a distributed run: compute its share of the experts for rank 0's steps",
    )
    p.add_argument("model")
    add_engine_args(p)
    p.set_defaults(func=cmd_follow)

    p = sub.add_parser("convert", help="pack a checkpoint's experts into a tile store (resumable)")
    p.add_argument("model")
    p.add_argument("--out", required=True, help="tile store directory")
    p.add_argument(
        "--tile-size", type=int, default=None, help="neurons per tile (default 128; a K-quant GGUF file: 256)"
    )
    p.add_argument(
        "--tile-format",
        choices=("auto", "x12", "plain"),
        default="auto",
        help="bf16 tiles: x12 (lossless, 12 bits per weight), plain, or auto (x12 where it is smaller)",
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("verify", help="check every tile's sha256 in a tile store")
    p.add_argument("store")
    p.add_argument("--model", default=None, help="also check that the store matches this checkpoint's weights")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("bench", help="run the ablation matrix; write evidence, report, plots and the gate")
    p.add_argument("model")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--workloads", default="mixed", help="comma-separated workloads")
    p.add_argument("--budgets", default="20%,35%,50%", help="DRAM budgets: %% of routed-expert bytes or cpu=SIZE")
    p.add_argument("--policies", default="uniform,kt_expert,tilepo_coarse,tilepo_fine,tilepo_hybrid,tilepo_adaptive")
    p.add_argument("--async", dest="async_modes", default="off", help="off, on, or off,on")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=32)
    add_engine_args(p, include=("threads", "tile", "store"), defaults={"threads": 2})
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="synthesize the demo model (if needed), generate, print stats")
    p.add_argument("--dir", default="checkpoints/demo-small", help="where the demo checkpoint lives")
    add_engine_args(p, include=("threads",))
    p.set_defaults(func=cmd_demo)


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Prompt and sampling options of generate-like commands, and the engine flags (from EngineArgs)."""
    p.add_argument("--prompt", default="def fibonacci(n):", help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stats", action="store_true", help="print throughput, memory and tier counters")
    add_engine_args(p, exclude=("max_batch",))


def cmd_synth(args: argparse.Namespace) -> int:
    from tilemem.synth.writer import synthesize

    overrides = {"num_hidden_layers": args.layers} if args.layers else None
    if args.format == "gguf":
        from tilemem.synth.gguf_writer import synthesize_gguf

        out = synthesize_gguf(args.family, args.preset, args.out, args.quant, args.seed, args.routing_skew, overrides)
        print(f"wrote {out}")
        return 0
    out = synthesize(
        args.family,
        args.preset,
        args.out,
        args.seed,
        args.routing_skew,
        args.dtype,
        overrides=overrides,
        mtp=args.mtp,
        overwrite=args.overwrite,
        scale_fmt=args.scale_fmt,
    )
    print(f"wrote {out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.models.topology import Topology

    ckpt = Checkpoint.open(args.model)
    print(describe(ckpt.config, Topology.from_config(ckpt.config)))
    if hasattr(ckpt, "quant_types"):  # a GGUF file: its tensor types and what one expert really takes
        types = ", ".join(f"{k} x{n}" for k, n in sorted(ckpt.quant_types().items(), key=lambda kv: -kv[1]))
        g = ckpt.file
        stacks = [t for name, t in g.tensors.items() if name.endswith("_exps.weight")]  # blk.L.ffn_*_exps: [E, ...]
        layer = min(int(t.name.split(".")[1]) for t in stacks)
        per_expert = sum(t.nbytes // t.shape[0] for t in stacks if int(t.name.split(".")[1]) == layer)
        print(f"{'GGUF file':<24}  {fmt_bytes(g.nbytes)} in {len(g.parts)} part(s); tensor types: {types}")
        print(f"{'GGUF bytes per expert':<24}  {fmt_bytes(per_expert)} as stored (layer {layer})")
    return 0


def describe(cfg, topo) -> str:
    """Human-readable topology summary."""
    moe = topo.moe_layers
    dense = [lt.index for lt in topo.layers if not lt.is_moe]
    shared = cfg.num_shared_experts
    rows = [
        ("family", f"{cfg.family} ({cfg.architecture})"),
        ("layers", f"{cfg.num_layers} ({len(moe)} MoE, {len(dense)} dense{': ' + str(dense) if dense else ''})"),
        ("experts", f"{cfg.num_experts} routed per MoE layer, top-{cfg.top_k}"),
        ("shared experts", f"{shared} x width {cfg.shared_intermediate_size}" if shared else "none"),
        ("hidden / expert width", f"{cfg.hidden_size} / {cfg.moe_intermediate_size}"),
        ("attention", "MLA" if cfg.is_mla else f"{cfg.num_heads} heads, {cfg.num_kv_heads} kv heads"),
        (
            "dtype",
            topo.dtype
            if not cfg.weight_format
            else f"{topo.dtype}: FP8 weights with 128x128 block scales, the rest and activations {cfg.torch_dtype}",
        ),
        ("bytes per expert", fmt_bytes(topo.expert_bytes(moe[0])) if moe else "-"),
        ("routed expert bytes", fmt_bytes(topo.routed_expert_bytes)),
        ("shared + dense FFN bytes", fmt_bytes(topo.shared_and_dense_bytes)),
        ("non-expert bytes", fmt_bytes(topo.non_expert_bytes)),
        ("total parameters", fmt_count(topo.total_params)),
        ("active parameters", fmt_count(topo.active_params) + " per token"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def fmt_bytes(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit} ({n:,} B)"
    return f"{n} B"


def fmt_count(n: int) -> str:
    """A parameter count in B or M."""
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.3f} M"


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """SamplingParams from generate-like CLI options."""
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def stream_to_terminal(llm, prompt: str, params: SamplingParams, chat: bool = False) -> None:
    """Print the prompt, then each generated delta as it arrives."""
    if chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    sys.stdout.write(prompt)
    sys.stdout.flush()
    try:
        for delta in llm.stream(prompt, params):
            sys.stdout.write(delta)
            sys.stdout.flush()
    finally:  # end the line even when generation fails, so the error starts on its own
        sys.stdout.write("\n")


def cmd_convert(args: argparse.Namespace) -> int:
    from tilemem.runtime.tile_store import convert

    tile = args.tile_size or checkpoint_tile(args.model)
    out = convert(args.model, args.out, tile, tile_format=args.tile_format)
    print(f"wrote tile store {out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.runtime.tile_store import TileStore

    store = TileStore(args.store, Checkpoint.open(args.model) if args.model else None)
    bad = store.verify()
    if bad:
        print(f"{len(bad)} of {len(store.tiles)} tiles fail their sha256: {', '.join(bad[:10])}", file=sys.stderr)
        return 1
    print(f"all {len(store.tiles)} tiles of {args.store} match their sha256")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tilemem.bench.runner import BenchSpec, run_bench

    def split(text: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in text.split(",") if x.strip())

    engine = engine_args_from_namespace(args)  # range-checks --threads, --tile-size
    spec = BenchSpec(
        model=args.model,
        out=args.out,
        workloads=split(args.workloads),
        budgets=split(args.budgets),
        policies=split(args.policies),
        async_modes=tuple(m == "on" for m in split(args.async_modes)),
        repeats=args.repeats,
        prompt_tokens=args.prompt_tokens,
        decode_tokens=args.decode_tokens,
        threads=engine.threads,
        tile=engine.tile or checkpoint_tile(args.model),  # the placement benchmark's fine tiles
        store=engine.store,
    )
    evidence = run_bench(spec)
    gate = evidence["gate"]
    for c in gate["comparisons"]:
        print(
            f"{c['workload']} budget {c['budget']}: kt_expert {c['kt_expert']:.2f} tok/s, best TilePO "
            f"{c['best_policy']} {c['best']:.2f} tok/s ({c['gain']:.2f}x, beyond spread: {c['beyond_spread']})"
        )
    print(f"gate: {gate['result']} {gate['checks']}; report: {Path(args.out) / 'report.md'}")
    return 0


def llm_from_args(args: argparse.Namespace, **extra):
    """An LLM for generate-like commands: the EngineArgs of their flags (`extra` wins), all resident or
    tiered with --plan / --budget."""
    from tilemem.engine.llm import LLM

    return LLM.from_args(engine_args_from_namespace(args, **extra))


def cmd_generate(args: argparse.Namespace) -> int:
    from tilemem.engine.ranks import follow_run

    if follow_run(engine_args_from_namespace(args)):  # a rank other than 0: it computes, rank 0 prints
        return 0
    with llm_from_args(args) as llm:
        stream_to_terminal(llm, args.prompt, sampling_from_args(args), args.chat)
        if args.stats:
            print(llm.stats().line(), file=sys.stderr)
        if llm.speculator is not None:
            print(llm.speculator.stats.line(), file=sys.stderr)
    return 0


def cmd_follow(args: argparse.Namespace) -> int:
    from tilemem.engine.ranks import follow_run

    engine_args = engine_args_from_namespace(args)
    if not follow_run(engine_args):
        raise ConfigError(
            "`tilemem follow` runs a rank other than 0: give --world-size N --rank R (R from 1 to N-1) and rank 0's "
            "--master-addr/--master-port, or launch under torchrun; rank 0 runs `tilemem generate` or `serve`."
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tilemem.engine.llm import LLM
    from tilemem.models.topology import Topology
    from tilemem.synth.writer import synthesize

    path = Path(args.dir)
    if not (path / "config.json").exists():
        print(f"synthesizing the demo checkpoint (olmoe small, routing skew 1.0) into {path} ...")
        synthesize("olmoe", "small", path, seed=0, routing_skew=1.0, dtype="bf16")
    llm = LLM(path, dtype="bf16", threads=args.threads)
    print(describe(llm.config, Topology.from_config(llm.config)))
    print("\n--- generating (random weights: the text is noise, the speed is real) ---")
    params = SamplingParams(max_tokens=64, temperature=0.0)
    stream_to_terminal(llm, "def fibonacci(n):\n    ", params)
    print(llm.stats().line())
    del llm
    demo_offload(path, args.threads)
    return 0


def demo_offload(path: Path, threads: int | None, budget_pct: float = 35.0) -> None:
    """Run the demo model under a DRAM budget below its size: kt_expert vs TilePO, interleaved."""
    from tilemem.engine.llm import LLM
    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.models.topology import Topology
    from tilemem.runtime.setup import make_plan
    from tilemem.tools.profiler import profile_checkpoint
    from tilemem.workloads.workload import load_workload

    ckpt = Checkpoint.open(path)
    topo = Topology.from_config(ckpt.config)
    budget = topo.non_expert_bytes + topo.shared_and_dense_bytes + int(budget_pct / 100 * topo.routed_expert_bytes)
    print(
        f"\n--- offload: DRAM budget {fmt_bytes(budget)} ({budget_pct:.0f}% of expert bytes + non-expert weights, "
        f"model {fmt_bytes(topo.total_bytes)}); the rest streams from disk with O_DIRECT ---"
    )
    profile = profile_checkpoint(path, load_workload("mixed", seed=0), 512)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    prompt = "def fibonacci(n):\n    "
    results: dict[str, list[float]] = {}
    for _ in range(2):  # interleaved rounds
        for policy in ("kt_expert", "tilepo_fine"):
            plan = make_plan(ckpt, f"cpu={budget}B", policy, profile)
            llm = LLM(path, dtype="bf16", threads=threads, plan=plan, max_batch=1)
            llm.generate([prompt], params)
            results.setdefault(policy, []).append(llm.stats().decode_tok_s)
            hit = llm.stats().runtime["hit_rate"]
            llm.tiered.close()
            del llm
    for policy, vals in results.items():
        print(f"{policy:12s} decode {max(vals):7.1f} tok/s (best of {len(vals)}), last hit rate {hit:.2f}")
    kt, fine = max(results["kt_expert"]), max(results["tilepo_fine"])
    print(f"tilepo_fine / kt_expert = {fine / kt:.2f}x at the same budget")
