"""`--budget auto` and `--policy auto`.

`--budget auto`: the largest plan that fits the memory this process may use (`tilemem.memlimit`: its
cgroup's limit, RLIMIT_AS/RLIMIT_DATA, the machine's available memory, the smallest; or `--memory-limit`),
with a stated safety margin: cpu = (that limit - KV cache reserve - staging slots) x (1 - margin), capped at
what the whole model needs (the process's baseline, python and torch, is already in use when it is measured);
with a GPU, cuda = free VRAM x (1 - margin) the same way. It never exceeds the limit it was given
(`TILEMEM_FAKE_RAM` fakes a smaller machine), and refuses when even the non-expert weights do not fit.
With no routing profile (the uniform prior), `auto` keeps most of the expert share of the DRAM budget as
a dynamic (LFU) tile cache rather than fixed resident tiles (`learning_cache`): the prior cannot tell hot
experts from cold ones, the cache learns them from the live routing.
`--policy auto`: the plan the cost model recommends (see `recommend`) on a hardware profile: a measured
one if saved (`tilemem doctor --probe`), else the closest shipped reference profile. It never probes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tilemem import sysinfo
from tilemem.memlimit import MemoryLimit, memory_limit
from tilemem.models.topology import Topology
from tilemem.placement.budgets import IO_DEPTH, Budgets
from tilemem.placement.errors import BudgetError
from tilemem.placement.profile import Profile
from tilemem.tmap.hardware import HardwareProfile, closest_reference
from tilemem.units import format_bytes

SAFETY_MARGIN = 0.15
"""Share of the memory limit `--budget auto` leaves alone (allocator slack, other processes, page cache)."""
DEFAULT_HARDWARE = Path.home() / ".cache" / "tilemem" / "hardware.json"
"""Where `tilemem doctor --probe` keeps this machine's profile when no --out is given."""


@dataclass(frozen=True)
class AutoBudget:
    """A budget chosen from the memory the process may use, and why."""

    text: str
    """Budget string, e.g. `cpu=1234B`."""
    cpu_bytes: int
    """DRAM budget."""
    cuda_bytes: int
    """VRAM budget (0: none)."""
    explanation: str
    """How it was computed: which limit, and how the budget splits into non-expert weights and experts."""
    limit: MemoryLimit | None = None
    """The memory limit it was computed from."""


def kv_reserve(topology: Topology, context: int, batch: int) -> int:
    """Bytes of KV cache for `batch` sequences of `context` tokens."""
    per_token = sum(width for _, width in topology.kv_values()) * topology.kv_element_bytes
    return per_token * context * batch


def auto_budget(
    topology: Topology,
    margin: float = SAFETY_MARGIN,
    context: int = 4096,
    batch: int = 1,
    limit: MemoryLimit | None = None,
    free_vram: int | None = None,
    tile: int = 128,
) -> AutoBudget:
    """The largest budget that fits `limit` (default: `memory_limit()`, measured here) less `margin`
    (module docstring)."""
    if not 0 <= margin < 1:
        raise BudgetError(f"safety margin must be in [0, 1), got {margin}.")
    limit = memory_limit() if limit is None else limit
    avail = limit.available
    kv = kv_reserve(topology, context, batch)
    staging = staging_reserve(topology, tile)
    room = int((avail - kv - staging) * (1 - margin))
    need = topology.total_bytes
    cpu = max(0, min(room, need))
    if free_vram is None:
        g = sysinfo.gpu() if os.environ.get("TILEMEM_FAKE_RAM") is None else None
        free_vram = g.free_bytes if g is not None else 0
    cuda = int(free_vram * (1 - margin))
    fast = cuda if cuda > 0 else cpu
    if fast < topology.non_expert_bytes:
        raise BudgetError(
            f"--budget auto: {limit.describe()}; less {format_bytes(kv)} kept for the KV cache and a "
            f"{margin:.0%} margin it leaves {format_bytes(fast)}, less than the "
            f"{format_bytes(topology.non_expert_bytes)} of non-expert weights; free memory, raise the limit "
            "(--memory-limit) or give an explicit --budget."
        )
    if cuda > 0:
        cuda = min(cuda, need)
        cpu = max(0, min(cpu, need - cuda))
        text = f"cuda={cuda}B,cpu={cpu}B" if cpu else f"cuda={cuda}B"
    else:
        text = f"cpu={cpu}B"
    explanation = (
        f"{limit.describe()} - {format_bytes(kv)} KV cache ({context} tokens x {batch}) - "
        f"{format_bytes(staging)} tile staging ({IO_DEPTH} reads in flight), "
        f"x (1 - {margin:.0%} margin) = {format_bytes(room)}; model needs {format_bytes(need)}"
        + (f"; GPU {format_bytes(free_vram)} free -> cuda {format_bytes(cuda)}" if cuda else "")
        + f" -> --budget {text}: {split(topology, cuda + cpu)}"
    )
    return AutoBudget(text, cpu, cuda, explanation, limit)


def staging_reserve(topology: Topology, tile: int) -> int:
    """Bytes of the tile reads in flight: IO_DEPTH slots of one tile (gate, up and down rows of `tile`
    neurons, or of a whole expert when narrower), which the runtime keeps even when a budget leaves its tile
    cache less room (0 without experts). A GGUF model's tiles count their quant types' blocks."""
    sizes = [
        topology.ffn_bytes(min(tile, lt.expert_intermediate), topology.unit_types(lt.index, 0))
        for lt in topology.layers
        if lt.is_moe
    ]
    return IO_DEPTH * max(sizes) if sizes else 0


