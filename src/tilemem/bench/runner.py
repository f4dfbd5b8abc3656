"""The ablation matrix: workloads x budgets x policies x async on/off x repeats, interleaved.

Every cell is measured once per round and rounds repeat, so the machine's drifting memory
bandwidth hits every policy alike. Each run loads the model under its plan with a cold tile cache;
disk tiles are read with O_DIRECT (the page cache never serves them), and the page cache is also
dropped before each run when we may (root).
"""

from __future__ import annotations

import gc
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from tilemem.artifacts.mir import plan_checksum
from tilemem.bench.evidence import SCHEMA, Row, environment, gate, row_dict, write_json
from tilemem.engine.llm import LLM, peak_rss_bytes
from tilemem.engine.sampling import SamplingParams
from tilemem.errors import ConfigError
from tilemem.loader.checkpoint import Checkpoint
from tilemem.models.topology import Topology
from tilemem.placement.profile import Profile
from tilemem.runtime.setup import default_store_dir, make_plan
from tilemem.runtime.tile_store import convert


@dataclass(frozen=True)
class BenchSpec:
    """What to measure."""

    model: str
    """Checkpoint directory."""
    out: str = "bench_out"
    """Where evidence, report and plots go."""
    workloads: tuple[str, ...] = ("mixed",)
    """Built-in workload names or JSONL files."""
    budgets: tuple[str, ...] = ("35%",)
    """DRAM budgets: a percent of routed-expert bytes (plus the non-expert weights), or cpu=SIZE."""
    policies: tuple[str, ...] = ("uniform", "kt_expert", "tilepo_coarse", "tilepo_fine")
    """Policies to compare (include uniform and kt_expert)."""
    async_modes: tuple[bool, ...] = (False,)
    """Async planning off / on."""
    repeats: int = 3
    """Rounds."""
    prompt_tokens: int = 64
    """Prompt length of each run."""
    decode_tokens: int = 32
    """Tokens generated per run."""
    threads: int = 2
    """Torch threads."""
    tile: int = 128
    """Fine tile size (neurons)."""
    profile_tokens: int = 2048
    """Tokens profiled per workload to guide the plans."""
    store: str | None = None
    """Tile store directory (default beside the checkpoint)."""
    cache_fraction: float = 0.1
    """Share of the DRAM expert budget reserved as the dynamic tile cache."""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, flag in BENCH_COUNTS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1 ({flag}), got {value!r}.")
        if not 0 <= self.cache_fraction < 1:
            raise ConfigError(f"cache_fraction must be in [0, 1), got {self.cache_fraction}.")
        for name in ("workloads", "budgets", "policies", "async_modes"):
            if not getattr(self, name):
                raise ConfigError(f"the bench needs at least one entry in {name} (--{name.replace('_modes', '')}).")


BENCH_COUNTS = {
    "repeats": "--repeats",
    "prompt_tokens": "--prompt-tokens",
    "decode_tokens": "--decode-tokens",
    "threads": "--threads",
    "tile": "--tile-size",
    "profile_tokens": "profile_tokens",
}
"""BenchSpec's counts, each at least 1, and the flag that sets it."""


def budget_text(budget: str, topo: Topology) -> tuple[str, int]:
    """`35%` -> (`cpu=<bytes>B`, bytes): non-expert + shared/dense + 35% of routed-expert bytes."""
    if budget == "auto":
        from tilemem.tmap.auto import auto_budget

        ab = auto_budget(topo)
        return ab.text, ab.cpu_bytes
    if budget.endswith("%"):
        frac = float(budget[:-1]) / 100
        n = topo.non_expert_bytes + topo.shared_and_dense_bytes + int(frac * topo.routed_expert_bytes)
        return f"cpu={n}B", n
    if budget.startswith("cpu="):
        from tilemem.units import parse_bytes

        return budget, parse_bytes(budget[4:], "cpu budget")
    raise ConfigError(f"bench budget '{budget}' must be a percent of expert bytes (35%) or cpu=SIZE.")


