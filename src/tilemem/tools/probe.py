"""`tilemem doctor --probe`: measure this machine in under a minute and write a hardware profile.

What it measures (medians of interleaved rounds, so a burst of other work does not bias one figure):
- DRAM: read bandwidth (a torch reduction over 256 MiB, all threads) and latency (a pointer chase
  over 256 MiB minus the same chase in cache);
- the engine's own tile kernel (the native fused kernel, else `partial_ffn` + fp32 sums) per dtype and batch:
  time = task overhead + weight bytes / bandwidth, fitted over three block sizes streamed from a
  working set larger than the last-level cache; plus the extra cost of a tile computed from the
  DRAM tile cache (a view made per call);
- engine overheads: decode of a small synthetic model of the probed width (tiered runtime, all
  resident) at 2 and 6 layers gives the per-step and per-layer costs beyond weight streaming;
- disk: O_DIRECT reads through the runtime's reader, per request size and queue depth (one thread per
  request in flight, random aligned offsets in a 256 MiB file), plus a sequential 1 MiB read and the
  crc32 speed the runtime pays per read;
- the runtime's miss path end to end (reads + crc32 by I/O threads, compute as tiles land) per tile
  size, and the engine time lost per MiB that I/O threads read while it computes;
- GPU (when present): memory bandwidth, pinned host-to-device bandwidth and latency, GEMM TFLOP/s and
  the tile kernel at each batch.
"""

from __future__ import annotations

import functools
import importlib.metadata
import mmap
import os
import platform
import random
import shutil
import socket
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tilemem import sysinfo
from tilemem.models.topology import FP8_FORMAT
from tilemem.placement.formats import tile_format
from tilemem.placement.store_layout import align
from tilemem.placement.tiles import unit_bytes
from tilemem.tmap.hardware import DiskFigure, FetchFigure, HardwareProfile, KernelFigure

MiB = 1 << 20
X12 = "x12"
"""The kernel figures' name of a bf16 store's tile format (`placement.formats`): 12-bit payloads."""


@dataclass(frozen=True)
class ProbeConfig:
    """What to measure and how hard."""

    name: str = ""
    """Profile name (default: the host name)."""
    threads: int | None = None
    """Torch threads for the kernels (default: torch's current setting)."""
    disk_dir: str | None = None
    """Directory whose filesystem is measured (default: the system temp directory): put the tile store there.
    The probe reads back a file in a temporary directory it makes inside, and removes both."""
    hidden: int = 1024
    """Hidden size of the probed tile kernel."""
    dtypes: tuple[str, ...] = ("bfloat16", X12, FP8_FORMAT, "float32")
    """Weight formats of the kernel sweep (the first also times the engine overheads and the miss path). Each runs
    the kernel the runtime runs tiles of that format with here (`_TileTask`): FP8 tiles the FP8 kernels
    (`kernels.fp8`) where they can, `x12` (a bf16 model's store tiles) the fused x12 kernel, else torch. The GPU
    sweep leaves FP8 and x12 out (its cuda tier holds them dequantized)."""
    batches: tuple[int, ...] = (1, 4, 16, 64)
    """Tokens per expert call of the kernel sweep."""
    request_sizes: tuple[int, ...] = (4096, 65536, 393216, 1048576, 4194304)
    """O_DIRECT request sizes (bytes)."""
    queue_depths: tuple[int, ...] = (1, 4)
    """Reads in flight."""
    disk_file_bytes: int = 256 * MiB
    """Size of the temporary file read back."""
    engine: bool = True
    """Measure the engine's per-step/per-layer overhead on a tiny synthetic model."""
    expert_width: int = 32
    """Routed expert width (neurons) of that model; `tmap validate` gives the checked model's, so the tile tasks
    the overheads are measured beside are the ones it predicts."""
    top_k: int = 2
    """Experts per token of that model (`tmap validate`: the checked model's)."""
    tile: int = 128
    """Neurons per store tile of that model (the runtime's default; `tmap validate`: the checked store's). A resident
    expert of x12 tiles runs one kernel task per tile, so tiles smaller than the checked model's (this was 16) put
    extra tasks into the measured per-layer overhead (+260 us per layer on demo-small's shape)."""
    seconds_per_point: float = 0.4
    """Time box of one disk measurement."""
    dram_bytes: int = 256 * MiB
    """Buffer of the DRAM bandwidth and latency measurements (well above the last-level cache)."""
    kernel_working_set: int = 64 * MiB
    """Bytes of tile blocks each kernel measurement streams through (above the last-level cache)."""
    fetch_rows: tuple[int, ...] = (32, 128, 512)
    """Tile widths (neurons, at `hidden`) of the read-and-compute pipeline measurement."""
    io_depth: int = 4
    """Reads in flight in the pipeline measurement (the runtime's default)."""


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----- DRAM -----------------------------------------------------------------------------------------


