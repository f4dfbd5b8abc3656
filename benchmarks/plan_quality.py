"""Plan quality: expected bytes per token read from the slow tier, per policy, at equal budgets.

Synthesizes a routing-skewed checkpoint (or uses --checkpoint), profiles a built-in workload,
reports the profile's skew (share of routing mass on the top quarter of experts, per layer), then
plans every policy at the same budgets and prints the slow tier's expected bytes per token (lower
is better) with the ranking check tilepo_fine <= tilepo_coarse <= kt_expert <= uniform.

Budgets: `k` = the fast tier holds the non-expert weights and k whole experts per layer (KT's
`--kt-num-gpu-experts k`); `k+x` = the same plus x of an expert per layer in bytes (`--extra`),
room that whole-expert policies can only partly use. The slow tier (cpu) is unbounded.

    python benchmarks/plan_quality.py --routing-skew 1.0 --tokens 1024
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from tilemem.loader.checkpoint import Checkpoint
from tilemem.models.topology import Topology
from tilemem.placement.budgets import Budgets, TierBudget, whole_ffn_bytes
from tilemem.placement.formats import tile_format
from tilemem.placement.objective import expected_bytes_per_token
from tilemem.placement.planner import build_plan
from tilemem.placement.policies import PlacementProblem, policy_names
from tilemem.tools.profiler import profile_checkpoint
from tilemem.units import format_bytes
from tilemem.workloads import load_workload

RANKED = ("tilepo_fine", "tilepo_coarse", "kt_expert", "uniform")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="existing checkpoint (default: synthesize one)")
    ap.add_argument("--family", default="olmoe")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--routing-skew", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="bench_out/plan_quality", help="where synthesized checkpoints go")
    ap.add_argument("--workload", default="mixed")
    ap.add_argument("--heldout", default="code", help="second workload to evaluate plans on ('' to skip)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--experts", default="2,4,6,8", help="budgets in experts per layer")
    ap.add_argument("--extra", type=float, default=0.3, help="fractional extra experts per layer (0: skip)")
    ap.add_argument("--tile-size", type=int, default=32)
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    ckpt_dir = Path(args.checkpoint) if args.checkpoint else synthesize(args)
    topo = Topology.from_config(Checkpoint.open(ckpt_dir).config)
    fmt = tile_format(topo.dtype)
    t0 = time.perf_counter()
    profile = profile_checkpoint(ckpt_dir, load_workload(args.workload), args.tokens)
    heldout = profile_checkpoint(ckpt_dir, load_workload(args.heldout), args.tokens) if args.heldout else None
    print(f"checkpoint {ckpt_dir} ({topo.family}, {len(topo.layers)} layers, routing skew {args.routing_skew})")
    print(f"profiled {args.workload}: {profile.total_tokens} tokens in {time.perf_counter() - t0:.1f} s")
    shares = [lp.top_share(0.25) for lp in profile.layers]
    print("top-quarter routing share per layer (uniform = 0.25): " + " ".join(f"{s:.3f}" for s in shares))
    print(f"mean {sum(shares) / len(shares):.3f}, min {min(shares):.3f}, max {max(shares):.3f}\n")

    rows, ok = [], True
    for k in [int(x) for x in args.experts.split(",")]:
        for extra in (0.0, args.extra) if args.extra else (0.0,):
            budgets = Budgets.from_experts_per_layer(topo, k, fmt)
            label = f"{k}"
            if extra:
                more = int(extra * sum(whole_ffn_bytes(topo, i, 0, fmt) for i in topo.moe_layers))
                cuda = TierBudget("cuda", budgets.tiers[0].capacity + more)
                budgets = replace(budgets, tiers=(cuda, budgets.tiers[1]), source=f"{budgets.source}+{extra:g}")
                label = f"{k}+{extra:g}"
            row = {"budget": label, "cuda_bytes": budgets.tiers[0].capacity}
            for name in policy_names():
                problem = PlacementProblem(topo, profile, budgets, fmt, tile=args.tile_size)
                plan = build_plan(problem, name)
                row[name] = plan.expected_bytes_per_token["cpu"]
                if heldout is not None:
                    ev = expected_bytes_per_token(plan.tiles, plan.non_expert, heldout, ("cuda", "cpu"))
                    row[f"{name}@heldout"] = ev["cpu"]
            row["rank_ok"] = all(row[a] <= row[b] + 1e-6 for a, b in zip(RANKED, RANKED[1:], strict=False))
            ok &= row["rank_ok"]
            rows.append(row)
    print_table(rows, "cpu (slow tier) expected bytes/token, in-sample (" + args.workload + ")", "")
    if heldout is not None:
        print()
        print_table(rows, f"same plans evaluated on held-out workload '{args.heldout}'", "@heldout")
    print(f"\nranking tilepo_fine <= tilepo_coarse <= kt_expert <= uniform (in-sample): {'PASS' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shares": shares, "rows": rows}, indent=1))
    return 0 if ok else 1


def print_table(rows: list[dict], title: str, suffix: str) -> None:
    names = policy_names()
    print(title)
    head = ["experts/layer", "cuda budget", *names, "fine saves vs kt"]
    lines = [head]
    for r in rows:
        vals = [r[f"{n}{suffix}"] for n in names]
        kt, fine = r[f"kt_expert{suffix}"], r[f"tilepo_fine{suffix}"]
        gain = f"{(1 - fine / kt) * 100:+.1f}%" if kt else "-"
        lines.append([r["budget"], format_bytes(r["cuda_bytes"]), *(format_bytes(v) for v in vals), gain])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))


def synthesize(args: argparse.Namespace) -> Path:
    from tilemem.synth.writer import synthesize as synth

    out = Path(args.workdir) / f"{args.family}-{args.preset}-skew{args.routing_skew:g}-seed{args.seed}"
    if not (out / "config.json").exists():
        print(f"synthesizing {out} ...", file=sys.stderr)
        synth(args.family, args.preset, out, seed=args.seed, routing_skew=args.routing_skew, progress=False)
    return out


if __name__ == "__main__":
    sys.exit(main())
