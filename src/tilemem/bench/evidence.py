"""Benchmark evidence: one row per real run, the environment, the gate, and the headline gain.

Schema `tilemem_evidence_v1`. The gate reports PASS or FAIL as measured: schema valid, every row
real (requested tokens generated, positive timings, a plan checksum), >= 3 repeats per cell, and
the performance criterion "the best TilePO policy beats kt_expert at each budget beyond the
run-to-run spread" (difference of medians larger than the larger of the two ranges).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

SCHEMA = "tilemem_evidence_v1"
TILEPO = ("tilepo_coarse", "tilepo_fine", "tilepo_hybrid", "tilepo_adaptive")


@dataclass(frozen=True)
class Row:
    """One measured run."""

    workload: str
    budget: str
    budget_bytes: int
    policy: str
    async_planning: bool
    repeat: int
    plan_checksum: str
    prompt_tokens: int
    decode_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    p50_ms: float
    p95_ms: float
    disk_bytes: int
    dram_bytes: int
    hit_rate: float
    stall_s: float
    peak_rss: int


def environment() -> dict[str, Any]:
    """Versions and machine facts stored with every evidence file."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "git_commit": commit,
    }


def cells(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by (workload, budget, policy, async)."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[(r["workload"], r["budget"], r["policy"], r["async_planning"])].append(r)
    return out


def median(rows: list[dict], key: str = "decode_tok_s") -> float:
    """Median of `key` over rows."""
    return statistics.median(r[key] for r in rows)


def spread(rows: list[dict], key: str = "decode_tok_s") -> float:
    """Range (max - min) of `key` over rows."""
    vals = [r[key] for r in rows]
    return max(vals) - min(vals)


def comparisons(rows: list[dict]) -> list[dict[str, Any]]:
    """Per (workload, budget, async): kt_expert vs the best TilePO policy."""
    grouped = cells(rows)
    out = []
    for wl, budget, policy, asyn in sorted(grouped, key=str):
        if policy != "kt_expert":
            continue
        kt = grouped[(wl, budget, policy, asyn)]
        best = None
        for p in TILEPO:
            cand = grouped.get((wl, budget, p, asyn))
            if cand and (best is None or median(cand) > median(best[1])):
                best = (p, cand)
        if best is None:
            continue
        gain = median(best[1]) / median(kt) if median(kt) else float("inf")
        beyond = median(best[1]) - median(kt) > max(spread(best[1]), spread(kt))
        out.append(
            dict(
                workload=wl,
                budget=budget,
                async_planning=asyn,
                kt_expert=median(kt),
                best_policy=best[0],
                best=median(best[1]),
                gain=gain,
                beyond_spread=beyond,
            )
        )
    return out


def gate(evidence: dict[str, Any], min_repeats: int = 3) -> dict[str, Any]:
    """Checks on an evidence dict; each is PASS or FAIL with the reason."""
    rows = evidence.get("rows", [])
    names = {f.name for f in fields(Row)}
    schema_ok = evidence.get("schema_version") == SCHEMA and all(set(r) == names for r in rows) and bool(rows)
    real = all(
        r["decode_tokens"] > 0 and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and len(r["plan_checksum"]) == 64
        for r in rows
    )
    repeats = min((len(v) for v in cells(rows).values()), default=0)
    comps = comparisons(rows)
    perf = bool(comps) and all(c["beyond_spread"] for c in comps)
    checks = {
        "schema_valid": schema_ok,
        "rows_real": real,
        f"repeats>={min_repeats}": repeats >= min_repeats,
        "tilepo_beats_kt_expert_beyond_spread": perf,
    }
    return {
        "checks": {k: "PASS" if v else "FAIL" for k, v in checks.items()},
        "result": "PASS" if all(checks.values()) else "FAIL",
        "comparisons": comps,
    }


def headline_gain(evidence: dict[str, Any] | str | Path) -> dict[str, Any]:
    """The best measured TilePO / kt_expert decode tok/s ratio in an evidence file or dict.

    >>> headline_gain({"rows": []})["best"]
    0.0
    """
    if not isinstance(evidence, dict):
        evidence = json.loads(Path(evidence).read_text())
    comps = comparisons(evidence.get("rows", []))
    if not comps:
        return {"best": 0.0, "comparisons": []}
    top = max(comps, key=lambda c: c["gain"])
    return {
        "best": top["gain"],
        "policy": top["best_policy"],
        "budget": top["budget"],
        "workload": top["workload"],
        "comparisons": comps,
    }


def write_json(path: Path, data: dict) -> None:
    """Atomic JSON write."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def row_dict(row: Row) -> dict[str, Any]:
    """A Row as a JSON-ready dict."""
    return asdict(row)
