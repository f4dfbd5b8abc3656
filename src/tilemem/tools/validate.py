"""`tilemem tmap validate`: run a sample of the bench matrix here and compare predicted with measured.

The runs are real `tilemem bench` runs (`bench.runner.run_bench`: cold tile cache, O_DIRECT disk
tier, interleaved repeats). Each (budget, policy) cell's plan is rebuilt exactly as the bench built it
(its checksum is compared) and predicted from the hardware profile, which is measured among the runs
unless one is given: a probe before each round of the repeats, each figure the median of the rounds
(this machine's memory bandwidth drifts by tens of percent within minutes: a profile of one moment
predicted the runs of another up to 25% above or below them, where the median of rounds taken among
the runs follows their typical state). Reported: predicted vs measured (median, with the measured spread)
decode tok/s per cell, the median absolute error, and per budget whether the predicted best policy
is the measured best or within the measured spread; the predicted best is what `tmap predict` would
recommend (kt_expert when the fastest is predicted less than `min_gain` faster). Acceptance: median
error <= 15% and agreement in at least 80% of budgets.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tilemem import sysinfo
from tilemem.artifacts.mir import plan_checksum
from tilemem.tmap.cost import ServingWorkload, predict
from tilemem.tmap.hardware import HardwareProfile, Validation
from tilemem.tmap.recommend import BASELINE

MAX_MEDIAN_ERROR = 0.15
"""Acceptance: median |predicted - measured| / measured decode tok/s."""
MIN_AGREEMENT = 0.8
"""Acceptance: share of budgets whose predicted best policy is the measured best (or within its spread)."""


@dataclass(frozen=True)
class ValidationRow:
    """One (workload, budget, policy) cell."""

    workload: str
    budget: str
    policy: str
    predicted: float
    """Predicted decode tok/s."""
    measured: float
    """Median measured decode tok/s over the repeats."""
    low: float
    """Slowest measured repeat."""
    high: float
    """Fastest measured repeat."""
    runs: int
    """Repeats."""
    predicted_hit_rate: float
    measured_hit_rate: float
    predicted_p50_ms: float
    """Predicted median decode step."""
    measured_p50_ms: float
    """Median over repeats of each run's median decode step (less sensitive to others' load than tok/s)."""
    same_plan: bool
    """The rebuilt plan's checksum equals the benchmarked one."""

    @property
    def error(self) -> float:
        """|predicted - measured| / measured."""
        return abs(self.predicted - self.measured) / self.measured if self.measured else float("inf")


@dataclass(frozen=True)
class BudgetAgreement:
    """Predicted vs measured best policy of one budget."""

    workload: str
    budget: str
    predicted_best: str
    """Fastest predicted policy."""
    recommended: str
    """What TMAP recommends: the fastest, or kt_expert when the predicted gain is below the threshold."""
    measured_best: str
    """Fastest measured (median) policy."""
    agree: bool
    """The recommended policy is the measured best, or its measured spread reaches the best's."""


