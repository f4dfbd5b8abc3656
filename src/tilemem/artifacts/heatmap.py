"""Residency heatmap: layers x routed experts, one panel per tier, cell = share of the expert's
bytes resident in that tier (split experts show as partial shares); a rank plan adds a `remote` panel
(what the other ranks compute) and names its rank in the title. Written with matplotlib's Agg
backend (no display needed), atomically."""

from __future__ import annotations

import io
from pathlib import Path

from tilemem.jsonio import write_bytes_atomic
from tilemem.placement.plan import Plan
from tilemem.placement.tiers import REMOTE


def residency_matrix(plan: Plan, tier: str) -> list[list[float]]:
    """[layer][expert] share of each routed expert's bytes in `tier` (NaN for dense layers)."""
    layers = plan.topology.layers
    width = max((lt.num_experts for lt in layers), default=0)
    totals = [[0] * width for _ in layers]
    inside = [[0] * width for _ in layers]
    for t in plan.tiles:
        if t.expert >= 0:
            totals[t.layer][t.expert] += t.total_bytes
            if t.tier == tier:
                inside[t.layer][t.expert] += t.total_bytes
    return [
        [inside[i][e] / totals[i][e] if totals[i][e] else float("nan") for e in range(width)]
        for i in range(len(layers))
    ]


def write_heatmap(plan: Plan, path: str | Path) -> Path:
    """Render the heatmap PNG to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    tiers = [u.tier for u in plan.tiers]
    if plan.world_size > 1:  # a rank plan: one more panel, what the other ranks compute
        tiers.append(REMOTE)
    n_layers = len(plan.topology.layers)
    size = (3.5 * len(tiers) + 1.5, 2.2 + 0.22 * n_layers)
    fig, axes = plt.subplots(1, len(tiers), figsize=size, squeeze=False, layout="constrained")
    image = None
    for ax, tier in zip(axes[0], tiers, strict=True):
        image = ax.imshow(residency_matrix(plan, tier), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(tier, fontsize=10)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    who = f" rank {plan.rank} of {plan.world_size}" if plan.world_size > 1 else ""
    fig.suptitle(
        f"{plan.name}{who}: {plan.policy}, {plan.budget_source}\nshare of each expert's bytes per tier", fontsize=10
    )
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())
