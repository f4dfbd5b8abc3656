"""Predict every policy and tile size for a budget, pick one, and say how sure the pick is.

The pick is the fastest predicted decode; when it beats `kt_expert` by less than `min_gain`, the
simpler `kt_expert` is recommended instead. Confidence is the probability that the pick is really
faster than the runner-up when each prediction carries a log-normal error of the model's error band
(the median error `tmap validate` recorded for this hardware profile, else the 15% the model is held
to; doubled for quick-planning answers). Answers that need figures outside what was measured
(an unmeasured profile, a tier the machine lacks, a budget beyond its memory, request sizes or batches
the probe did not cover) are refused unless extrapolation is allowed; then they are marked as
quick-planning estimates and come with the short probe run that would confirm them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tilemem.errors import ConfigError
from tilemem.models.topology import Topology
from tilemem.placement.budgets import Budgets
from tilemem.placement.errors import BudgetError
from tilemem.placement.formats import tile_format
from tilemem.placement.planner import build_plan
from tilemem.placement.policies import PlacementProblem, policy_names
from tilemem.placement.profile import Profile
from tilemem.tmap.cost import Prediction, RuntimeSettings, ServingWorkload, predict
from tilemem.tmap.hardware import HardwareProfile

DEFAULT_ERROR_BAND = 0.15
"""Relative error assumed when the profile carries no validation (the acceptance bound of the model)."""
DEFAULT_TILES = (64, 128, 256)
"""Tile sizes compared."""
BASELINE = "kt_expert"


class ExtrapolationError(ConfigError):
    """A prediction needs figures the hardware profile did not measure, and extrapolation was not allowed."""


@dataclass(frozen=True)
class Candidate:
    """One plan and its prediction."""

    policy: str
    """Policy."""
    tile: int
    """Tile size (neurons; also the store tile its disk reads use)."""
    prediction: Prediction
    """Predicted speed."""


@dataclass(frozen=True)
class Recommendation:
    """The predicted table for one budget and the pick."""

    budget: str
    """Budget as given."""
    candidates: tuple[Candidate, ...]
    """Every plan, fastest predicted decode first."""
    recommended: Candidate
    """The pick."""
    best: Candidate
    """The fastest predicted plan."""
    gain_over_baseline: float
    """Predicted decode speed of `best` over the best kt_expert plan, minus 1."""
    confidence: float
    """Probability the pick is really the faster of it and the runner-up, under the error band."""
    error_band: float
    """Relative error the confidence assumes."""
    reason: str
    """Why this pick."""
    extrapolated: bool
    """Whether this is a quick-planning estimate (figures outside what was measured)."""
    notes: tuple[str, ...]
    """What was outside the measurements."""
    probe_hint: str
    """The short probe run that would confirm an extrapolated answer."""


def capacity_notes(budgets: Budgets, hardware: HardwareProfile) -> list[str]:
    """Budget tiers the hardware cannot hold (the budget is outside what this machine has)."""
    out = []
    for tb in budgets.tiers:
        if tb.capacity is None:
            continue
        if tb.tier == "cuda":
            if not hardware.has_gpu:
                out.append(f"budget cuda={tb.capacity} B but hardware '{hardware.name}' has no GPU")
            elif tb.capacity > hardware.vram_capacity_gib * 2**30:
                out.append(f"budget cuda={tb.capacity} B exceeds the GPU's {hardware.vram_capacity_gib:.1f} GiB")
        if tb.tier == "cpu" and hardware.dram_capacity_gib and tb.capacity > hardware.dram_capacity_gib * 2**30:
            out.append(f"budget cpu={tb.capacity} B exceeds the machine's {hardware.dram_capacity_gib:.1f} GiB of DRAM")
    return out


def error_band(hardware: HardwareProfile, model: str = "") -> float:
    """The model's relative error on this hardware: a recorded validation's median error (this model's if
    any), else DEFAULT_ERROR_BAND."""
    vals = [v for v in hardware.validations if v.model == model] or list(hardware.validations)
    if not vals:
        return DEFAULT_ERROR_BAND
    return max(0.02, max(v.median_abs_error for v in vals))


def confidence(fast: float, slow: float, band: float) -> float:
    """P(fast really beats slow) when both carry independent log-normal errors of sd `band`."""
    if slow <= 0:
        return 1.0
    z = math.log(max(fast, 1e-12) / slow) / (band * math.sqrt(2))
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def recommend(
    topology: Topology,
    profile: Profile,
    hardware: HardwareProfile,
    budget: str,
    workload: ServingWorkload | None = None,
    policies: tuple[str, ...] | None = None,
    tiles: tuple[int, ...] = DEFAULT_TILES,
    min_gain: float = 0.05,
    allow_extrapolation: bool = False,
    settings: RuntimeSettings | None = None,
    cache: str | None = None,
    model: str = "",
) -> Recommendation:
    """Predict every (policy, tile) plan of `topology` under `budget` and recommend one (module docstring)."""
    budgets = Budgets.parse(budget, cache)
    workload = replace(workload, profile=profile) if workload is not None else ServingWorkload(profile)
    policies = policies or tuple(policy_names())
    fmt = tile_format(topology.dtype)
    outside = capacity_notes(budgets, hardware)
    if outside and not allow_extrapolation:
        raise ExtrapolationError(
            "this budget is outside what the machine has: " + "; ".join(outside) + ". Give a budget that fits, "
            f"probe the target machine (`{probe_hint(model or 'MODEL', budget, BASELINE, hardware)}`), or pass "
            "--allow-extrapolation for a quick-planning estimate."
        )
    cands = []
    failures = []
    for policy in policies:
        for tile in tiles:
            try:
                plan = build_plan(PlacementProblem(topology, profile, budgets, fmt, tile=tile), policy, model)
            except BudgetError as exc:
                failures.append(f"{policy}/{tile}: {exc}")
                continue
            cands.append(Candidate(policy, tile, predict(plan, hardware, workload, settings)))
    if not cands:
        raise BudgetError(f"no policy can plan budget '{budget}': {failures[0] if failures else 'no policies'}")
    cands.sort(key=lambda c: -c.prediction.decode_tok_s)
    notes = list(dict.fromkeys(outside + [n for c in cands for n in c.prediction.notes]))
    extrapolated = bool(notes)
    hint = probe_hint(model or "MODEL", budget, cands[0].policy, hardware)
    if extrapolated and not allow_extrapolation:
        raise ExtrapolationError(
            "this prediction needs figures outside what was measured: " + "; ".join(notes) + ". Measure this "
            f"machine (`{hint}`), or pass --allow-extrapolation for a quick-planning estimate."
        )
    band = error_band(hardware, model) * (2 if extrapolated else 1)
    best = cands[0]
    kt = [c for c in cands if c.policy == BASELINE]
    gain = best.prediction.decode_tok_s / kt[0].prediction.decode_tok_s - 1 if kt else float("inf")
    if kt and best.policy != BASELINE and gain < min_gain:
        pick = kt[0]
        reason = (
            f"{best.policy} is predicted only {gain:+.1%} over {BASELINE} (< {min_gain:.0%}): keep the simpler plan"
        )
        conf = 1 - confidence(best.prediction.decode_tok_s * (1 - min_gain), kt[0].prediction.decode_tok_s, band)
        conf = max(conf, 0.5)
    else:
        pick = best
        rival = next((c for c in cands if c.policy != best.policy), None)
        reason = (
            f"fastest predicted decode ({gain:+.1%} over {BASELINE})" if kt and best.policy != BASELINE
            else "fastest predicted decode"
        )  # fmt: skip
        conf = confidence(best.prediction.decode_tok_s, rival.prediction.decode_tok_s, band) if rival else 1.0
    return Recommendation(budget, tuple(cands), pick, best, gain, conf, band, reason, extrapolated, tuple(notes), hint)


def probe_hint(model: str, budget: str, policy: str, hardware: HardwareProfile) -> str:
    """The short run that confirms a quick-planning answer on the target machine."""
    return (
        f"tilemem doctor --probe --out hw.json && tilemem tmap validate {model} --hardware hw.json "
        f"--budgets {budget.replace(' ', '')} --policies {BASELINE},{policy} --repeats 1"
    )


def table(rec: Recommendation) -> str:
    """The predicted table with the pick marked."""
    head = f"{'policy':16s} {'tile':>5s} {'decode tok/s':>12s} {'prefill tok/s':>13s} {'p50 ms':>8s} " \
           f"{'p95 ms':>8s} {'disk MB/tok':>11s} {'hit':>5s}"  # fmt: skip
    lines = [f"budget {rec.budget}", head, "-" * len(head)]
    for c in rec.candidates:
        p = c.prediction
        mark = "  <- recommended" if c is rec.recommended else ""
        lines.append(
            f"{c.policy:16s} {c.tile:5d} {p.decode_tok_s:12.2f} {p.prefill_tok_s:13.1f} {p.p50_ms:8.2f} "
            f"{p.p95_ms:8.2f} {p.bytes_per_token.get('disk', 0) / 1e6:11.2f} {p.hit_rate:5.2f}{mark}"
        )
    r = rec.recommended
    lines.append(
        f"recommended: {r.policy} tile {r.tile} ({rec.reason}); confidence {rec.confidence:.0%} "
        f"(error band {rec.error_band:.0%})"
    )
    if rec.extrapolated:
        lines.append("QUICK-PLANNING ESTIMATE (outside what was measured): " + "; ".join(rec.notes))
        lines.append(f"confirm with: {rec.probe_hint}")
    return "\n".join(lines)
