"""The TMAP cost model: predicted prefill/decode speed of a plan on a hardware profile for a workload.

A step (prefill of P prompt tokens, or decode of B sequences) costs:

- overhead: the engine's per-step cost plus a per-layer dispatch cost (measured by the probe);
- non-expert work: attention, norm, router and LM head weights streamed at the kernel bandwidth of
  the batch, the KV cache read at DRAM bandwidth, and the always-active FFNs (shared experts, dense
  layers), modelled as resident (policies place them first; see `tilemem.tmap.shape`);
- per MoE layer, routed experts: an expert with per-token routing probability p runs in the step with
  probability q = 1 - (1 - p)^B, on N = B p / q tokens. Each resident block (merged range) is one task:
  task overhead + bytes x seconds-per-byte at batch N. Its disk tiles are hits when they are among the
  hottest disk tiles that fit the DRAM tile cache (the LFU cache converges to those; prefill starts
  cold), else O_DIRECT reads by `io_depth` threads (read + crc32 per thread) computed as they land.
  Layer time = max(CPU compute of what is ready + of the missed tiles, exposed reads + last tile),
  in parallel with any GPU-resident blocks. Reads the router prefetches for the next layer overlap
  that layer's attention, up to the staging slots the runtime leaves to prefetch (a prefetched tile
  that lands early waits in its slot for its layer), while the tile cache has room; with the cache
  full, prefetch is modelled as paused (see `predict`). The I/O threads' crc32 adds to the CPU side
  when the compute threads leave no core idle.

Bytes are the plan's tile format's (FP8: weights plus block scales), and each format streams at the kernel
rate the probe measured for it: an FP8 model's experts and attention at the FP8 kernel's, its bf16 LM
head at bf16's (`PlanShape.head_dtype`); a bf16 model's FFN tiles, which its store packs as x12, at the x12
kernel's (`PlanShape.tile_dtype`), its attention and LM head at bf16's.

Decode tok/s = B / E[step]; p50 ~ E[step] and p95 = E[step] + 1.645 sd, the spread coming from which
experts are routed (independent Bernoulli experts). Every figure comes from the hardware profile;
lookups outside what was measured are listed in `Prediction.notes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tilemem.placement.budgets import DEFAULT_CACHE_BYTES
from tilemem.placement.plan import Plan
from tilemem.placement.profile import Profile
from tilemem.tmap.hardware import HardwareProfile
from tilemem.tmap.shape import LayerShape, PlanShape

Z95 = 1.645
"""One-sided 95% point of the normal distribution."""


@dataclass(frozen=True)
class ServingWorkload:
    """What is served: the routing profile and the shape of the requests."""

    profile: Profile
    """Routing probabilities per MoE layer and expert."""
    batch: int = 1
    """Sequences decoding together."""
    prompt_tokens: int = 64
    """Prompt length (prefill tokens per sequence)."""
    decode_tokens: int = 32
    """Tokens generated per sequence (sets the mean context of decode steps)."""
    name: str = ""
    """Workload name for reports."""
    phase: str = "all"
    """Routing counts to use: all, prefill or decode."""
    cold_cache: bool = False
    """Each run starts a fresh engine, its DRAM tile cache filled only by the run's own prefill (what `tilemem
    bench` and `tmap validate` measure); False: a long-running engine whose LFU cache holds the hottest tiles."""

    @property
    def context(self) -> float:
        """Mean context length of a decode step."""
        return self.prompt_tokens + self.decode_tokens / 2


@dataclass(frozen=True)
class RuntimeSettings:
    """The runtime knobs the model needs (defaults are the runtime's)."""

    io_depth: int = 4
    """Reads in flight (I/O threads)."""
    prefetch: bool = True
    """Router-based prefetch of the next layer's disk tiles."""
    verify_reads: bool = True
    """crc32 of every read."""
    cache_bytes: int | None = None
    """DRAM tile cache (None: what the plan leaves free in DRAM, else the runtime default)."""
    store_tile: int | None = None
    """Neurons per store tile (None: the plan's tile size)."""


@dataclass(frozen=True)
class StepTime:
    """Seconds of one engine step, by part."""

    overhead_s: float
    """Per-step and per-layer dispatch overhead."""
    non_expert_s: float
    """Non-expert weights, KV cache and always-active FFNs."""
    cpu_experts_s: float
    """Routed-expert tasks computed on the CPU (resident blocks, cache hits, fetched tiles)."""
    gpu_experts_s: float
    """Routed-expert tasks computed on the GPU."""
    disk_s: float
    """O_DIRECT read time (before overlap)."""
    exposed_disk_s: float
    """Read time not hidden behind compute or prefetch."""
    total_s: float
    """Expected step time."""
    std_s: float
    """Standard deviation from routing."""


@dataclass(frozen=True)
class Prediction:
    """Predicted speed of one plan."""

    plan: str
    """Plan name."""
    policy: str
    """Policy."""
    tile: int
    """Tile size (neurons)."""
    budget: str
    """Budget as written."""
    batch: int
    """Decode batch."""
    prefill_tok_s: float
    """Prompt tokens per second of one sequence's prefill."""
    decode_tok_s: float
    """Generated tokens per second (all sequences)."""
    p50_ms: float
    """Median per-step decode latency."""
    p95_ms: float
    """95th percentile per-step decode latency."""
    decode: StepTime
    """Decode step breakdown."""
    prefill: StepTime
    """Prefill step breakdown."""
    bytes_per_token: dict[str, float]
    """Decode bytes read per generated token from dram, vram and disk."""
    hit_rate: float
    """Predicted share of disk-tile accesses served by the DRAM tile cache (decode)."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    """Figures looked up outside what the hardware profile measured."""

    @property
    def extrapolated(self) -> bool:
        """Whether any figure was extrapolated."""
        return bool(self.notes)


class _Ctx:
    """Lookups with their notes collected."""

    def __init__(self, hw: HardwareProfile, dtype: str, settings: RuntimeSettings, tile_dtype: str = "") -> None:
        self.hw, self.dtype, self.settings = hw, dtype, settings
        # the FFN tiles' own format (x12) where the profile measured its kernel; else the model's dtype, as
        # profiles probed before x12 tiles had their own figures counted them
        measured = any(k.dtype == tile_dtype for k in hw.kernels)
        self.tile_dtype = tile_dtype if tile_dtype and measured else dtype
        self.notes: list[str] = []
        cores = int(hw.meta.get("cores", 0) or hw.cpu_threads)
        # I/O threads' CPU work (crc32) takes compute time when no core is left idle for it
        self.io_steals_cpu = hw.cpu_threads >= cores
        if not hw.measured:
            self.notes.append(f"hardware profile '{hw.name}' is not measured")

    def _note(self, notes: list[str]) -> None:
        for n in notes:
            if n not in self.notes:
                self.notes.append(n)

    def kernel(self, device: str, batch: float, dtype: str | None = None) -> tuple[float, float]:
        """(seconds per weight byte, task overhead) of weights in `dtype` (default: the plan's tile format)."""
        if device == "cuda" and not self.hw.has_gpu:
            self._note([f"the plan uses 'cuda' but hardware profile '{self.hw.name}' has no GPU"])
        spb, ovh, notes = self.hw.kernel(device, dtype or self.dtype, batch)
        self._note(notes)
        return spb, ovh

    def fetch(self, tile_bytes: float, misses: float) -> float | None:
        """Seconds of the measured read-and-compute pipeline for `misses` tiles, None if not measured."""
        got = self.hw.fetch_time(int(tile_bytes), self.settings.io_depth, misses)
        if got is None:
            return None
        seconds, notes = got
        self._note(notes)
        return seconds

    def read_cycle(self, nbytes: int) -> tuple[float, float]:
        """(seconds one I/O thread spends per tile: the read at the runtime's depth then its crc32,
        CPU seconds of that crc32)."""
        _, per, notes = self.hw.disk_read(nbytes, self.settings.io_depth)
        self._note(notes)
        crc = self.hw.checksum_bandwidth_gbps
        cpu = nbytes / (crc * 1e9) if self.settings.verify_reads and crc > 0 else 0.0
        return per + cpu, cpu


def predict(
    plan: Plan,
    hardware: HardwareProfile,
    workload: ServingWorkload | Profile | None = None,
    settings: RuntimeSettings | None = None,
) -> Prediction:
    """Predict `plan`'s prefill and decode speed on `hardware` for `workload` (see the module docstring).

    `workload` may be a ServingWorkload, a bare Profile (batch 1, 64-token prompts, 32 decoded tokens)
    or None (uniform routing)."""
    if workload is None:
        workload = Profile.uniform(plan.topology)
    if isinstance(workload, Profile):
        workload = ServingWorkload(workload)
    workload.profile.check_matches(plan.topology, "the workload's profile")
    settings = settings or RuntimeSettings()
    shape = PlanShape.of(plan, settings.store_tile)
    ctx = _Ctx(hardware, shape.dtype, settings, shape.tile_dtype)
    probs = {lay.index: workload.profile.probabilities(lay.index, workload.phase) for lay in shape.moe_layers}
    b = max(1, workload.batch)
    hot, capacity, n_disk = _hot_tiles(shape, probs, b, settings)
    # With the cache full of hotter tiles, what is left to read is the cold tail, which the router
    # predicts worst: the runtime's auto prefetch then mostly pauses (fewer than half of the prefetched
    # tiles used), so nothing is modelled as hidden (measured: modelling it over-predicted 70%-budget
    # decode by 60-70%). Else prefetch has the cache's free room plus the staging slots demand reads
    # leave it.
    prefetch_slots = 0
    if settings.prefetch and n_disk <= capacity:
        prefetch_slots = max(0, capacity - n_disk + settings.io_depth - max(1, settings.io_depth // 2))
    # a fresh engine's decode steps (the first token comes from the prefill) after a prefill that read every
    # disk tile once and left an arbitrary `filled` share of them cached (LFU counts all 1)
    warm = (max(1, workload.decode_tokens - 1), min(1.0, capacity / n_disk) if n_disk else 1.0)
    warm = warm if workload.cold_cache else (0, 0.0)
    dec, dec_bytes, hit = _step(shape, probs, b, b * workload.context, hot, prefetch_slots, ctx, warm)
    p = max(1, workload.prompt_tokens)
    pre, _, _ = _step(shape, probs, p, p, set(), 0, ctx, (0, 0.0))  # prefill starts with a cold tile cache
    return Prediction(
        plan=plan.name,
        policy=plan.policy,
        tile=plan.tile,
        budget=plan.budget_source,
        batch=b,
        prefill_tok_s=p / pre.total_s,
        decode_tok_s=b / dec.total_s,
        p50_ms=dec.total_s * 1e3,
        p95_ms=(dec.total_s + Z95 * dec.std_s) * 1e3,
        decode=dec,
        prefill=pre,
        bytes_per_token={k: v / b for k, v in dec_bytes.items()},
        hit_rate=hit,
        notes=tuple(ctx.notes),
    )


def _hot_tiles(
    shape: PlanShape, probs: dict[int, list[float]], batch: int, settings: RuntimeSettings
) -> tuple[set[tuple[int, int, int]], int, int]:
    """The disk tiles an LFU cache keeps at steady state (the most often accessed that fit), its capacity
    in tiles, and the number of disk tiles."""
    cache = settings.cache_bytes if settings.cache_bytes is not None else shape.cache_bytes
    cache = DEFAULT_CACHE_BYTES if cache is None else cache
    slots = max(cache // shape.slot_bytes, settings.io_depth)
    capacity = slots - settings.io_depth
    tiles = [
        (1 - (1 - probs[lay.index][ex.expert]) ** batch, lay.index, ex.expert, j)
        for lay in shape.moe_layers
        for ex in lay.experts
        for j in range(len(ex.disk_tiles))
    ]
    tiles.sort(key=lambda t: -t[0])  # stable: ties keep layer/expert order
    return {(lay, e, j) for _, lay, e, j in tiles[:capacity]}, capacity, len(tiles)


def _step(
    shape: PlanShape,
    probs: dict[int, list[float]],
    tokens: int,
    kv_tokens: float,
    hot: set[tuple[int, int, int]],
    prefetch_slots: int,
    ctx: _Ctx,
    warm: tuple[int, float],
) -> tuple[StepTime, dict[str, float], float]:
    """One step over `tokens` tokens (decode: one per sequence; prefill: the prompt), reading
    `kv_tokens` cached tokens' K/V per layer; `warm`: see `hit_probability`."""
    hw = ctx.hw
    ne_dev = "cuda" if shape.fastest == "cuda" else "cpu"
    spb_ne, ovh_ne = ctx.kernel(ne_dev, tokens)
    spb_head = ctx.kernel(ne_dev, tokens, shape.head_dtype)[0] if shape.head_dtype else spb_ne
    kv_spb = 1 / (hw.dram_bandwidth_gbps * 1e9) if hw.dram_bandwidth_gbps > 0 else spb_ne
    overhead = hw.step_overhead_us * 1e-6 + len(shape.layers) * hw.layer_overhead_us * 1e-6
    non_expert = shape.head_bytes * spb_head
    dram = float(shape.head_bytes)
    vram = 0.0
    cpu_s = gpu_s = disk_s = exposed_s = var = disk_bytes = hits = accesses = 0.0
    total = overhead + non_expert
    seen_moe = False
    for lay in shape.layers:
        layer_ne = lay.non_expert_bytes * spb_ne + lay.kv_bytes_per_token * kv_tokens * kv_spb
        if lay.always_bytes:
            spb_cpu, ovh_cpu = ctx.kernel("cpu", tokens, ctx.tile_dtype)
            layer_ne += ovh_cpu + lay.always_bytes * spb_cpu
        dram += lay.non_expert_bytes + lay.always_bytes + lay.kv_bytes_per_token * kv_tokens
        non_expert += layer_ne
        total += layer_ne
        if not lay.experts:
            continue
        # the router prefetches this layer's tiles at the end of the previous MoE layer, so they
        # overlap this layer's attention; the first MoE layer has no such window
        window = layer_ne + hw.layer_overhead_us * 1e-6 if seen_moe else 0.0
        seen_moe = True
        r = _moe_layer(lay, probs[lay.index], tokens, hot, prefetch_slots, window, ctx, warm)
        total += r["time"]
        cpu_s += r["cpu"]
        gpu_s += r["gpu"]
        disk_s += r["io"]
        exposed_s += r["exposed"]
        var += r["var"]
        dram += r["dram"]
        vram += r["vram"]
        disk_bytes += r["disk_bytes"]
        hits += r["hits"]
        accesses += r["accesses"]
    if ne_dev == "cuda":
        vram += shape.head_bytes + sum(lay.non_expert_bytes for lay in shape.layers)
        dram -= shape.head_bytes + sum(lay.non_expert_bytes for lay in shape.layers)
    step = StepTime(overhead, non_expert, cpu_s, gpu_s, disk_s, exposed_s, total, math.sqrt(var))
    return step, {"dram": dram, "vram": vram, "disk": disk_bytes}, (hits / accesses if accesses else 0.0)


def hit_probability(hot: bool, q: float, steps: int = 0, filled: float = 0.0) -> float:
    """Share of a disk tile's accesses that the DRAM tile cache serves, for a tile run with probability `q`
    per step. Steady state (`steps` 0): 1 for the hottest tiles, the ones an LFU cache keeps, else 0.
    A fresh engine (`steps` decode steps after a prefill that left a random `filled` share of the disk
    tiles cached): a tile's first access in the run is a hit only when the prefill left it there, and that
    first access is a share f = (1 - (1 - q)^steps) / (steps q) of its expected accesses; after it a hot
    tile stays cached and a cold one does not: 1 - f (1 - filled) for a hot tile, f filled for a cold one.
    Measured on demo-small (bf16, kt_expert, 15 decode steps after a 64-token prompt): decode hit rate 0.26
    at the 70% budget (this predicts 0.28, the steady state 0.35), 0.07 at 10% (0.09)."""
    if steps <= 0 or q <= 0:
        return 1.0 if hot else 0.0
    first = (1 - (1 - q) ** steps) / (steps * q)
    return 1 - first * (1 - filled) if hot else first * filled


def _moe_layer(
    lay: LayerShape,
    probs: list[float],
    tokens: int,
    hot: set[tuple[int, int, int]],
    prefetch_slots: int,
    window: float,
    ctx: _Ctx,
    warm: tuple[int, float],
) -> dict[str, float]:
    """Expected time and traffic of one MoE layer's routed experts."""
    extra = ctx.hw.cached_task_extra_us * 1e-6
    ready = gpu = miss_compute = misses = io_serial = io_cpu = var = 0.0
    dram = vram = disk_bytes = hits = accesses = 0.0
    for ex in lay.experts:
        p = probs[ex.expert]
        q = 1 - (1 - p) ** tokens
        if q <= 0:
            continue
        n = tokens * p / q  # tokens routed to the expert when it runs
        spb, ovh = ctx.kernel("cpu", n, ctx.tile_dtype)
        c_ready = sum(ovh + nb * spb for nb in ex.blocks.get("cpu", ()))
        dram_e = sum(ex.blocks.get("cpu", ()))
        c_gpu = 0.0
        if ex.blocks.get("cuda"):
            spb_g, ovh_g = ctx.kernel("cuda", n)
            c_gpu = sum(ovh_g + nb * spb_g for nb in ex.blocks["cuda"])
            vram += q * sum(ex.blocks["cuda"])
        c_miss = c_io = c_cpu = m = 0.0
        for j, nb in enumerate(ex.disk_tiles):
            task = ovh + extra + nb * spb
            accesses += q
            h = hit_probability((lay.index, ex.expert, j) in hot, q, *warm)
            c_ready += h * task
            dram_e += h * nb
            hits += q * h
            if h < 1:
                cycle, crc = ctx.read_cycle(nb)
                c_miss += (1 - h) * task
                c_io += (1 - h) * cycle
                c_cpu += (1 - h) * crc
                disk_bytes += q * (1 - h) * nb
                m += 1 - h
        ready += q * c_ready
        gpu += q * c_gpu
        miss_compute += q * c_miss
        misses += q * m
        io_serial += q * c_io
        io_cpu += q * c_cpu
        dram += q * dram_e
        cost = c_ready + c_gpu + c_miss + c_io / ctx.settings.io_depth
        var += q * (1 - q) * cost * cost
    io = io_serial / min(ctx.settings.io_depth, max(1.0, misses)) if misses else 0.0
    pipeline = ctx.fetch(disk_bytes / misses, misses) if misses else None
    hidden = 0.0
    if misses and prefetch_slots and window > 0:  # prefetched reads overlap the attention before
        hidden = min(window, io * min(float(prefetch_slots), misses) / misses)
    # reads slow the engine thread down while it computes (measured per MiB by the probe)
    interference = disk_bytes / 2**20 * ctx.hw.read_interference_us_per_mib * 1e-6
    if pipeline is not None:  # measured miss path: reads, crc32 and the tiles' compute, overlapped
        cpu_side = max(ready + miss_compute + interference, pipeline - hidden)
    else:
        last = miss_compute / max(1.0, misses)  # expected compute of the last tile to land
        steal = io_cpu if ctx.io_steals_cpu else 0.0
        cpu_side = max(ready + miss_compute + steal + interference, io - hidden + last)
    time = max(cpu_side, gpu)
    return {
        "time": time,
        "cpu": ready + miss_compute,
        "gpu": gpu,
        "io": io,
        "exposed": max(0.0, time - max(ready + miss_compute, gpu)),
        "var": var,
        "dram": dram,
        "vram": vram,
        "disk_bytes": disk_bytes,
        "hits": hits,
        "accesses": accesses,
    }
