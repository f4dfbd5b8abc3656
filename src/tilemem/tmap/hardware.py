"""Hardware profiles: what a machine's tiers and kernels can do, measured by the probe or written by hand.

A profile keeps the seed TMAP's two-tier fields (`vram_*`, `dram_*`, `transfer_*`) and adds the disk
tier (O_DIRECT bandwidth and latency by request size and queue depth) and the engine's own compute
figures (GEMV/GEMM bandwidth and FLOP/s per dtype and batch, per-task and per-layer dispatch overhead).
Units are in the field names: `_gbps` = GB/s (1e9 bytes/s), `_us` = microseconds, `_ns` = nanoseconds,
`_gib` = GiB. Schema `tilemem_hardware_v1`; written atomically.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tilemem.errors import ConfigError
from tilemem.jsonio import read_json, write_json_atomic
from tilemem.models.topology import DTYPE_BYTES

HARDWARE_SCHEMA = "tilemem_hardware_v1"
REFERENCE_DIR = Path(__file__).parent / "reference"


class HardwareError(ConfigError):
    """A hardware profile is missing, malformed, or lacks a figure the model needs."""


@dataclass(frozen=True)
class KernelFigure:
    """Achieved speed of the engine's tile FFN kernel (`partial_ffn`) at one dtype and batch size."""

    device: str
    """`cpu` or `cuda`."""
    dtype: str
    """Weight format, e.g. `bfloat16`, or `fp8_e4m3` (bytes then count the FP8 weights and their scales)."""
    batch: int
    """Tokens per expert call (1 = GEMV)."""
    bandwidth_gbps: float
    """Weight bytes streamed per second, GB/s (the fit's slope, overhead excluded)."""
    gflops: float
    """Achieved GFLOP/s at this batch (2 x batch x weights per second)."""
    task_overhead_us: float
    """Fixed cost of one tile task (kernel launches, Python, fp32 accumulate), microseconds."""


@dataclass(frozen=True)
class DiskFigure:
    """O_DIRECT reads of one request size at one queue depth."""

    request_bytes: int
    """Bytes per read."""
    queue_depth: int
    """Reads in flight (one reader thread each, as the runtime's I/O pool)."""
    bandwidth_gbps: float
    """Aggregate read bandwidth, GB/s."""
    latency_us: float
    """Mean completion time of one read at this depth, microseconds."""


@dataclass(frozen=True)
class FetchFigure:
    """The runtime's miss path measured end to end: tiles read by the I/O threads (O_DIRECT + crc32) into
    cache slots and computed by the engine thread as they land, `io_depth` reads in flight."""

    tile_bytes: int
    """Bytes per tile read."""
    io_depth: int
    """Reads in flight."""
    first_us: float
    """Extra time of the first tile (nothing to overlap it with), microseconds."""
    per_tile_us: float
    """Time per further tile once the pipeline is full, microseconds."""


@dataclass(frozen=True)
class Validation:
    """A `tilemem tmap validate` result recorded into the profile."""

    model: str
    """Checkpoint name."""
    budget_fractions: tuple[float, ...]
    """Budgets validated, as fractions of the routed-expert bytes."""
    median_abs_error: float
    """Median |predicted - measured| / measured decode tok/s."""
    rows: int
    """Rows compared."""


