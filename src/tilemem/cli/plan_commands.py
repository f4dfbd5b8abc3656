"""Planning sub-commands: profile, plan, compile.

tilemem profile MODEL --workload mixed --tokens 2048 --out profile.json
tilemem plan MODEL --profile profile.json --budget cuda=20GiB,cpu=8GiB --policy tilepo_fine --out plan/
tilemem plan MODEL --profile profile.json --experts-per-layer 8 --policy kt_expert --out plan_kt/
tilemem plan MODEL --budget cpu=4GiB --world-size 2 --rank-budget 1=cpu=6GiB --out plans/  (plans/rank0, rank1)
tilemem compile --model-spec spec.json|plan.tmem --out-dir build/plan
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tilemem.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    """Add profile, plan and compile to `sub`."""
    from tilemem.placement.policies import policy_names

    p = sub.add_parser("profile", help="record which experts a workload routes to (profile JSON)")
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("--workload", default="mixed", help="mixed, long_context, code, chat, or a .jsonl file")
    p.add_argument("--tokens", type=int, default=2048, help="tokens to route, prefill + decode (default 2048)")
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="truncate prompts to this many tokens")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in workload's prompt choice")
    p.add_argument("--merge", action="append", default=[], metavar="PROFILE", help="add an existing profile")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("plan", help="place tiles across tiers for a budget (MIR + manifest + heatmap)")
    p.add_argument("model", help="checkpoint directory, config.json, or a real-shape preset (e.g. olmoe-1b-7b)")
    p.add_argument("--profile", action="append", default=[], help="profile JSON (repeat to merge; default uniform)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget", help="per-tier bytes, e.g. cuda=20GiB,cpu=8GiB (rest on disk), or auto")
    budget.add_argument("--experts-per-layer", type=int, help="cuda holds this many experts per layer, rest cpu")
    p.add_argument("--policy", default="tilepo_fine", help=f"one of {', '.join(policy_names())}, or auto")
    p.add_argument("--hardware", default=None, help="hardware profile JSON for --policy/--budget auto")
    p.add_argument(
        "--memory-limit",
        default=None,
        help="--budget auto: the memory the run may use, e.g. 8GiB (default: here)",
    )
    p.add_argument("--max-model-len", type=int, default=4096, help="--budget auto: KV cache tokens to keep room for")
    p.add_argument(
        "--max-batch",
        type=int,
        default=1,
        help="--budget auto: full-length KV caches to keep room for (serve: its)",
    )
    p.add_argument(
        "--tile-size", type=int, default=None, help="fine tile size in neurons (default 128; K-quant GGUF: 256)"
    )
    p.add_argument("--shard-count", type=int, default=1, help="tensor-parallel shards (default 1)")
    p.add_argument("--adaptive-mode", default="balanced", help="tilepo_adaptive: throughput, balanced, tail_latency")
    p.add_argument("--cache", default=None, help="dynamic tile cache reserve, e.g. cuda=10%%,cpu=1GiB")
    p.add_argument("--phase", default="all", help="routing counts to plan for: all, prefill, decode")
    p.add_argument("--dtype", default=None, help="weight dtype to plan for (default: the checkpoint's)")
    p.add_argument("--name", default=None, help="plan name (default: the model's)")
    p.add_argument("--no-heatmap", action="store_true", help="skip heatmap.png")
    p.add_argument(
        "--world-size", type=int, default=1, help="expert parallelism: plan N ranks into OUT/rank0 .. rankN-1"
    )
    p.add_argument(
        "--rank-budget",
        action="append",
        default=[],
        metavar="R=SPEC",
        help="rank R's own budget, e.g. 1=cpu=6GiB (repeat; other ranks use --budget)",
    )
    p.add_argument(
        "--rank-split",
        default="tile",
        choices=["expert", "tile", "even"],
        help="divide routed experts among ranks whole (expert), also split hot ones by tiles (tile, the default), or "
        "split every expert evenly (even: balanced for every token)",
    )
    p.add_argument("--no-replicate", action="store_true", help="never hold a hot expert on several ranks")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("compile", help="compile a JSON model spec or .tmem plan config (no checkpoint needed)")
    p.add_argument("--model-spec", required=True, help="spec.json or plan.tmem")
    p.add_argument("--profile", action="append", default=[], help="profile JSON (repeat to merge)")
    p.add_argument("--policy", default=None, help="override schedule.policy")
    p.add_argument("--no-heatmap", action="store_true", help="skip heatmap.png")
    p.add_argument("--out-dir", required=True, help="output directory")
    p.set_defaults(func=cmd_compile)


def cmd_profile(args: argparse.Namespace) -> int:
    """Run the workload on the checkpoint and write the profile."""
    from tilemem.artifacts.report import profile_table
    from tilemem.placement.profile import Profile, merge_profiles
    from tilemem.tools.profiler import profile_checkpoint
    from tilemem.workloads import load_workload

    workload = load_workload(args.workload, seed=args.seed)
    profile = profile_checkpoint(args.model, workload, args.tokens, args.max_prompt_tokens, args.dtype)
    if args.merge:
        profile = merge_profiles([profile, *(Profile.load(p) for p in args.merge)])
    out = profile.save(args.out)
    print(profile_table(profile))
    print(f"wrote {out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan a checkpoint (or config / preset) for a budget and write the artifacts."""
    from tilemem.layers.ggml import QUANT_TYPES
    from tilemem.models.topology import Topology
    from tilemem.placement.budgets import Budgets
    from tilemem.placement.formats import bf16_store_format, tile_format
    from tilemem.placement.planner import build_plan
    from tilemem.placement.policies import PlacementProblem

    rank_budgets = parse_rank_budgets(args.world_size, args.rank_budget)
    config, name = resolve_model(args.model)
    dtype = _dtype_name(args.dtype) if args.dtype else None
    units = gguf_units(args.model)  # a GGUF file: its FFNs' quant types, counted as their blocks
    if units:
        from tilemem.loader.checkpoint import Checkpoint
        from tilemem.runtime.gguf_source import gguf_tile_format, plan_types, quantized_bytes

        topology = Topology.from_config(config, dtype, plan_types(units), quantized_bytes(Checkpoint.open(args.model)))
        fmt = gguf_tile_format(units)
    else:
        topology = Topology.from_config(config, dtype)
        fmt = tile_format(topology.dtype)
    if args.tile_size is None:
        grid = max(QUANT_TYPES[types[2]].weights for types in units.values()) if units else 1
        args.tile_size = math.lcm(128, grid)
    if units:
        grid = max(QUANT_TYPES[types[2]].weights for types in units.values())
        if args.tile_size % grid:
            raise ConfigError(
                f"--tile-size {args.tile_size} does not split {args.model}'s down projections into whole blocks of "
                f"{grid} weights; use a multiple of {grid}."
            )
    profile = load_profiles(args.profile, topology)
    auto_budget = args.budget == "auto"
    if args.budget == "auto" or args.policy == "auto":  # the cost model picks (tilemem.tmap)
        from tilemem.memlimit import memory_limit
        from tilemem.tmap.auto import resolve_auto

        for flag in ("max_model_len", "max_batch"):
            if getattr(args, flag) < 1:
                raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}.")
        limit = memory_limit(args.memory_limit) if (args.budget or "auto") == "auto" else None
        args.budget, args.policy, args.tile_size = resolve_auto(
            topology, args.budget or "auto", args.policy, profile, args.tile_size, args.hardware, name,
            limit=limit, context=args.max_model_len, sequences=args.max_batch,
        )  # fmt: skip
    gpu_tier = any("cuda=" in str(b) for b in (args.budget, *rank_budgets.values()))
    if fmt.name == "bf16" and not gpu_tier:  # counted as the tile store holds them (x12 where it will be)
        if Path(args.model).is_dir():
            from tilemem.loader.checkpoint import Checkpoint
            from tilemem.runtime.setup import expert_format

            fmt = expert_format(Checkpoint.open(args.model), topology, args.tile_size)
        else:
            fmt = bf16_store_format(topology.hidden_size, args.tile_size)

    def budgets_of(text: str | None) -> Budgets:
        if text is not None:
            budgets = Budgets.parse(text)
        else:
            budgets = Budgets.from_experts_per_layer(
                topology, args.experts_per_layer, fmt, shard_count=args.shard_count
            )
        if args.cache:
            budgets = budgets.with_cache(args.cache)
        elif auto_budget:
            from tilemem.tmap.auto import with_learning_cache

            budgets = with_learning_cache(topology, budgets, profile)
        return budgets

    problems = [
        PlacementProblem(
            topology=topology,
            profile=profile,
            budgets=budgets_of(rank_budgets.get(r, args.budget)),
            fmt=fmt,
            tile=args.tile_size,
            shard_count=args.shard_count,
            phase=args.phase,
            adaptive_mode=args.adaptive_mode,
        )
        for r in range(args.world_size)
    ]
    settings = {"workload": ",".join(profile.workloads)}
    if args.world_size == 1:
        plan = build_plan(problems[0], args.policy, args.name or name, settings)
        return _write(plan, Path(args.out), not args.no_heatmap)
    from tilemem.placement.ranks import build_rank_plans

    plans = build_rank_plans(
        problems, args.policy, args.name or name, args.rank_split, not args.no_replicate, settings=settings
    )
    return _write_ranks(plans, profile, Path(args.out), not args.no_heatmap)