def dram_bandwidth(nbytes: int = 256 * MiB, repeats: int = 5) -> float:
    """Read bandwidth (bytes/s) of a reduction over `nbytes` with torch's threads."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()  # fault the pages in
    return nbytes / _median_time(lambda: x.sum(), repeats)


def dram_latency(nbytes: int = 256 * MiB, steps: int = 200_000) -> float:
    """Seconds per dependent load beyond the caches: a random pointer chase over `nbytes`, minus the
    same chase over a cache-resident array (which cancels the interpreter's cost per step)."""
    import numpy as np

    def chase(n: int) -> float:
        order = np.random.default_rng(0).permutation(n)
        nxt = np.empty(n, dtype=np.int64)
        nxt[order] = np.roll(order, -1)  # one cycle through every slot
        nxt_l = nxt  # numpy scalar indexing: each load depends on the previous one
        i = 0
        t0 = time.perf_counter()
        for _ in range(steps):
            i = nxt_l[i]
        return (time.perf_counter() - t0) / steps

    return max(0.0, chase(nbytes // 8) - chase(4096))


# ----- kernels --------------------------------------------------------------------------------------


class _TileTask:
    """Computes tiles the way the runtime does on the CPU (`TieredExperts._host`): each tile format through the
    kernel the runtime picks for it here (`runtime.accumulator.Accumulator`: the AVX512 fused kernel for plain
    tiles where it runs, the portable FP8 and fused x12 kernels where they run), else `partial_ffn` + fp32
    accumulation. `batch` token rows. (Timing plain tiles alone on a CPU without AVX512 measured torch's GEMMs,
    and FP8 tiles torch's dequantizing reference path, 10x slower than the FP8 kernel the runtime runs.)"""

    def __init__(self, hidden: int, dtype, batch: int = 1) -> None:
        import torch

        from tilemem import kernels
        from tilemem.layers.moe import fp8_native_act, x12_native_act
        from tilemem.runtime.tiered import Accumulator

        x = torch.randn(batch, hidden, dtype=dtype)  # [N, D]
        tok, scale = torch.arange(batch), torch.rand(batch)  # scale: fp32, as the router's weights
        act = "silu"
        native = act if kernels.usable(x) else None
        fp8 = act if fp8_native_act(act, x) else None
        x12 = act if x12_native_act(act, x) else None
        ws = kernels.Workspace()
        self.acc = lambda: Accumulator(x, torch.nn.functional.silu, native, ws, fp8_act=fp8, x12_act=x12)
        self.x, self.tok, self.scale = x, tok, scale

    def __call__(self, *blocks):
        """Each block's partial FFN, summed in one call (as tiles that land together): the [N, D] fp32 sum."""
        acc = self.acc()
        for block in blocks:
            acc.add(block, self.tok, self.scale)
        return acc.result()


def store_format(dtype: str, hidden: int, tile: int = 128) -> str:
    """The kernel figures' name of the format a tile store keeps `dtype` tiles of width `hidden` in: `x12` for bf16
    where x12 holds them (`placement.formats.bf16_store_format`), else `dtype`."""
    from tilemem.placement.formats import bf16_store_format

    return X12 if dtype == "bfloat16" and bf16_store_format(hidden, tile).name == "x12" else dtype


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares t = a + b * x over (x, t): (a clamped at 0, b)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    mt = sum(t for _, t in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (t - mt) for x, t in points) / sxx if sxx else mt / mx
    a = mt - b * mx
    if a < 0 or b <= 0:  # no measurable overhead (or noise): the line through the origin
        a, b = 0.0, sum(t for _, t in points) / sum(x for x, _ in points)
    return a, b


def tile_blocks(dtype: str, count: int, rows: int, hidden: int, device: str = "cpu"):
    """`count` random tiles of `rows` neurons at width `hidden` in weight format `dtype`, as the runtime holds
    them ([3, n, D] tensors, `Fp8Tile`s with their fp32 block scales for `fp8_e4m3`, `X12Tile`s for `x12`, a bf16
    store's format), and the activation dtype that computes them (an FP8 or x12 model's is bf16)."""
    import torch

    if dtype == FP8_FORMAT:
        from tilemem.layers.fp8 import BLOCK, FP8
        from tilemem.runtime.tile_format import Fp8Tile

        data = torch.randn(count, 3, rows, hidden).to(FP8)  # [C, 3, n, D]
        scale = torch.rand(count, 3, -(-rows // BLOCK), -(-hidden // BLOCK)) + 0.5  # [C, 3, nb, Db]
        return [Fp8Tile(data[i], scale[i]) for i in range(count)], torch.bfloat16
    if dtype == X12:  # a bf16 store's tiles as it holds them: x12 payloads, viewed as the runtime views a read
        from tilemem.runtime.tile_format import TileCodec

        codec = TileCodec(torch.bfloat16, hidden, x12=True)
        out = []
        for _ in range(count):
            g, u, d = torch.randn(3, rows, hidden).to(torch.bfloat16)  # [n, D] each; down as [n, D] = down^T
            out.append(codec.view(codec.pack(g, u, d.t(), 0, rows), rows))
        return out, torch.bfloat16
    tdt = getattr(torch, dtype)
    return list(torch.randn(count, 3, rows, hidden, dtype=torch.float32, device=device).to(tdt)), tdt  # [3, n, D]


def kernel_sweep(
    device: str,
    dtypes: tuple[str, ...],
    batches: tuple[int, ...],
    hidden: int,
    working_set: int = 64 * MiB,
    rounds: int = 3,
) -> list[KernelFigure]:
    """Fit the engine's tile task (partial FFN + scaled fp32 accumulate) per weight format and batch over three
    block sizes (bytes as the tile store counts them: FP8 weights with their scales). Every (dtype, batch, size)
    point is timed once per round and rounds repeat, so a burst of other work on the machine hits one round of
    every point rather than every round of one point."""
    import torch

    from tilemem.runtime.tiered import partial_ffn

    act = torch.nn.functional.silu
    runs = {}
    for dtype in dtypes:
        # FP8 tiles are whole 128-neuron scale blocks (a 32-row one would pay a whole block's scale work)
        for rows in (32, 128, 512) if dtype != FP8_FORMAT else (128, 256, 512):
            nbytes = unit_bytes(rows, hidden, tile_format(dtype))
            count = max(2, working_set // nbytes)
            blocks, tdt = tile_blocks(dtype, count, rows, hidden, device)
            for batch in batches:
                if device == "cpu":  # every block in one batch, as the runtime runs its DRAM tiles
                    run = functools.partial(_TileTask(hidden, tdt, batch), *blocks)
                else:
                    x = torch.randn(batch, hidden, dtype=tdt, device=device)  # [N, D]
                    scale = torch.rand(batch, 1, device=device)

                    def run(blocks=blocks, x=x, scale=scale) -> None:
                        for block in blocks:
                            partial_ffn(x, block, act) * scale
                        torch.cuda.synchronize()

                run()
                runs[(dtype, batch, nbytes)] = (run, count)
    times: dict[tuple, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for key, (run, count) in runs.items():
            times[key].append(_median_time(run, 1) / count)
    out = []
    for dtype in dtypes:
        itemsize = tile_format(dtype).element_bits / 8
        for batch in batches:
            points = [(nb, statistics.median(t)) for (d, b, nb), t in times.items() if d == dtype and b == batch]
            a, slope = _fit(points)
            bw = 1 / slope
            out.append(KernelFigure(device, dtype, batch, bw / 1e9, 2 * batch * bw / itemsize / 1e9, a * 1e6))
    return out


def tile_kernel(
    device: str, dtype: str, batch: int, hidden: int, working_set: int = 64 * MiB, repeats: int = 3
) -> KernelFigure:
    """One (dtype, batch) point of `kernel_sweep`."""
    return kernel_sweep(device, (dtype,), (batch,), hidden, working_set, repeats)[0]


def packed_tiles(dtype: str, count: int, rows: int, hidden: int):
    """`tile_blocks` as a tile store holds them: (its codec, each tile's bytes as uint8, the activation dtype)."""
    import torch

    from tilemem.runtime.tile_format import TileCodec

    tiles, act = tile_blocks(dtype, count, rows, hidden)
    if dtype == FP8_FORMAT:
        from tilemem.layers.fp8 import FP8

        codec = TileCodec(FP8, hidden)
        raw = [codec.pack(t.data[0], t.data[1], t.data[2].t(), 0, rows, (t.scale[0], t.scale[1], t.scale[2].t()))
               for t in tiles]  # fmt: skip
    elif dtype == X12:
        codec = TileCodec(torch.bfloat16, hidden, x12=True)
        raw = [t.payloads[0] for t in tiles]
    else:
        codec = TileCodec(act, hidden)
        raw = [t.reshape(-1).view(torch.uint8) for t in tiles]
    return codec, raw, act


def cached_task_extra(hidden: int, dtype: str = "bfloat16", rows: int = 32, repeats: int = 5) -> float:
    """Extra seconds of a tile computed from the tile cache's slab (its bytes viewed per call through the store's
    codec, as the runtime does for a cache hit or a read that landed) over the same tile resident (viewed once:
    an x12 or FP8 tile then keeps what its kernel built for it) in weight format `dtype`."""
    import torch

    from tilemem.runtime.direct_io import AlignedSlab

    rows = max(rows, 128) if dtype == FP8_FORMAT else rows  # FP8 tiles are whole 128-neuron scale blocks
    count = 64
    codec, raw, act = packed_tiles(dtype, count, rows, hidden)
    tiles = [codec.view(r, rows) for r in raw]
    nbytes = max(r.numel() for r in raw)
    slab = AlignedSlab(count, align(nbytes))
    for i, r in enumerate(raw):
        slab.tensor(i, r.numel(), torch.uint8).copy_(r)
    task = _TileTask(hidden, act)

    def res() -> None:
        for t in tiles:
            task(t)

    def cached() -> None:
        for i in range(count):
            task(codec.view(slab.tensor(i, nbytes, torch.uint8), rows))

    res(), cached()
    return max(0.0, (_median_time(cached, repeats) - _median_time(res, repeats)) / count)


def engine_overheads(
    threads: int | None, kernels: list[KernelFigure], hidden: int, dtype: str = "bfloat16", expert_width: int = 32,
    top_k: int = 2, tile: int = 128,
) -> tuple[float, float]:  # fmt: skip
    """(seconds per step, seconds per layer) of dispatch overhead: decode of a small synthetic OLMoE model
    of width `hidden` (`top_k` routed experts of `expert_width` neurons, a tiny vocabulary) in weight format
    `dtype` through the tiered runtime, every tile resident, at 2 and 6 layers (median of 8 interleaved
    rounds after 3 warm-up ones). A step is the forward pass, as decode tok/s counts it
    (`GenerationStats.decode_tok_s`: sampling and detokenizing are not in it). The weight streaming the cost
    model counts separately is taken out, each part at the batch-1 figure in `kernels` of the format the cost model
    looks it up in (`tmap.cost`): attention and LM head at `dtype`'s, the routed tiles at their store format's
    (a bf16 model's store holds x12 tiles: `PlanShape.tile_dtype`) bandwidth and task overhead."""
    from tilemem.engine.llm import LLM
    from tilemem.engine.sampling import SamplingParams
    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.runtime.setup import make_plan
    from tilemem.runtime.tile_store import convert
    from tilemem.synth.writer import synthesize
    from tilemem.tmap.shape import PlanShape

    heads = max(4, hidden // 64)

    def figure(fmt: str) -> tuple[float, float]:  # (seconds per byte, task overhead) at batch 1
        k = min((k for k in kernels if k.dtype == fmt), key=lambda k: k.batch, default=None)
        k = k or min((k for k in kernels if k.dtype == dtype), key=lambda k: k.batch)
        return 1 / (k.bandwidth_gbps * 1e9), k.task_overhead_us * 1e-6

    short = {"bfloat16": "bf16", "float16": "fp16", FP8_FORMAT: "fp8"}.get(dtype, "fp32")
    if dtype == FP8_FORMAT:  # FP8 tiles fall on its 128-neuron scale blocks
        tile = max(128, tile // 128 * 128)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    llms, streamed = {}, {}
    samples: dict[int, list[float]] = {2: [], 6: []}
    with tempfile.TemporaryDirectory(prefix="tilemem-probe-") as tmp:
        try:
            for layers in (2, 6):
                overrides = {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
                             "num_key_value_heads": heads, "intermediate_size": expert_width,
                             "num_experts": max(8, top_k), "num_experts_per_tok": top_k}  # fmt: skip
                path = synthesize(
                    "olmoe", "tiny", Path(tmp) / f"m{layers}", dtype=short, progress=False, overrides=overrides
                )
                store = Path(tmp) / f"m{layers}.tiles"
                convert(path, store, tile, progress=False)
                ckpt = Checkpoint.open(path)
                plan = make_plan(ckpt, "cpu=1GiB", "kt_expert", None, tile)
                shape = PlanShape.of(plan)
                # what the cost model counts as weight streaming: attention/LM head bytes, top_k resident tasks
                spb, _ = figure(dtype)
                streamed[layers] = (shape.head_bytes + sum(lay.non_expert_bytes for lay in shape.layers)) * spb
                # (an FP8 model's LM head is bf16; at this vocabulary its bytes are too few to matter)
                spb, task = figure(shape.tile_dtype)
                for lay in shape.moe_layers:  # each of an expert's blocks one task (x12: each store tile)
                    blocks = max((e.blocks.get("cpu", ()) for e in lay.experts), key=sum)
                    streamed[layers] += ckpt.config.top_k * sum(task + nb * spb for nb in blocks)
                llms[layers] = LLM(path, threads=threads, plan=plan, store=store, max_batch=1)
                for _ in range(3):  # a fresh engine's first decode steps run up to 10x slower (measured)
                    llms[layers].generate([[1, 2, 3, 4]], params)
            for _ in range(8):  # interleaved rounds: a burst of other work hits both layer counts alike
                for layers, llm in llms.items():
                    llm.generate([[1, 2, 3, 4]], params)
                    samples[layers].append(1 / llm.stats().decode_tok_s)  # mean forward pass per token
        finally:
            for llm in llms.values():
                llm.tiered.close()
    # the median round: a burst of other work, or a late warm-up, moves one round, not the figure
    steps = {n: statistics.median(v) - streamed[n] for n, v in samples.items()}
    per_layer = max(0.0, (steps[6] - steps[2]) / 4)
    per_step = max(0.0, steps[2] - 2 * per_layer)
    return per_step, per_layer


# ----- disk -----------------------------------------------------------------------------------------


def _make_file(directory: Path, nbytes: int) -> Path:
    fd, name = tempfile.mkstemp(prefix=".tilemem-probe-", dir=directory)
    block = os.urandom(4 * MiB)
    try:
        with os.fdopen(fd, "wb") as f:
            for i in range(nbytes // len(block)):
                f.write(block[:8] + i.to_bytes(8, "little") + block[16:])  # distinct blocks: no dedup
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def disk_point(path: Path, request: int, depth: int, seconds: float, sequential: bool = False) -> DiskFigure:
    """O_DIRECT reads of `request` bytes with `depth` reader threads for about `seconds`."""
    from tilemem.runtime.direct_io import DirectReader

    reader = DirectReader(path)
    size = os.path.getsize(path) // request * request
    slots = size // request
    bufs = [mmap.mmap(-1, request) for _ in range(depth)]
    deadline = time.perf_counter() + seconds
    lat: list[list[float]] = [[] for _ in range(depth)]

    def worker(i: int) -> int:
        rng = random.Random(i)
        view = memoryview(bufs[i])
        n = 0
        k = i
        while time.perf_counter() < deadline or n == 0:
            off = (k % slots) * request if sequential else rng.randrange(slots) * request
            k += depth
            t0 = time.perf_counter()
            reader.read_into(view, off, request)
            lat[i].append(time.perf_counter() - t0)
            n += request
        return n

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(depth) as pool:
            total = sum(pool.map(worker, range(depth)))
        dt = time.perf_counter() - t0
    finally:
        reader.close()
    latencies = [x for per in lat for x in per]
    return DiskFigure(request, depth, total / dt / 1e9, statistics.mean(latencies) * 1e6)


def fetch_pipeline(
    path: Path, rows: int, hidden: int, io_depth: int = 4, dtype: str = "bfloat16", repeats: int = 11
) -> FetchFigure:
    """The runtime's miss path on `rows`-neuron tiles: `io_depth` I/O threads read (O_DIRECT) and crc32
    tiles into slab slots while the engine thread waits for each to land and computes it (partial FFN +
    fp32 accumulate), as `TieredExperts` does. Paired runs of 1 and 16 tiles give the first tile's time
    and the time per further tile (medians)."""
    import concurrent.futures as cf

    from tilemem.runtime.direct_io import AlignedSlab, DirectReader

    codec, raw, act = packed_tiles(dtype, io_depth + 1, rows, hidden)
    nbytes = raw[0].numel()
    slot = align(nbytes)
    slab = AlignedSlab(io_depth + 1, slot)
    reader = DirectReader(path)
    positions = os.path.getsize(path) // slot
    rng = random.Random(0)
    task = _TileTask(hidden, act)

    def read(slot_i: int) -> None:
        buf = slab.buffer(slot_i)
        reader.read_into(buf, rng.randrange(positions) * slot, nbytes)
        zlib.crc32(buf[:nbytes])

    def run(n: int) -> None:
        free = list(range(io_depth + 1))
        pending, in_flight = n, {}
        while pending or in_flight:
            while pending and len(in_flight) < io_depth:
                s = free.pop()
                in_flight[pool.submit(read, s)] = s
                pending -= 1
            done, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                s = in_flight.pop(fut)
                fut.result()
                # the slot's tile viewed as the runtime views a landed read; computed from valid bytes (the read's
                # are the scratch file's random ones, not a tile its kernel can run)
                task(codec.view(raw[s], rows))
                free.append(s)

    firsts, pers = [], []
    try:
        with cf.ThreadPoolExecutor(io_depth, thread_name_prefix="probe-io") as pool:
            run(2)
            for _ in range(repeats):  # paired runs: both see the same moment of the disk's (shared) load
                one = _median_time(lambda: run(1), 1)
                many = _median_time(lambda: run(16), 1)
                firsts.append(one)
                pers.append((many - one) / 15)
    finally:
        reader.close()
    per = max(1e-7, statistics.median(pers))
    return FetchFigure(nbytes, io_depth, max(0.0, statistics.median(firsts) - per) * 1e6, per * 1e6)


def read_interference(path: Path, rows: int, hidden: int, io_depth: int = 4, dtype: str = "bfloat16") -> float:
    """Seconds the engine thread loses per MiB read by I/O threads meanwhile (GIL hand-offs, crc32 and DMA
    competing for cores and memory): a resident tile loop timed alone and with `io_depth` readers
    (O_DIRECT + crc32, as the runtime's) running, over the MiB they read."""
    import threading

    from tilemem.runtime.direct_io import DirectReader

    nbytes = unit_bytes(rows, hidden, tile_format(dtype))
    request = align(nbytes)
    blocks, act = tile_blocks(dtype, max(2, (32 * MiB) // nbytes), rows, hidden)
    task = _TileTask(hidden, act)

    def loop() -> float:
        t0 = time.perf_counter()
        for _ in range(3):
            for block in blocks:
                task(block)
        return time.perf_counter() - t0

    reader = DirectReader(path)
    slots = os.path.getsize(path) // request
    stop = threading.Event()
    done = [0] * io_depth

    def reads(i: int) -> None:
        buf = memoryview(mmap.mmap(-1, request))
        rng = random.Random(i)
        while not stop.is_set():
            reader.read_into(buf, rng.randrange(slots) * request, nbytes)
            zlib.crc32(buf[:nbytes])
            done[i] += nbytes

    losses = []
    try:
        loop()
        for _ in range(3):
            alone = loop()
            stop.clear()
            done[:] = [0] * io_depth
            threads = [threading.Thread(target=reads, args=(i,), daemon=True) for i in range(io_depth)]
            for t in threads:
                t.start()
            busy = loop()
            stop.set()
            for t in threads:
                t.join()
            losses.append(max(0.0, busy - alone) / max(1.0, sum(done) / MiB))
    finally:
        stop.set()
        reader.close()
    return statistics.median(losses)


def checksum_bandwidth(nbytes: int = 4 * MiB, repeats: int = 5) -> float:
    """crc32 bytes/s of one thread (the runtime checks every read)."""
    data = os.urandom(nbytes)
    return nbytes / _median_time(lambda: zlib.crc32(data), repeats)


# ----- GPU ------------------------------------------------------------------------------------------


def gpu_figures(dtypes: tuple[str, ...], batches: tuple[int, ...], hidden: int) -> dict:
    """Memory bandwidth, pinned H2D bandwidth/latency, GEMM TFLOP/s and tile kernels of GPU 0."""
    import torch

    sync = torch.cuda.synchronize
    n = 512 * MiB
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    sync()
    vram = 2 * n / _median_time(lambda: (b.copy_(a), sync()), 5)  # a copy reads and writes n bytes
    host = torch.empty(256 * MiB, dtype=torch.uint8).pin_memory()
    dev = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
    h2d = host.numel() / _median_time(lambda: (dev.copy_(host, non_blocking=True), sync()), 5)
    small_h, small_d = host[:4096], dev[:4096]
    h2d_lat = _median_time(lambda: (small_d.copy_(small_h, non_blocking=True), sync()), 50)
    m = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    (m @ m)
    sync()
    tflops = 2 * 8192**3 / _median_time(lambda: (m @ m, sync()), 5) / 1e12
    kernels = kernel_sweep("cuda", dtypes, batches, hidden, working_set=256 * MiB)
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu_name": props.name,
        "vram_capacity_gib": props.total_memory / 2**30,
        "vram_bandwidth_gbps": vram / 1e9,
        "transfer_bandwidth_gbps": h2d / 1e9,
        "transfer_latency_us": h2d_lat * 1e6,
        "gpu_tflops": tflops,
        "kernels": kernels,
    }


def _version() -> str:
    """TileMEM's installed version, from the package metadata (a tool does not import the `tilemem`
    package, which loads the SDK)."""
    try:
        return importlib.metadata.version("tilemem")
    except importlib.metadata.PackageNotFoundError:
        return ""


# ----- the probe ------------------------------------------------------------------------------------


def probe(config: ProbeConfig | None = None, log: Callable[[str], None] = print) -> HardwareProfile:
    """Measure this machine (see the module docstring); `log` gets one line per figure, with units."""
    import torch

    config = config or ProbeConfig()
    if config.threads:
        torch.set_num_threads(config.threads)
    threads = torch.get_num_threads()
    t_start = time.perf_counter()
    mem = sysinfo.memory()
    flags = sysinfo.cpu_flags()
    dram_bw = dram_bandwidth(config.dram_bytes)
    log(f"dram read bandwidth      {dram_bw / 1e9:8.2f} GB/s ({threads} threads)")
    dram_lat = dram_latency(config.dram_bytes)
    log(f"dram latency             {dram_lat * 1e9:8.1f} ns")
    kernels = kernel_sweep("cpu", config.dtypes, config.batches, config.hidden, config.kernel_working_set)
    for k in kernels:
        log(f"cpu {k.dtype:9s} x{k.batch:<3d}      {k.bandwidth_gbps:8.2f} GB/s {k.gflops:8.1f} GFLOP/s, "
            f"task overhead {k.task_overhead_us:.1f} us")  # fmt: skip
    extra = cached_task_extra(config.hidden, store_format(config.dtypes[0], config.hidden))
    log(f"cache-slab task extra    {extra * 1e6:8.1f} us")
    step = layer = 0.0
    if config.engine:
        step, layer = engine_overheads(
            config.threads, kernels, config.hidden, config.dtypes[0], config.expert_width, config.top_k, config.tile
        )
        log(f"engine overhead          {step * 1e6:8.1f} us/step, {layer * 1e6:.1f} us/layer (width {config.hidden})")
    tiles = store_format(config.dtypes[0], config.hidden)  # the miss path's tiles: as the model's store holds them
    disk_dir = Path(config.disk_dir or tempfile.gettempdir())
    disk_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tilemem-probe-", dir=disk_dir))
    disk = []
    try:
        path = _make_file(scratch, config.disk_file_bytes)
        from tilemem.runtime.direct_io import DirectReader

        r = DirectReader(path)
        direct = r.direct
        r.close()
        if not direct:
            log(f"WARNING: {disk_dir} refuses O_DIRECT; figures are buffered reads (fadvise DONTNEED)")
        for depth in config.queue_depths:
            for size in config.request_sizes:
                d = disk_point(path, size, depth, config.seconds_per_point)
                disk.append(d)
                log(
                    f"disk {size // 1024:>5d} KiB qd{depth}      {d.bandwidth_gbps:8.3f} GB/s, "
                    f"{d.latency_us:8.1f} us/read"
                )
        fetch = []
        for rows in config.fetch_rows:
            f = fetch_pipeline(path, rows, config.hidden, config.io_depth, tiles)
            fetch.append(f)
            log(
                f"fetch {f.tile_bytes // 1024:>5d} KiB tiles      {f.per_tile_us:8.1f} us/tile + {f.first_us:.1f} us "
                f"first (read + crc32 + compute, qd{config.io_depth})"
            )
        interference = read_interference(path, 128, config.hidden, config.io_depth, tiles)
        log(f"read interference        {interference * 1e6:8.1f} us of engine time per MiB read meanwhile")
        seq = disk_point(path, MiB, 1, config.seconds_per_point * 2, sequential=True)
        log(f"disk sequential 1 MiB    {seq.bandwidth_gbps:8.3f} GB/s (qd1, as `dd bs=1M iflag=direct`)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lat4k = next((d.latency_us for d in disk if d.request_bytes == 4096 and d.queue_depth == 1), 0.0)
    crc = checksum_bandwidth()
    log(f"crc32                    {crc / 1e9:8.2f} GB/s per thread")
    figures: dict = {}
    if torch.cuda.is_available():
        gpu_dtypes = tuple(d for d in config.dtypes if d not in (FP8_FORMAT, X12))
        figures = gpu_figures(gpu_dtypes, config.batches, config.hidden)
        torch.cuda.empty_cache()  # the probe's buffers are gone with gpu_figures' frame
        kernels += figures.pop("kernels")
        log(f"gpu {figures['gpu_name']}: {figures['vram_bandwidth_gbps']:.1f} GB/s memory, "
            f"H2D {figures['transfer_bandwidth_gbps']:.2f} GB/s ({figures['transfer_latency_us']:.1f} us), "
            f"GEMM {figures['gpu_tflops']:.1f} TFLOP/s bf16")  # fmt: skip
    seconds = time.perf_counter() - t_start
    return HardwareProfile(
        name=config.name or socket.gethostname(),
        measured=True,
        dram_capacity_gib=mem.total / 2**30,
        dram_bandwidth_gbps=dram_bw / 1e9,
        dram_latency_ns=dram_lat * 1e9,
        disk_bandwidth_gbps=seq.bandwidth_gbps,
        disk_latency_us=lat4k,
        disk_free_gib=sysinfo.disk_free(disk_dir) / 2**30,
        cpu_threads=threads,
        cpu_features=tuple(sorted(f for f in sysinfo.KERNEL_FEATURES if f in flags)),
        task_overhead_us=next((k.task_overhead_us for k in kernels if k.device == "cpu" and k.batch == 1), 0.0),
        cached_task_extra_us=extra * 1e6,
        layer_overhead_us=layer * 1e6,
        step_overhead_us=step * 1e6,
        checksum_bandwidth_gbps=crc / 1e9,
        kernels=tuple(kernels),
        disk=tuple(disk),
        fetch=tuple(fetch),
        read_interference_us_per_mib=interference * 1e6,
        meta={
            "host": socket.gethostname(),
            "cpu": sysinfo.cpu_model(),
            "cores": sysinfo.cpu_cores(),
            "load_average": round(sysinfo.load_average(), 2),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "tilemem": _version(),
            "probe_seconds": round(seconds, 1),
            "hidden": config.hidden,
            "disk_dir": str(disk_dir.resolve()),
            "o_direct": direct,
            "probed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        **figures,
    )
