"""Markdown report and PNG plots (decode tok/s vs budget per policy; hit rate vs budget)."""

from __future__ import annotations

import os
from pathlib import Path

from tilemem.bench.evidence import cells, median, spread


def _budget_key(b: str) -> float:
    return float(b[:-1]) if b.endswith("%") else float("inf")


def write_report(evidence: dict, out: Path) -> Path:
    """report.md + decode_vs_budget.png + hitrate_vs_budget.png in `out`."""
    rows = evidence["rows"]
    grouped = cells(rows)
    lines = ["# TileMEM benchmark report", "", f"Environment: `{evidence['environment']}`", ""]
    lines += [
        "| workload | budget | policy | async | decode tok/s (median) | spread | p50 ms | p95 ms | hit rate | "
        "disk MiB/run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (wl, b, p, a), rs in sorted(grouped.items(), key=lambda kv: (kv[0][0], _budget_key(kv[0][1]), kv[0][2])):
        lines.append(
            f"| {wl} | {b} | {p} | {a} | {median(rs):.2f} | {spread(rs):.2f} | {median(rs, 'p50_ms'):.0f} | "
            f"{median(rs, 'p95_ms'):.0f} | {median(rs, 'hit_rate'):.2f} | {median(rs, 'disk_bytes') / 2**20:.0f} |"
        )
    g = evidence["gate"]
    lines += ["", f"## Gate: {g['result']}", ""]
    lines += [f"- {k}: {v}" for k, v in g["checks"].items()]
    lines += [
        "",
        "| workload | budget | async | kt_expert | best TilePO | policy | gain | beyond spread |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in g["comparisons"]:
        lines.append(
            f"| {c['workload']} | {c['budget']} | {c['async_planning']} | {c['kt_expert']:.2f} | {c['best']:.2f} | "
            f"{c['best_policy']} | {c['gain']:.2f}x | {c['beyond_spread']} |"
        )
    _plots(grouped, out)
    lines += ["", "![decode tok/s vs budget](decode_vs_budget.png)", "![hit rate vs budget](hitrate_vs_budget.png)"]
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def _plots(grouped: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, fname, label in (
        ("decode_tok_s", "decode_vs_budget.png", "decode tok/s"),
        ("hit_rate", "hitrate_vs_budget.png", "tile cache hit rate"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series: dict[str, list[tuple[float, float]]] = {}
        for (wl, b, p, a), rs in grouped.items():
            x = _budget_key(b)
            if x != float("inf"):
                series.setdefault(f"{p}{' +async' if a else ''} ({wl})", []).append((x, median(rs, key)))
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("DRAM budget (% of routed-expert bytes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