def parse_rank_budgets(world_size: int, entries: list[str]) -> dict[int, str]:
    """`--rank-budget R=SPEC` entries as {rank: budget text}, checked against `--world-size`."""
    if world_size < 1:
        raise ConfigError(f"--world-size must be at least 1, got {world_size}.")
    out: dict[int, str] = {}
    for entry in entries:
        rank, sep, spec = entry.partition("=")
        if not sep or not rank.strip().isdigit() or not spec.strip():
            raise ConfigError(
                f"--rank-budget '{entry}' is not RANK=BUDGET; write e.g. --rank-budget 1=cpu=6GiB "
                "(rank 1's budget; the other ranks use --budget)."
            )
        r = int(rank)
        if r >= world_size:
            raise ConfigError(
                f"--rank-budget '{entry}' names rank {r}, but --world-size {world_size} has ranks 0..{world_size - 1}; "
                "raise --world-size or drop the entry."
            )
        if r in out:
            raise ConfigError(f"--rank-budget gives rank {r} twice ('{out[r]}' and '{spec}'); give it once.")
        out[r] = spec.strip()
    return out


def cmd_compile(args: argparse.Namespace) -> int:
    """Compile a model spec (.json) or plan config (.tmem) and write the artifacts."""
    from tilemem.jsonio import read_json, write_json_atomic
    from tilemem.sdk.compiler import compile_spec
    from tilemem.sdk.model_spec import spec_from_dict
    from tilemem.sdk.tmem import load_tmem

    path = Path(args.model_spec)
    if path.suffix == ".tmem":
        spec = load_tmem(path)
    elif path.suffix == ".json":
        spec = spec_from_dict(read_json(path, "model spec"), str(path))
    else:
        raise ConfigError(f"--model-spec '{path}' must be a .json model spec or a .tmem plan config.")
    topology = spec.topology()
    profile = load_profiles(args.profile, topology) if args.profile else None
    plan = compile_spec(spec, profile, args.policy)
    code = _write(plan, Path(args.out_dir), not args.no_heatmap)
    spec_path = write_json_atomic(Path(args.out_dir) / "model_spec.json", spec.to_dict())
    print(f"wrote {spec_path}")
    return code