LEARNING_CACHE_SHARE = 0.9
"""Share of the DRAM budget left for routed experts that `auto` keeps as an LFU tile cache when it has no
profile. Measured (synthetic OLMoE-1B-7B bf16, skewed routing, cold disk, 24 decode tokens, 2 threads): with
the 8 GiB limit's budget 0.84 -> 1.05 tok/s against fixed resident experts (disk bytes per token 0.92 ->
0.55 GB, hit rate 0.63), with the 4 GiB limit's 0.65 -> 0.67; shares 0.5 and 1.0 gave 1.00 and 1.02."""


def learning_cache(topology: Topology, budgets: Budgets, profile: Profile) -> str | None:
    """The `--cache` reserve `auto` adds on the DRAM tier when `profile` is the uniform prior
    (LEARNING_CACHE_SHARE of what is left there after the non-expert weights, when DRAM is the fastest
    tier, and the always-active FFNs), e.g. `cpu=4828422144B`; None with a measured profile, without a
    bounded DRAM tier, when the budgets hold the whole model, or when nothing is left."""
    if profile.source != "uniform" or "cpu" not in budgets.names or budgets.capacity("cpu") is None:
        return None
    if sum(budgets.capacity(t) or 0 for t in budgets.names) >= topology.total_bytes:
        return None  # everything fits: nothing to learn
    fixed = topology.shared_and_dense_bytes + (topology.non_expert_bytes if budgets.names[0] == "cpu" else 0)
    room = budgets.capacity("cpu") - fixed
    return f"cpu={int(room * LEARNING_CACHE_SHARE)}B" if room > 0 else None


def with_learning_cache(
    topology: Topology, budgets: Budgets, profile: Profile, log: Callable[[str], None] = print
) -> Budgets:
    """`budgets` with the `learning_cache` reserve added, saying so in one line; unchanged when there is none."""
    text = learning_cache(topology, budgets, profile)
    if text is None:
        return budgets
    cached = budgets.with_cache(text)
    log(
        f"--budget auto: no routing profile, so {LEARNING_CACHE_SHARE:.0%} of the DRAM left for routed experts "
        f"({format_bytes(cached.cache_bytes('cpu'))}) is a tile cache that learns the hot ones from live routing "
        "(LFU); give --profile (`tilemem profile`) to place them up front"
    )
    return cached


def split(topology: Topology, budget: int) -> str:
    """How `budget` bytes divide: `1.20 GiB non-expert weights + 3.90 GiB of the 11.70 GiB expert weights (33%)`."""
    experts = topology.total_bytes - topology.non_expert_bytes
    held = max(0, min(budget, topology.total_bytes) - topology.non_expert_bytes)
    share = held / experts if experts else 1.0
    return (
        f"{format_bytes(topology.non_expert_bytes)} non-expert weights + {format_bytes(held)} of the "
        f"{format_bytes(experts)} expert weights ({share:.0%})"
    )


def default_hardware(path: str | Path | None = None, log: Callable[[str], None] = print) -> HardwareProfile:
    """The hardware profile `auto` uses, never measured here: `path`, $TILEMEM_HARDWARE, or the profile
    `tilemem doctor --probe` saved, else the closest shipped reference profile. Logs one line saying which."""
    if path:
        hw = HardwareProfile.load(path)  # raises with the fix when missing
        log(f"hardware profile: {hw.name} from {path}")
        return hw
    for p in (os.environ.get("TILEMEM_HARDWARE"), DEFAULT_HARDWARE):
        if p and Path(p).exists():
            hw = HardwareProfile.load(p)
            log(f"hardware profile: {hw.name} ({'measured' if hw.measured else 'not measured'}) from {p}")
            return hw
    mem = sysinfo.memory()
    g = sysinfo.gpu() if os.environ.get("TILEMEM_FAKE_RAM") is None else None
    hw = closest_reference(mem.total / 2**30, g.memory_bytes / 2**30 if g is not None else 0.0)
    log(
        f"hardware profile: reference '{hw.name}' (closest to this machine; not measured: run "
        f"`tilemem doctor --probe` to measure it into {DEFAULT_HARDWARE})"
    )
    return hw


def resolve_auto(
    topology: Topology,
    budget: str,
    policy: str,
    profile: Profile,
    tile: int = 128,
    hardware: HardwareProfile | str | Path | None = None,
    model: str = "",
    log: Callable[[str], None] = print,
    limit: MemoryLimit | None = None,
    context: int = 4096,
    sequences: int = 1,
) -> tuple[str, str, int]:
    """(budget, policy, tile) with `auto` resolved: the budget from the memory limit (`limit`, default
    measured here) less the KV cache of `sequences` sequences of `context` tokens, the policy (and tile) from the cost
    model's recommendation for that budget. Logs what it chose and why: one line for the budget (which
    limit, how it was split), one per note on the limit."""
    if budget == "auto":
        ab = auto_budget(topology, context=context, batch=sequences, limit=limit, tile=tile)
        budget = ab.text
        for note in ab.limit.notes if ab.limit is not None else ():
            log(f"memory limit: {note}")
        log(f"--budget auto: {ab.explanation}")
    if policy == "auto":
        from tilemem.tmap.recommend import recommend

        hw = hardware if isinstance(hardware, HardwareProfile) else default_hardware(hardware, log)
        rec = recommend(topology, profile, hw, budget, allow_extrapolation=True, model=model, tiles=(tile,))
        policy, tile = rec.recommended.policy, rec.recommended.tile
        tag = " (quick-planning estimate)" if rec.extrapolated else ""
        log(
            f"--policy auto: {policy} (tile {tile}), predicted {rec.recommended.prediction.decode_tok_s:.2f} "
            f"decode tok/s; {rec.reason}; confidence {rec.confidence:.0%}{tag}"
        )
    return budget, policy, tile
