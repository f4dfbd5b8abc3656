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
