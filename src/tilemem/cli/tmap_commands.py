"""Hardware and cost-model sub-commands: doctor, tmap predict, tmap validate.

tilemem doctor                                   # PASS/WARN/FAIL per check, with the fix
tilemem doctor --probe --out hw.json             # measure this machine (< 1 minute)
tilemem tmap predict MODEL --hardware hw.json --workload mixed --budget cpu=4GiB
tilemem tmap validate MODEL --hardware hw.json --repeats 2
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path


def _split(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def register(sub: argparse._SubParsersAction) -> None:
    """Add doctor and tmap (predict, validate) to `sub`."""
    p = sub.add_parser("doctor", help="check the environment; with --probe, measure this machine's hardware profile")
    p.add_argument(
        "--dir",
        default=None,
        help="where tile stores will live (disk space, O_DIRECT checks; default: the current directory; "
        "--probe measures it in a temporary directory inside, default: the system temp directory)",
    )
    p.add_argument("--probe", action="store_true", help="measure DRAM, kernels, disk (and GPU) into a profile")
    p.add_argument(
        "--out", default=None, help="hardware profile JSON to write (default ~/.cache/tilemem/hardware.json)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads for the kernel figures")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size of the probed tile kernel")
    p.add_argument("--name", default="", help="profile name (default: host name)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("tmap", help="cost model: predict plans on a hardware profile, validate against real runs")
    tsub = p.add_subparsers(dest="tmap_command", required=True, metavar="TMAP_COMMAND")
    q = tsub.add_parser("predict", help="predicted speed of every policy and tile size, and the recommended one")
    q.add_argument("model", help="checkpoint directory, config.json, or a real-shape preset (e.g. olmoe-1b-7b)")
    q.add_argument("--hardware", required=True, help="hardware profile JSON, or a reference profile name")
    q.add_argument("--workload", default="mixed", help="workload to profile the checkpoint with")
    q.add_argument("--profile", default=None, help="profile.json instead of profiling the checkpoint")
    q.add_argument("--profile-tokens", type=int, default=1024, help="tokens routed when profiling")
    q.add_argument("--budget", required=True, action="append", help="tier budgets (repeatable), or auto")
    q.add_argument("--cache", default=None, help="dynamic tile cache reserve, e.g. cpu=10%%")
    q.add_argument("--policies", default=None, help="comma-separated (default: all)")
    q.add_argument("--tiles", default="64,128,256", help="tile sizes to compare")
    q.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    q.add_argument("--prompt-tokens", type=int, default=64)
    q.add_argument("--decode-tokens", type=int, default=32)
    q.add_argument("--min-gain", type=float, default=0.05, help="below this predicted gain recommend kt_expert")
    q.add_argument("--allow-extrapolation", action="store_true",
                   help="answer outside what was measured (marked as quick-planning estimates)")  # fmt: skip
    q.add_argument("--json", default=None, help="also write the tables as JSON here")
    q.set_defaults(func=cmd_predict)

    v = tsub.add_parser("validate", help="run a sample of the bench matrix; predicted vs measured decode tok/s")
    v.add_argument("model", nargs="?", default="checkpoints/demo-small", help="checkpoint directory")
    v.add_argument("--hardware", default=None, help="hardware profile JSON (default: probe first)")
    v.add_argument(
        "--budgets",
        default="10%,25%,35%,50%,70%",
        help="DRAM budgets to sample (five: with three, one near-tie flipped by noise already fails the 80%% bar)",
    )
    v.add_argument("--policies", default="kt_expert,tilepo_coarse,tilepo_fine")
    v.add_argument("--workloads", default="mixed")
    v.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="rounds of runs (a probe before each, unless --hardware); with 3 of 16 tokens, one slow run of a "
        "cell moved its median by up to 40%%",
    )
    v.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per run (16: the noisier)")
    v.add_argument("--prompt-tokens", type=int, default=64)
    v.add_argument("--threads", type=int, default=2)
    v.add_argument(
        "--tile-size", type=int, default=None, help="neurons per tile (default 128; a K-quant GGUF file: 256)"
    )
    v.add_argument("--store", default=None)
    v.add_argument("--out", default="tmap_validate", help="bench evidence and validation.json go here")
    v.add_argument("--min-gain", type=float, default=0.05, help="below this predicted gain kt_expert is recommended")
    v.add_argument("--update-hardware", action="store_true", help="record the result in the --hardware file")
    v.set_defaults(func=cmd_validate)


def cmd_doctor(args: argparse.Namespace) -> int:
    from tilemem.tools.doctor import format_checks, run_checks

    checks = run_checks(args.dir or ".")
    print(format_checks(checks))
    failed = any(c.status == "FAIL" for c in checks)
    if not args.probe:
        return 1 if failed else 0
    from tilemem.tmap.auto import DEFAULT_HARDWARE
    from tilemem.tools.probe import ProbeConfig, probe

    print("\nprobing (under a minute) ...")
    hw = probe(ProbeConfig(name=args.name, threads=args.threads, disk_dir=args.dir, hidden=args.hidden))
    out = hw.save(args.out or DEFAULT_HARDWARE)
    print(f"probe took {hw.meta['probe_seconds']} s; wrote {out}")
    return 1 if failed else 0


def _topology_and_profile(args: argparse.Namespace):
    from tilemem.cli.plan_commands import resolve_model
    from tilemem.models.topology import Topology
    from tilemem.placement.profile import Profile

    config, name = resolve_model(args.model)
    topo = Topology.from_config(config)
    if args.profile:
        return topo, Profile.load(args.profile, topo), name
    path = Path(args.model)
    if path.is_dir() and any(path.glob("*.safetensors")):
        from tilemem.tools.profiler import profile_checkpoint
        from tilemem.workloads.workload import load_workload

        print(f"profiling {name} on workload '{args.workload}' ({args.profile_tokens} tokens) ...", file=sys.stderr)
        return topo, profile_checkpoint(path, load_workload(args.workload, seed=0), args.profile_tokens), name
    print(f"note: {args.model} has no weights to profile; predicting for uniform routing.", file=sys.stderr)
    return topo, Profile.uniform(topo), name


def cmd_predict(args: argparse.Namespace) -> int:
    from tilemem.tmap.auto import auto_budget
    from tilemem.tmap.cost import ServingWorkload
    from tilemem.tmap.hardware import HardwareProfile
    from tilemem.tmap.recommend import recommend, table

    hw = HardwareProfile.load(args.hardware)
    topo, profile, name = _topology_and_profile(args)
    workload = ServingWorkload(profile, args.batch, args.prompt_tokens, args.decode_tokens, args.workload)
    policies = _split(args.policies) if args.policies else None
    tiles = tuple(int(t) for t in _split(args.tiles))
    results = []
    for budget in args.budget:
        if budget == "auto":
            ab = auto_budget(topo, context=args.prompt_tokens + args.decode_tokens, batch=args.batch)
            print(f"--budget auto: {ab.explanation}")
            budget = ab.text
        rec = recommend(
            topo, profile, hw, budget, workload, policies, tiles, args.min_gain, args.allow_extrapolation,
            cache=args.cache, model=name,
        )  # fmt: skip
        print(table(rec))
        print()
        results.append(rec)
    if args.json:
        from tilemem.jsonio import write_json_atomic

        write_json_atomic(args.json, {"hardware": hw.name, "model": name, "tables": [asdict(r) for r in results]})
        print(f"wrote {args.json}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from tilemem.cli.engine_flags import checkpoint_tile
    from tilemem.jsonio import write_json_atomic
    from tilemem.tmap.hardware import HardwareProfile
    from tilemem.tools.validate import validate

    hw = HardwareProfile.load(args.hardware) if args.hardware else None
    report = validate(
        args.model,
        hw,
        budgets=_split(args.budgets),
        policies=_split(args.policies),
        workloads=_split(args.workloads),
        repeats=args.repeats,
        prompt_tokens=args.prompt_tokens,
        decode_tokens=args.decode_tokens,
        threads=args.threads,
        tile=args.tile_size or checkpoint_tile(args.model),
        out=args.out,
        store=args.store,
        min_gain=args.min_gain,
    )
    print(report.table())
    body = json.loads(json.dumps(asdict(report), default=str))
    body["passed"] = report.passed
    path = write_json_atomic(Path(args.out) / "validation.json", body)
    print(f"wrote {path}")
    if args.update_hardware and hw is not None:
        hw.with_validation(report.validation()).save(args.hardware)
        print(f"recorded the validation in {args.hardware}")
    return 0 if report.passed else 1
