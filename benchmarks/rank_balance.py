"""Rank balance: does splitting hot experts by tiles balance expert-parallel ranks better than whole experts?

Pure planning, no checkpoint: the OLMoE-1B-7B shape (16 MoE layers x 64 experts, top-8, bf16) and the
Mixtral-8x7B shape (32 layers x 8 experts, top-2: few, large experts), each with a Zipf-skewed synthetic
routing profile (a different expert order per layer, fixed seed). For world sizes 2, 3, 4, split `expert`
vs `tile`, replication off/on, it prints the max rank load over the mean rank load (per layer; the
load-weighted mean over layers and the worst layer; 1.00 = perfect, the step waits for the slowest rank in
every layer), the bytes the ranks' policies left on disk and the FFN bytes each rank computes. Each rank's
budget: its non-expert weights plus `--room` x (the model's FFN bytes / world size) of DRAM, the rest on disk.

    python benchmarks/rank_balance.py --preset olmoe-1b-7b --skew 1.0 --room 1.3
"""

from __future__ import annotations

import argparse
import time

from tilemem.models.topology import Topology
from tilemem.placement.budgets import Budgets
from tilemem.placement.formats import tile_format
from tilemem.placement.policies import PlacementProblem
from tilemem.placement.profile import Profile
from tilemem.placement.ranks import balance, build_rank_plans
from tilemem.sdk.model_spec import preset_config
from tilemem.units import format_bytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--preset", nargs="+", default=["olmoe-1b-7b", "mixtral-8x7b"], help="real-shape presets (default: both)"
    )
    ap.add_argument("--skew", type=float, nargs="+", default=[1.0, 2.0], help="Zipf exponents of the profile")
    ap.add_argument("--room", type=float, default=1.3, help="DRAM per rank as a multiple of its even FFN share")
    ap.add_argument("--policy", default="tilepo_fine", help="per-rank placement policy")
    ap.add_argument("--tile", type=int, default=128, help="tile size in neurons")
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    for preset in args.preset:
        run(preset, args)
    return 0


def run(preset: str, args: argparse.Namespace) -> None:
    """The table of one preset."""
    topo = Topology.from_config(preset_config(preset))
    fmt = tile_format(topo.dtype)
    ffn = topo.routed_expert_bytes + topo.shared_and_dense_bytes
    print(f"{preset}: FFN bytes {format_bytes(ffn)}, non-expert {format_bytes(topo.non_expert_bytes)}")
    print(f"policy {args.policy}, tile {args.tile}, DRAM per rank = non-expert + {args.room:g} x FFN bytes / N")
    print()
    head = f"{'skew':>5} {'N':>2} {'split':>6} {'repl':>5} {'max/mean':>9} {'worst':>6} {'split#':>6} {'repl#':>5}"
    print(f"{head} {'on disk':>10}  bytes per rank (FFN tiles computed)")
    for skew in args.skew:
        profile = Profile.synthetic(topo, skew=skew, tokens=100_000, seed=args.seed)
        for world in args.world_sizes:
            cpu = topo.non_expert_bytes + int(args.room * ffn / world)
            budgets = Budgets.parse(f"cpu={cpu}")
            problems = [PlacementProblem(topo, profile, budgets, fmt, tile=args.tile) for _ in range(world)]
            for split in ("expert", "tile"):
                for replicate in (False, True):
                    t0 = time.perf_counter()
                    plans = build_rank_plans(problems, args.policy, preset, split=split, replicate=replicate)
                    took = time.perf_counter() - t0
                    b = balance(plans, profile)
                    notes = plans[0].policy_params["ranks"]
                    per_rank = " ".join(format_bytes(n) for n in b["bytes_per_rank"])
                    disk = format_bytes(sum(p.usage("disk").tiles for p in plans))
                    print(
                        f"{skew:>5g} {world:>2} {split:>6} {'on' if replicate else 'off':>5} "
                        f"{b['max_over_mean']:>9.3f} {b['worst_layer']:>6.3f} {notes['experts_split']:>6} "
                        f"{notes['experts_replicated']:>5} {disk:>10}  {per_rank}  ({took:.1f} s)"
                    )


if __name__ == "__main__":
    raise SystemExit(main())