@dataclass(frozen=True)
class ValidationReport:
    """Everything `tmap validate` prints."""

    model: str
    hardware: str
    threads: int
    rows: tuple[ValidationRow, ...]
    budgets: tuple[BudgetAgreement, ...]
    median_abs_error: float
    agreement: float
    seconds: float
    load_average: tuple[float, float]
    """1-minute load average before and after the runs (others' work makes timings noisy)."""

    @property
    def passed(self) -> bool:
        """Both acceptance criteria hold."""
        return self.median_abs_error <= MAX_MEDIAN_ERROR and self.agreement >= MIN_AGREEMENT

    def table(self) -> str:
        """Predicted vs measured, per cell and per budget, and the verdict."""
        head = f"{'workload':9s} {'budget':>7s} {'policy':15s} {'predicted':>10s} {'measured':>9s} " \
               f"{'spread':>15s} {'error':>7s} {'hit p/m':>9s} {'p50 ms p/m':>15s}"  # fmt: skip
        out = [f"tmap validate: {self.model} on '{self.hardware}', {self.threads} threads (decode tok/s)", head,
               "-" * len(head)]  # fmt: skip
        for r in self.rows:
            out.append(
                f"{r.workload:9s} {r.budget:>7s} {r.policy:15s} {r.predicted:10.2f} {r.measured:9.2f} "
                f"{f'{r.low:.2f}-{r.high:.2f}':>15s} {r.error:7.1%} "
                f"{r.predicted_hit_rate:4.2f}/{r.measured_hit_rate:4.2f} "
                f"{r.predicted_p50_ms:7.1f}/{r.measured_p50_ms:<7.1f}"
                + ("" if r.same_plan else "  (plan differs from the bench's!)")
            )
        for b in self.budgets:
            out.append(
                f"budget {b.workload}/{b.budget}: predicted fastest {b.predicted_best}, recommended {b.recommended}, "
                f"measured best {b.measured_best} -> {'agree' if b.agree else 'DISAGREE'}"
            )
        verdict = "PASS" if self.passed else "FAIL"
        out.append(
            f"median abs error {self.median_abs_error:.1%} (<= {MAX_MEDIAN_ERROR:.0%}), best policy agreement "
            f"{self.agreement:.0%} (>= {MIN_AGREEMENT:.0%}): {verdict}; {self.seconds:.0f} s, load average "
            f"{self.load_average[0]:.2f} -> {self.load_average[1]:.2f}"
        )
        return "\n".join(out)

    def validation(self) -> Validation:
        """The summary recorded into the hardware profile."""
        fracs = sorted({float(r.budget[:-1]) / 100 for r in self.rows if r.budget.endswith("%")})
        return Validation(self.model, tuple(fracs), round(self.median_abs_error, 4), len(self.rows))


def agreement(cells: list[ValidationRow], min_gain: float = 0.05) -> BudgetAgreement:
    """Whether TMAP's recommendation among one budget's cells is the measured best (or within its spread)."""
    pb = max(cells, key=lambda r: r.predicted)
    kt = next((r for r in cells if r.policy == BASELINE), None)
    rec = kt if kt is not None and pb.predicted < kt.predicted * (1 + min_gain) else pb
    mb = max(cells, key=lambda r: r.measured)
    agree = rec.policy == mb.policy or rec.high >= mb.low
    return BudgetAgreement(cells[0].workload, cells[0].budget, pb.policy, rec.policy, mb.policy, agree)


