"""Plain-text reports of plans and profiles for the CLI (deterministic, no terminal styling)."""

from __future__ import annotations

from tilemem.placement.plan import Plan
from tilemem.placement.profile import Profile
from tilemem.units import format_bytes


def plan_table(plan: Plan) -> str:
    """Per-tier summary: budget, non-expert, tiles, cache, free, tile count, expected bytes/token."""
    head = ("tier", "budget", "non-expert", "tiles", "cache", "free", "#tiles", "bytes/token")
    rows = [head]
    for u in plan.tiers:
        free = "-" if u.capacity is None else format_bytes(u.capacity - u.used)
        rows.append(
            (
                u.tier,
                "unbounded" if u.capacity is None else format_bytes(u.capacity),
                format_bytes(u.non_expert),
                format_bytes(u.tiles),
                format_bytes(u.cache),
                free,
                str(len(plan.tiles_in(u.tier))),
                format_bytes(plan.expected_bytes_per_token.get(u.tier, 0.0)),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        f"plan '{plan.name}': policy {plan.policy}, budget {plan.budget_source}, {len(plan.tiles)} tiles, "
        f"store {format_bytes(plan.store_bytes)}",
    ]
    lines += [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    return "\n".join(lines)


def rank_table(plans: list[Plan], balance: dict) -> str:
    """Expert parallelism: the ranks' balance (`placement.ranks.balance`) and each rank's share."""
    notes = plans[0].policy_params.get("ranks", {})
    lines = [
        f"{len(plans)} ranks, split {notes.get('split', '?')}, replicate {'on' if notes.get('replicate') else 'off'}: "
        f"max/mean rank load {balance['max_over_mean']:.3f} (load-weighted over layers), worst layer "
        f"{balance['worst_layer']:.3f}; experts split {notes.get('experts_split', 0)}, "
        f"replicated {notes.get('experts_replicated', 0)}",
        "rank  budget  FFN bytes computed  expected FFN bytes/token  replicas",
    ]
    for plan, nbytes, load in zip(plans, balance["bytes_per_rank"], balance["load_per_rank"], strict=True):
        lines.append(
            f"{plan.rank:>4}  {plan.budget_source}  {format_bytes(nbytes):>18}  {format_bytes(load):>24}  "
            f"{len(plan.replicas):>8}"
        )
    return "\n".join(lines)


def profile_table(profile: Profile) -> str:
    """Per-layer tokens, top-quarter routing share and mean reuse distance."""
    lines = [
        f"profile of {profile.source or 'model'} ({', '.join(profile.workloads)}): {profile.model.describe()}",
        "layer  prefill  decode  top-25% share  mean reuse dist  top pair",
    ]
    for lp in profile.layers:
        pair = (
            f"E{lp.coactivation[0][0]}+E{lp.coactivation[0][1]} ({lp.coactivation[0][2]})" if lp.coactivation else "-"
        )
        lines.append(
            f"{lp.layer:>5}  {lp.prefill_tokens:>7}  {lp.decode_tokens:>6}  {lp.top_share(0.25):>13.3f}  "
            f"{lp.mean_reuse_distance():>15.2f}  {pair}"
        )
    return "\n".join(lines)