def drop_page_cache() -> bool:
    """Drop the page cache when running as root (honest cold-disk runs); False when not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def reset_peak_rss() -> None:
    """Reset VmHWM so each run reports its own peak (Linux clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def run_once(llm: LLM, prompt: list[int], decode: int) -> dict:
    """One generation; timings from the engine's per-step stats."""
    llm.generate([prompt], SamplingParams(max_tokens=decode, temperature=0, ignore_eos=True))
    st = llm.stats()
    lat = sorted(s["seconds"] * 1e3 for s in st.steps if not s["prefill"])
    rt = st.runtime or {}
    # the decode steps' hit rate, as decode tok/s and TMAP's prediction count them (a prefill reads cold)
    hits = sum(s.get("hits", 0) for s in st.steps if not s["prefill"])
    looked = hits + sum(s.get("misses", 0) for s in st.steps if not s["prefill"])
    return dict(
        prefill_tok_s=st.prefill_tok_s,
        decode_tok_s=st.decode_tok_s,
        decode_tokens=st.decode_tokens + 1,
        p50_ms=statistics.median(lat) if lat else 0.0,
        p95_ms=lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else 0.0,
        disk_bytes=int(rt.get("disk_bytes", 0)),
        dram_bytes=int(rt.get("dram_bytes", 0)),
        hit_rate=hits / looked if looked else 0.0,
        stall_s=float(rt.get("stall_s", 0.0)),
    )


def run_bench(spec: BenchSpec, progress: bool = True, before_round: Callable[[int], None] | None = None) -> dict:
    """Run the matrix; write evidence.json, report.md and plots into spec.out; return the evidence.
    `before_round(rep)`, if given, runs before each round of the repeats (`tmap validate` probes there)."""
    from tilemem.bench.report import write_report
    from tilemem.tools.profiler import profile_checkpoint
    from tilemem.workloads.workload import load_workload

    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint.open(spec.model)
    topo = Topology.from_config(ckpt.config)
    store = Path(spec.store) if spec.store else default_store_dir(ckpt, spec.tile)
    convert(ckpt.path, store, spec.tile, progress=progress)
    profiles: dict[str, Profile] = {}
    prompts: dict[str, list[int]] = {}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt.path / "tokenizer.json"))
    for wl in spec.workloads:
        profiles[wl] = profile_checkpoint(ckpt.path, load_workload(wl, seed=0), spec.profile_tokens)
        text = " ".join(r.prompt or " ".join(c for _, c in r.messages) for r in load_workload(wl, seed=1).requests)
        prompts[wl] = tok.encode(text).ids[: spec.prompt_tokens]
    plans = {}
    for wl in spec.workloads:
        for b in spec.budgets:
            text, _ = budget_text(b, topo)
            routed = [int(b[:-1]) if b.endswith("%") else 0]
            cache = (
                f"cpu={spec.cache_fraction * routed[0] / 100 * topo.routed_expert_bytes:.0f}B"
                if (spec.cache_fraction > 0 and routed[0] > 0)
                else None
            )
            for p in spec.policies:
                plans[(wl, b, p)] = make_plan(ckpt, text, p, profiles[wl], spec.tile, cache=cache)
    rows = []
    total = spec.repeats * len(plans) * len(spec.async_modes)
    bar = tqdm(total=total, desc="bench", disable=not progress)
    for rep in range(spec.repeats):
        if before_round is not None:
            before_round(rep)
        for (wl, b, p), plan in plans.items():
            for asyn in spec.async_modes:
                drop_page_cache()
                reset_peak_rss()
                llm = LLM(
                    ckpt.path,
                    threads=spec.threads,
                    plan=plan,
                    store=store,
                    async_planning=asyn,
                    profile=profiles[wl],
                    max_batch=1,
                )
                m = run_once(llm, prompts[wl], spec.decode_tokens)
                llm.close()
                text, nbytes = budget_text(b, topo)
                rows.append(
                    row_dict(
                        Row(
                            workload=wl,
                            budget=b,
                            budget_bytes=nbytes,
                            policy=p,
                            async_planning=asyn,
                            repeat=rep,
                            plan_checksum=plan_checksum(plan),
                            prompt_tokens=len(prompts[wl]),
                            peak_rss=peak_rss_bytes(),
                            **m,
                        )
                    )
                )
                del llm
                gc.collect()
                bar.update(1)
    bar.close()
    evidence = {"schema_version": SCHEMA, "environment": environment(), "spec": spec.__dict__, "rows": rows}
    evidence["gate"] = gate(evidence)
    write_json(out / "evidence.json", evidence)
    write_report(evidence, out)
    return evidence