@dataclass(frozen=True)
class HardwareProfile:
    """One machine as the cost model sees it; see the module docstring for units."""

    name: str
    """Profile name."""
    measured: bool = False
    """True when written by `tilemem doctor --probe` on the machine; False for hand-built/reference ones."""
    vram_capacity_gib: float = 0.0
    """GPU memory (0: no GPU)."""
    vram_bandwidth_gbps: float = 0.0
    """GPU memory read bandwidth."""
    vram_latency_ns: float = 0.0
    """GPU memory access latency."""
    dram_capacity_gib: float = 0.0
    """Host memory."""
    dram_bandwidth_gbps: float = 0.0
    """Host memory read bandwidth (all threads)."""
    dram_latency_ns: float = 0.0
    """Host memory access latency."""
    transfer_bandwidth_gbps: float = 0.0
    """Host-to-GPU copy bandwidth from pinned memory (PCIe/NVLink)."""
    transfer_latency_us: float = 0.0
    """Latency of one small host-to-GPU copy."""
    disk_bandwidth_gbps: float = 0.0
    """Sequential O_DIRECT read bandwidth with large requests (summary of `disk`)."""
    disk_latency_us: float = 0.0
    """Latency of one 4 KiB O_DIRECT read at queue depth 1 (summary of `disk`)."""
    disk_free_gib: float = 0.0
    """Free space where the tile store lives."""
    cpu_threads: int = 1
    """Compute threads the figures were measured with."""
    cpu_features: tuple[str, ...] = ()
    """ISA features that matter to the kernels (avx512_bf16, amx_bf16, ...)."""
    cpu_gflops: float = 0.0
    """Peak CPU GEMM GFLOP/s in the model dtype (hand-built profiles; measured ones use `kernels`)."""
    gpu_name: str = ""
    """GPU model (empty: none)."""
    gpu_tflops: float = 0.0
    """GPU dense GEMM TFLOP/s in the model dtype."""
    task_overhead_us: float = 0.0
    """Per tile-task overhead used when `kernels` has no figure for a dtype (hand-built profiles)."""
    cached_task_extra_us: float = 0.0
    """Extra per-task cost of computing a tile from the DRAM tile cache rather than resident memory."""
    layer_overhead_us: float = 0.0
    """Per decoder layer dispatch overhead of the non-expert work (norms, attention, router, executor)."""
    step_overhead_us: float = 0.0
    """Per engine step overhead (embedding, scheduling, sampling, detokenizing)."""
    checksum_bandwidth_gbps: float = 0.0
    """crc32 speed of one I/O thread (the runtime verifies every read; 0: not modelled)."""
    kernels: tuple[KernelFigure, ...] = ()
    """Measured kernel speeds per device, dtype and batch."""
    disk: tuple[DiskFigure, ...] = ()
    """Measured O_DIRECT reads per request size and queue depth."""
    fetch: tuple[FetchFigure, ...] = ()
    """Measured read-and-compute pipeline per tile size (the runtime's miss path)."""
    read_interference_us_per_mib: float = 0.0
    """Engine-thread time lost per MiB that I/O threads read meanwhile (GIL, crc32, DMA)."""
    validations: tuple[Validation, ...] = ()
    """Validate runs recorded into this profile."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Where and how it was measured: host, versions, seconds, notes."""

    # ----- lookups the cost model uses -----

    @property
    def has_gpu(self) -> bool:
        """Whether the profile describes a GPU."""
        return self.vram_capacity_gib > 0

    def kernel(self, device: str, dtype: str, batch: float) -> tuple[float, float, list[str]]:
        """(seconds per weight byte, seconds of fixed overhead per task, extrapolation notes) at `batch`.

        Measured batches are interpolated linearly in time per byte; beyond the largest one time per
        byte grows with the batch (compute bound). Without measured figures the roofline of the tier's
        memory bandwidth and peak FLOP/s is used, and that is noted."""
        notes: list[str] = []
        figs = [k for k in self.kernels if k.device == device and k.dtype == dtype]
        if not figs and any(k.device == device for k in self.kernels):
            other = sorted({k.dtype for k in self.kernels if k.device == device})
            notes.append(f"no {device} kernel figures for {dtype}; used {other[0]}")
            figs = [k for k in self.kernels if k.device == device and k.dtype == other[0]]
        if not figs:
            return self._roofline(device, dtype, batch, notes)
        figs.sort(key=lambda k: k.batch)
        batches = [k.batch for k in figs]
        spb = [1 / (k.bandwidth_gbps * 1e9) for k in figs]
        ovh = [k.task_overhead_us * 1e-6 for k in figs]
        b = max(1.0, batch)
        if b <= batches[0]:
            return spb[0], ovh[0], notes
        if b >= batches[-1]:
            if b > batches[-1]:
                notes.append(f"batch {b:g} beyond the measured {batches[-1]} ({device} {dtype}): compute-bound scaling")
            return spb[-1] * b / batches[-1], ovh[-1], notes
        i = bisect.bisect_right(batches, b)
        w = (b - batches[i - 1]) / (batches[i] - batches[i - 1])
        return spb[i - 1] + w * (spb[i] - spb[i - 1]), ovh[i - 1] + w * (ovh[i] - ovh[i - 1]), notes

    def _roofline(self, device: str, dtype: str, batch: float, notes: list[str]) -> tuple[float, float, list[str]]:
        bw = self.vram_bandwidth_gbps if device == "cuda" else self.dram_bandwidth_gbps
        peak = self.gpu_tflops * 1e3 if device == "cuda" else self.cpu_gflops
        if bw <= 0:
            raise HardwareError(
                f"hardware profile '{self.name}' has no {device} memory bandwidth and no measured {device} kernels; "
                f"set {'vram' if device == 'cuda' else 'dram'}_bandwidth_gbps or run `tilemem doctor --probe`."
            )
        notes.append(f"{device} {dtype} kernels not measured: roofline of {bw:g} GB/s memory bandwidth")
        spb = 1 / (bw * 1e9)
        if peak > 0:  # 2 FLOP per weight per token
            weight_bytes = DTYPE_BYTES.get(dtype, 2)
            spb = max(spb, 2 * batch / (weight_bytes * peak * 1e9))
        return spb, self.task_overhead_us * 1e-6, notes

    def disk_read(self, request_bytes: int, queue_depth: int) -> tuple[float, float, list[str]]:
        """(bytes/s, seconds per read at that depth, extrapolation notes) for O_DIRECT reads.

        Request sizes are interpolated log-linearly between measured sizes at the nearest measured depth
        not above `queue_depth`; outside the measured sizes the nearest is scaled and that is noted."""
        notes: list[str] = []
        if not self.disk:
            if self.disk_bandwidth_gbps <= 0:
                raise HardwareError(
                    f"hardware profile '{self.name}' has no disk figures; set disk_bandwidth_gbps or run "
                    "`tilemem doctor --probe`."
                )
            notes.append("disk not measured: bandwidth + latency summary")
            bw = self.disk_bandwidth_gbps * 1e9
            # one read: latency + transfer; with several in flight the device's bandwidth is shared
            per = max(self.disk_latency_us * 1e-6 + request_bytes / bw, queue_depth * request_bytes / bw)
            return queue_depth * request_bytes / per, per, notes
        depths = sorted({d.queue_depth for d in self.disk})
        fit = [d for d in depths if d <= queue_depth] or [depths[0]]
        depth = fit[-1]
        if depth != queue_depth:
            notes.append(f"queue depth {queue_depth} not measured: used {depth}")
        rows = sorted((d for d in self.disk if d.queue_depth == depth), key=lambda d: d.request_bytes)
        sizes = [d.request_bytes for d in rows]
        # time per read = latency at that size; interpolate it (it is ~ a + size / bw) in size
        if request_bytes <= sizes[0] or request_bytes >= sizes[-1]:
            ref = rows[0] if request_bytes <= sizes[0] else rows[-1]
            if request_bytes != ref.request_bytes:
                notes.append(f"request size {request_bytes} B outside the measured {sizes[0]}..{sizes[-1]} B")
            # larger: time grows with the bytes; smaller: latency bound
            per = ref.latency_us * 1e-6 * max(1.0, request_bytes / ref.request_bytes)
        else:
            i = bisect.bisect_right(sizes, request_bytes)
            a, b = rows[i - 1], rows[i]
            w = (request_bytes - a.request_bytes) / (b.request_bytes - a.request_bytes)
            per = (a.latency_us + w * (b.latency_us - a.latency_us)) * 1e-6
        bandwidth = depth * request_bytes / per
        return bandwidth, per, notes

    def fetch_time(self, tile_bytes: int, io_depth: int, tiles: float) -> tuple[float, list[str]] | None:
        """Seconds to read and compute `tiles` (expected, may be fractional) misses of `tile_bytes` through
        the runtime's pipeline, interpolated linearly in tile size; None when not measured at this depth."""
        rows = sorted((f for f in self.fetch if f.io_depth == io_depth), key=lambda f: f.tile_bytes)
        if not rows or tiles <= 0:
            return None if not rows else (0.0, [])
        notes = []
        if len(rows) == 1 or tile_bytes <= rows[0].tile_bytes:
            a, b = (rows[0], rows[1]) if len(rows) > 1 else (rows[0], rows[0])
        elif tile_bytes >= rows[-1].tile_bytes:
            a, b = rows[-2], rows[-1]
        else:
            i = bisect.bisect_right([f.tile_bytes for f in rows], tile_bytes)
            a, b = rows[i - 1], rows[i]
        if not rows[0].tile_bytes <= tile_bytes <= rows[-1].tile_bytes:
            notes.append(
                f"fetch of {tile_bytes} B tiles outside the measured {rows[0].tile_bytes}..{rows[-1].tile_bytes} B"
            )
        w = (tile_bytes - a.tile_bytes) / (b.tile_bytes - a.tile_bytes) if b.tile_bytes != a.tile_bytes else 0.0
        first = max(0.0, a.first_us + w * (b.first_us - a.first_us))
        per = max(1e-3, a.per_tile_us + w * (b.per_tile_us - a.per_tile_us))
        if a is b and rows[0].tile_bytes:  # one size measured: scale with the bytes
            per = a.per_tile_us * tile_bytes / a.tile_bytes
        return (min(1.0, tiles) * first + tiles * per) * 1e-6, notes

    # ----- (de)serialization -----

    def to_dict(self) -> dict[str, Any]:
        """JSON form (schema `tilemem_hardware_v1`)."""
        d = asdict(self)
        d["cpu_features"] = list(self.cpu_features)
        return {"schema_version": HARDWARE_SCHEMA, **d}

    @classmethod
    def from_dict(cls, data: Any, where: str = "hardware profile") -> HardwareProfile:
        """Parse and validate the JSON form; seed-style files (no schema, seed fields only) are read too."""
        if not isinstance(data, dict):
            raise HardwareError(f"{where} is not a JSON object; write one with `tilemem doctor --probe --out hw.json`.")
        version = data.get("schema_version", HARDWARE_SCHEMA)
        if version != HARDWARE_SCHEMA:
            raise HardwareError(f"{where} has schema_version {version!r}; this TileMEM reads {HARDWARE_SCHEMA!r}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"schema_version"})
        if unknown:
            raise HardwareError(f"{where} has unknown fields {unknown}; known fields: {sorted(known)}.")
        try:
            kw = dict(data)
            kw.pop("schema_version", None)
            kw["kernels"] = tuple(KernelFigure(**k) for k in kw.get("kernels", ()))
            kw["disk"] = tuple(DiskFigure(**d) for d in kw.get("disk", ()))
            kw["fetch"] = tuple(FetchFigure(**f) for f in kw.get("fetch", ()))
            kw["validations"] = tuple(
                Validation(**{**v, "budget_fractions": tuple(v["budget_fractions"])}) for v in kw.get("validations", ())
            )
            kw["cpu_features"] = tuple(kw.get("cpu_features", ()))
            profile = cls(**kw)
        except (TypeError, KeyError, ValueError) as exc:
            raise HardwareError(f"{where} is malformed ({type(exc).__name__}: {exc}).") from None
        profile.check(where)
        return profile

    def check(self, where: str = "hardware profile") -> None:
        """Raise a HardwareError naming the first impossible figure."""
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int | float) and not isinstance(v, bool) and v < 0:
                raise HardwareError(f"{where}: {f.name} is negative ({v}); figures are >= 0.")
        for k in self.kernels:
            if k.bandwidth_gbps <= 0 or k.batch < 1:
                raise HardwareError(f"{where}: kernel figure {k} needs bandwidth_gbps > 0 and batch >= 1.")
        for d in self.disk:
            if d.bandwidth_gbps <= 0 or d.latency_us <= 0 or d.request_bytes < 1 or d.queue_depth < 1:
                raise HardwareError(f"{where}: disk figure {d} needs positive bandwidth, latency, size and depth.")

    def save(self, path: str | Path) -> Path:
        """Write atomically as JSON."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> HardwareProfile:
        """Read a profile file, or a reference profile by name (see `reference_profiles()`)."""
        p = Path(path)
        if not p.exists() and (REFERENCE_DIR / f"{path}.json").is_file():
            p = REFERENCE_DIR / f"{path}.json"
        if not p.exists():
            names = ", ".join(reference_profiles())
            raise HardwareError(
                f"hardware profile '{path}' does not exist; measure one with `tilemem doctor --probe --out hw.json` "
                f"or name a reference profile ({names})."
            )
        return cls.from_dict(read_json(p, "hardware profile", HardwareError), f"hardware profile '{p}'")

    @classmethod
    def median(cls, profiles: list[HardwareProfile]) -> HardwareProfile:
        """One profile of several rounds of the same probe: every measured figure the median of its rounds (the
        kernel, disk and fetch figures matched by device/dtype/batch, request/depth, tile/depth; a figure
        missing from some round: the median of the rounds that have it); the rest from the first round, with
        `meta["probe_rounds"]`. Rounds taken at different moments of a machine whose bandwidth drifts give
        figures of its typical state, as interleaved benchmark rounds do."""
        if not profiles:
            raise ValueError("HardwareProfile.median needs at least one profile")
        first = profiles[0]
        if len(profiles) == 1:
            return first

        def merged(figs: list[Any], key: Callable[[Any], tuple]) -> tuple:
            groups: dict[tuple, list[Any]] = {}
            for f in figs:
                groups.setdefault(key(f), []).append(f)
            out = []
            for group in groups.values():
                numbers = {
                    f.name: statistics.median(getattr(g, f.name) for g in group)
                    for f in fields(group[0])
                    if isinstance(getattr(group[0], f.name), float)
                }
                out.append(replace(group[0], **numbers))
            return tuple(out)

        scalars = {
            f.name: statistics.median(getattr(p, f.name) for p in profiles)
            for f in fields(cls)
            if isinstance(getattr(first, f.name), float)
        }
        return replace(
            first,
            **scalars,
            kernels=merged([k for p in profiles for k in p.kernels], lambda k: (k.device, k.dtype, k.batch)),
            disk=merged([d for p in profiles for d in p.disk], lambda d: (d.request_bytes, d.queue_depth)),
            fetch=merged([f for p in profiles for f in p.fetch], lambda f: (f.tile_bytes, f.io_depth)),
            meta={**first.meta, "probe_rounds": len(profiles)},
        )

    def with_validation(self, v: Validation) -> HardwareProfile:
        """A copy with `v` recorded (replacing an earlier one of the same model)."""
        kept = tuple(x for x in self.validations if x.model != v.model)
        return replace(self, validations=(*kept, v))

    def summary(self) -> list[tuple[str, str]]:
        """(figure, value with units) rows for printing."""
        rows = [("profile", f"{self.name} ({'measured' if self.measured else 'NOT measured: quick planning only'})")]
        if self.has_gpu:
            rows += [
                (
                    "gpu",
                    f"{self.gpu_name or 'GPU'}: {self.vram_capacity_gib:.1f} GiB, {self.vram_bandwidth_gbps:.1f} GB/s",
                ),
                ("host->gpu", f"{self.transfer_bandwidth_gbps:.2f} GB/s, {self.transfer_latency_us:.1f} us"),
            ]
        rows += [
            ("dram", f"{self.dram_capacity_gib:.1f} GiB, read {self.dram_bandwidth_gbps:.2f} GB/s"),
            ("disk", f"O_DIRECT {self.disk_bandwidth_gbps:.3f} GB/s, 4 KiB latency {self.disk_latency_us:.1f} us"),
            ("cpu threads", str(self.cpu_threads)),
            ("overheads", f"task {self.task_overhead_us:.1f} us, layer {self.layer_overhead_us:.1f} us, "
                          f"step {self.step_overhead_us:.1f} us"),
        ]  # fmt: skip
        for k in sorted(self.kernels, key=lambda k: (k.device, k.dtype, k.batch)):
            rows.append(
                (
                    f"{k.device} {k.dtype} x{k.batch}",
                    f"{k.bandwidth_gbps:.2f} GB/s, {k.gflops:.1f} GFLOP/s, task {k.task_overhead_us:.1f} us",
                )
            )
        for d in sorted(self.disk, key=lambda d: (d.queue_depth, d.request_bytes)):
            rows.append(
                (
                    f"disk {d.request_bytes // 1024} KiB qd{d.queue_depth}",
                    f"{d.bandwidth_gbps:.3f} GB/s, {d.latency_us:.0f} us",
                )
            )
        return rows


def hardware_profile(name: str, measured: bool = False, **figures: Any) -> HardwareProfile:
    """A profile built by hand (seed field names: vram_capacity_gib, dram_bandwidth_gbps, ...).

    >>> import tilemem as TM
    >>> hw = TM.hardware_profile(name="rtx5090_ddr", vram_capacity_gib=32.0, vram_bandwidth_gbps=1792.0,
    ...     dram_capacity_gib=128.0, dram_bandwidth_gbps=95.0, transfer_bandwidth_gbps=64.0,
    ...     disk_bandwidth_gbps=7.0, disk_latency_us=80.0)
    >>> hw.measured, hw.has_gpu
    (False, True)
    """
    known = {f.name for f in fields(HardwareProfile)}
    unknown = sorted(set(figures) - known)
    if unknown:
        raise HardwareError(f"unknown hardware figures {unknown}; known: {sorted(known - {'name', 'measured'})}.")
    classes = {"kernels": KernelFigure, "disk": DiskFigure, "fetch": FetchFigure}
    for key, cls in classes.items():
        if key in figures:
            figures[key] = tuple(x if isinstance(x, cls) else cls(**x) for x in figures[key])
    if "cpu_features" in figures:
        figures["cpu_features"] = tuple(figures["cpu_features"])
    hw = HardwareProfile(name=name, measured=measured, **figures)
    hw.check(f"hardware profile '{name}'")
    return hw


def reference_profiles() -> dict[str, Path]:
    """Shipped reference profiles (not measured; for planning ahead), by name.

    >>> "cpu_laptop_nvme" in reference_profiles()
    True
    """
    return {p.stem: p for p in sorted(REFERENCE_DIR.glob("*.json"))}


def closest_reference(dram_gib: float, vram_gib: float = 0.0) -> HardwareProfile:
    """The shipped reference profile nearest a machine with `dram_gib` of host memory and `vram_gib` of GPU
    memory (0: no GPU): a GPU profile only for a machine with a GPU, then the nearest memory sizes (log ratio).

    >>> closest_reference(32.0).name
    'cpu_laptop_nvme'
    """

    def distance(hw: HardwareProfile) -> tuple[bool, float]:
        dram = abs(math.log(max(dram_gib, 1.0) / max(hw.dram_capacity_gib, 1.0)))
        vram = abs(math.log(max(vram_gib, 1.0) / max(hw.vram_capacity_gib, 1.0))) if vram_gib > 0 else 0.0
        return (hw.has_gpu != (vram_gib > 0), dram + vram)

    profiles = [HardwareProfile.load(p) for p in reference_profiles().values()]
    if not profiles:
        raise HardwareError(f"no reference profiles in {REFERENCE_DIR}; the installation is incomplete.")
    return min(profiles, key=distance)