def validate(
    model: str | Path,
    hardware: HardwareProfile | None = None,
    budgets: tuple[str, ...] = ("10%", "25%", "35%", "50%", "70%"),
    policies: tuple[str, ...] = ("kt_expert", "tilepo_coarse", "tilepo_fine"),
    workloads: tuple[str, ...] = ("mixed",),
    repeats: int = 5,
    prompt_tokens: int = 64,
    decode_tokens: int = 32,
    threads: int = 2,
    tile: int = 128,
    out: str | Path = "tmap_validate",
    store: str | None = None,
    profile_tokens: int = 1024,
    min_gain: float = 0.05,
    log: Callable[[str], None] = print,
) -> ValidationReport:
    """Measure and compare (module docstring)."""
    from tilemem.bench.runner import BenchSpec, budget_text, run_bench
    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.models.topology import Topology
    from tilemem.runtime.setup import default_store_dir, make_plan
    from tilemem.tools.profiler import profile_checkpoint
    from tilemem.workloads.workload import load_workload

    t0 = time.perf_counter()
    load0 = sysinfo.load_average()
    ckpt = Checkpoint.open(model)
    topo = Topology.from_config(ckpt.config)
    store_dir = Path(store) if store else default_store_dir(ckpt, tile)
    probe_round = None
    rounds: list[HardwareProfile] = []
    if hardware is None:
        from tilemem.tools.probe import ProbeConfig, probe

        # the model's own weight format first: the engine overheads are timed on a model in it
        dtypes = (topo.dtype, *(d for d in ProbeConfig.dtypes if d != topo.dtype))
        moe = next(lt for lt in topo.layers if lt.is_moe)  # and its experts' shape: tasks like the ones predicted
        config = ProbeConfig(
            threads=threads, hidden=topo.hidden_size, disk_dir=str(store_dir.parent), dtypes=dtypes,
            expert_width=moe.expert_intermediate, top_k=moe.top_k, tile=tile,
        )  # fmt: skip

        def probe_round(rep: int) -> None:
            """A probe before each round of the bench: this machine's bandwidth drifts by tens of percent within
            minutes, so the figures are the median of probes taken among the runs they predict (A B A B)."""
            if rep == 0:
                log(f"probing this machine before each of the {repeats} bench rounds (pass --hardware hw.json to "
                    "reuse a profile); round 1:")  # fmt: skip
            else:
                log(f"probe round {rep + 1} of {repeats} ...")
            rounds.append(probe(config, log=log if rep == 0 else lambda _line: None))

    spec = BenchSpec(
        model=str(ckpt.path),
        out=str(out),
        workloads=workloads,
        budgets=budgets,
        policies=policies,
        repeats=repeats,
        prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens,
        threads=threads,
        tile=tile,
        profile_tokens=profile_tokens,
        store=store,
    )
    log(f"running {len(workloads) * len(budgets) * len(policies) * repeats} bench runs ...")
    evidence = run_bench(spec, progress=False, before_round=probe_round)
    if hardware is None:
        hardware = HardwareProfile.median(rounds)
        hardware.save(Path(out) / "hardware.json")
        if len(rounds) > 1:
            log(f"hardware profile: the median of {len(rounds)} probe rounds; batch-1 kernels "
                + ", ".join(f"{k.dtype} {k.bandwidth_gbps:.1f} GB/s" for k in hardware.kernels if k.batch == 1)
                + f"; engine overhead {hardware.step_overhead_us:.0f} us/step, {hardware.layer_overhead_us:.0f} "
                "us/layer")  # fmt: skip
    rows = []
    agreements = []
    for wl in workloads:
        profile = profile_checkpoint(ckpt.path, load_workload(wl, seed=0), spec.profile_tokens)
        for b in budgets:
            text, _ = budget_text(b, topo)
            pct = float(b[:-1]) if b.endswith("%") else 0.0
            # the bench's cache reserve: its share of the routed budget (same formula as run_bench)
            cache = (
                f"cpu={spec.cache_fraction * pct / 100 * topo.routed_expert_bytes:.0f}B"
                if spec.cache_fraction > 0 and pct > 0
                else None
            )
            cells = []
            for p in policies:
                runs = [r for r in evidence["rows"] if (r["workload"], r["budget"], r["policy"]) == (wl, b, p)]
                if not runs:
                    continue
                plan = make_plan(ckpt, text, p, profile, tile, cache=cache)
                # each bench run is a fresh engine: its tile cache starts cold
                wk = ServingWorkload(profile, 1, int(runs[0]["prompt_tokens"]), decode_tokens, wl, cold_cache=True)
                pred = predict(plan, hardware, wk)
                tok = [float(r["decode_tok_s"]) for r in runs]
                row = ValidationRow(
                    wl, b, p, pred.decode_tok_s, statistics.median(tok), min(tok), max(tok), len(tok),
                    pred.hit_rate, statistics.median(float(r["hit_rate"]) for r in runs),
                    pred.p50_ms, statistics.median(float(r["p50_ms"]) for r in runs),
                    plan_checksum(plan) == runs[0]["plan_checksum"],
                )  # fmt: skip
                rows.append(row)
                cells.append(row)
            if cells:
                agreements.append(agreement(cells, min_gain))
    errors = [r.error for r in rows]
    return ValidationReport(
        model=ckpt.path.name,
        hardware=hardware.name,
        threads=threads,
        rows=tuple(rows),
        budgets=tuple(agreements),
        median_abs_error=statistics.median(errors) if errors else float("inf"),
        agreement=sum(a.agree for a in agreements) / len(agreements) if agreements else 0.0,
        seconds=time.perf_counter() - t0,
        load_average=(load0, sysinfo.load_average()),
    )