def gguf_units(arg: str) -> dict | None:
    """A GGUF file's FFN quant types per unit (as its tile store packs them), or None for anything else."""
    from tilemem.loader.gguf_file import is_gguf

    if not is_gguf(arg) or not Path(arg).exists():
        return None
    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.runtime.gguf_source import GgufSource, store_source
    from tilemem.runtime.tile_store import store_codec

    source = store_source(Checkpoint.open(arg))
    codec = store_codec(source) if isinstance(source, GgufSource) else None
    return dict(codec.ggml_units) if codec is not None and codec.gguf else None


def resolve_model(arg: str):
    """(ModelConfig, name) of a checkpoint directory, a GGUF file, a config.json, or a real-shape preset name."""
    from tilemem.loader.gguf_file import is_gguf
    from tilemem.sdk.model_spec import preset_config, read_hf_config
    from tilemem.synth.presets import REAL_SHAPES

    path = Path(arg)
    if is_gguf(path) and path.exists():
        from tilemem.loader.checkpoint import Checkpoint

        return Checkpoint.open(path).config, path.stem
    if path.exists():
        return read_hf_config(path)
    if arg in REAL_SHAPES:
        return preset_config(arg), arg
    raise ConfigError(
        f"model '{arg}' is not a checkpoint directory, a config.json, or a preset "
        f"({', '.join(REAL_SHAPES)}); create one with `tilemem synth`."
    )


def load_profiles(paths: list[str], topology):
    """The merged profiles at `paths`, checked against `topology` (uniform routing when none)."""
    from tilemem.placement.profile import Profile, merge_profiles

    if not paths:
        print("note: no --profile given; planning for uniform routing.")
        return Profile.uniform(topology)
    return merge_profiles([Profile.load(p, topology) for p in paths])


def _dtype_name(name: str) -> str:
    from tilemem.placement.formats import DTYPE_ALIASES, FORMATS

    short = DTYPE_ALIASES.get(name, name)
    long = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    if short not in long or not FORMATS[short].plain:
        raise ConfigError(f"--dtype '{name}' is not one of bf16, fp16, fp32.")
    return long[short]


def _write_ranks(plans, profile, out: Path, heatmap: bool) -> int:
    """Each rank's plan into OUT/rank{r}, with the ranks' balance."""
    from tilemem.artifacts.mir import plan_checksum, save_plan
    from tilemem.artifacts.report import plan_table, rank_table
    from tilemem.placement.ranks import balance

    if out.exists() and not out.is_dir():
        raise ConfigError(f"output '{out}' exists and is not a directory; choose another --out.")
    for plan in plans:
        paths = save_plan(plan, out / f"rank{plan.rank}", heatmap=heatmap)
        print(f"rank {plan.rank}: " + plan_table(plan))
        print(f"checksum {plan_checksum(plan)}")
        print(f"wrote rank {plan.rank}: {', '.join(str(p) for p in paths.values())}")
    print(rank_table(plans, balance(plans, profile)))
    return 0


def _write(plan, out: Path, heatmap: bool) -> int:
    from tilemem.artifacts.mir import plan_checksum, save_plan
    from tilemem.artifacts.report import plan_table

    paths = save_plan(plan, out, heatmap=heatmap)
    print(plan_table(plan))
    print(f"checksum {plan_checksum(plan)}")
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0
