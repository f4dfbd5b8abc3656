"""Tiered expert execution: a plan decides where every tile lives and where it is computed.

Per MoE layer: route (done by the block), then tile tasks. Tiles resident in DRAM run in place,
contiguous resident ranges of an expert as one GEMM; tiles on disk are read with O_DIRECT by an I/O
thread pool into the fixed-size tile cache, and each tile's partial FFN runs as soon as its read
lands, while later reads are still in flight. Partial outputs are summed in fp32. At the end of a
layer, the next MoE layer's router applied to this layer's hidden state predicts which experts to
prefetch, so their reads overlap the next attention block.

With a GPU (the model on `cuda`): tiles in the `cuda` tier are computed there, queued first so the
GPU works while the CPU computes its DRAM tiles and streams disk tiles. A DRAM or cache tile that
many tokens use (at least `gpu_min_tokens`, prefill) is copied to the GPU on a side stream and
computed there instead: at that batch the copy costs less than CPU compute.

Tiles keep the checkpoint's weight format (`tile_format`) in every tier. On the host, FP8 tiles run through the
native FP8 kernel, GGUF tiles (quantized blocks) through the native ggml kernel (`kernels.ggml.ffn_tasks`, exact
unless `layers.ggml.FAST`), each with a torch fallback. In VRAM they stay as stored too (`Fp8Slab`: e4m3 bytes and
block scales; `GgmlSlab`: the quant blocks), dequantized with torch on the GPU to the compute dtype right before
each layer's GEMMs (only the tiles the layer's tokens use); host tiles shipped to the GPU are computed there by the
torch reference (`fp8_gemm`, `ggml_gemm`). x12 tiles are decoded to bf16 when their slab is built.

Shape legend: T tokens, N tokens routed to one expert, n tile neurons, D hidden.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
import zlib
from dataclasses import dataclass, field

import torch

from tilemem import kernels, sysinfo
from tilemem.errors import BudgetError, TileMemError
from tilemem.layers.gpu_ffn import GATHER_MAX_PAIRS, Fp8Slab, GgmlSlab, TileSlab, gathered_ffn, stacked_ffn
from tilemem.layers.moe import MoEBlock, fp8_native_act, ggml_native_act, group_by_expert, x12_native_act
from tilemem.placement.budgets import DEFAULT_CACHE_BYTES, IO_DEPTH
from tilemem.runtime.accumulator import Accumulator, GpuAccumulator, partial_ffn  # noqa: F401 (tools.probe)
from tilemem.runtime.direct_io import AlignedSlab, DirectReader
from tilemem.runtime.tile_cache import TileCache, TileId
from tilemem.runtime.tile_format import PACKED, Block, Fp8Tile, GgmlTile, X12Tile, block_nbytes
from tilemem.runtime.tile_store import StoredTile, TileStore
from tilemem.units import format_bytes

Ranges = dict[str, list[tuple[int, int]]]
"""tier -> merged neuron ranges of one expert."""
Slab = TileSlab | Fp8Slab | GgmlSlab
"""One layer's VRAM tiles: in the compute dtype, or FP8 / GGUF as stored."""


PREFETCH_WINDOW = 32
"""Prefetched tiles over which `prefetch="auto"` judges prefetching."""
PREFETCH_MIN_USE = 0.5
"""Share of them that must be used for prefetching to continue."""
PREFETCH_PAUSE = 256
"""MoE layer calls a pause lasts before prefetching is tried again."""


def _cache_slab(slots: int, slot_bytes: int) -> AlignedSlab:
    """The tile cache's memory, or a BudgetError saying the machine cannot give it."""
    try:
        return AlignedSlab(slots, slot_bytes)
    except (OSError, MemoryError) as exc:
        free = format_bytes(sysinfo.memory().available)
        raise BudgetError(
            f"cannot allocate the DRAM tile cache ({slots} tiles, {format_bytes(slots * slot_bytes)}): "
            f"{getattr(exc, 'strerror', None) or exc}; this machine has {free} available: lower the cpu budget "
            "(--budget cpu=SIZE) below what it has."
        ) from None


class TileReadError(TileMemError):
    """A tile could not be read from the store, or its checksum does not match."""


@dataclass
class RuntimeCounters:
    """What the tiered runtime did (per step or cumulative)."""

    disk_bytes: int = 0
    dram_bytes: int = 0
    hits: int = 0
    misses: int = 0
    stall_s: float = 0.0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    """Prefetched tiles a layer then used (adopted in flight, or landed and held for it)."""
    prefetch_paused: int = 0
    """Times `prefetch="auto"` paused prefetching because too few prefetched tiles were used."""
    predicted: int = 0
    actual: int = 0
    correct: int = 0
    tiles_computed: int = 0
    gpu_bytes: int = 0
    """Bytes of VRAM-resident tiles computed on the GPU."""
    h2d_bytes: int = 0
    """Bytes of DRAM or cache tiles copied to the GPU to be computed there."""

    def as_dict(self) -> dict[str, float]:
        """Plain numbers, with derived hit rate and prefetch precision / recall."""
        d = dict(self.__dict__)
        d["hit_rate"] = self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0
        d["prefetch_precision"] = self.correct / self.predicted if self.predicted else 0.0
        d["prefetch_recall"] = self.correct / self.actual if self.actual else 0.0
        return d

    def minus(self, other: RuntimeCounters) -> RuntimeCounters:
        """Difference of two snapshots."""
        return RuntimeCounters(**{k: v - getattr(other, k) for k, v in self.__dict__.items()})


@dataclass
class TieredConfig:
    """Runtime settings a plan carries (or the user overrides)."""

    cache_bytes: int | None = None
    """DRAM tile cache budget, staging slots for reads in flight included (at least `io_depth` slots).
    None: what the plan leaves free in DRAM (`attach_tiered`), else DEFAULT_CACHE_BYTES."""
    io_depth: int = IO_DEPTH
    """Reads in flight (thread pool size)."""
    cache_policy: str = "lfu"
    """Eviction: lru, lfu or profile."""
    prefetch: bool | str = "auto"
    """Predict and prefetch the next layer's experts: True, False, or "auto": on, but paused for a while
    whenever fewer than `PREFETCH_MIN_USE` of the last `PREFETCH_WINDOW` prefetched tiles were used
    (a mispredicted prefetch takes disk time from demand reads)."""
    verify_reads: bool = True
    """Check each read's crc32."""
    tile_weights: dict[TileId, float] = field(default_factory=dict)
    """Profile routing probability per store tile (profile-weighted eviction)."""
    gpu_min_tokens: int = 32
    """With the model on a GPU: a DRAM or cache tile used by at least this many tokens is copied to the
    GPU and computed there (a tile's FLOPs grow with its tokens, its copy does not)."""


class TieredExperts:
    """ExpertExecutor that follows per-expert tier ranges; see the module docstring."""

    def __init__(
        self,
        blocks: dict[int, MoEBlock],
        store: TileStore,
        residency: dict[tuple[int, int], Ranges],
        config: TieredConfig,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.blocks = blocks
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.store = store
        self.config = config
        self.dtype = dtype
        self.act = next(iter(blocks.values())).act
        self.act_name = next(iter(blocks.values())).act_name
        self.workspace = kernels.Workspace()
        self.next_layer = dict(zip(sorted(blocks), sorted(blocks)[1:], strict=False))
        self.resident: dict[tuple[int, int], list[torch.Tensor]] = {}  # DRAM blocks [3, n, D]
        self.slabs: dict[int, Slab] = {}  # layer -> its VRAM tiles
        self.stale_slabs: set[int] = set()  # layers whose VRAM ranges changed since their slab was built
        self.on_disk: dict[tuple[int, int], list[StoredTile]] = {}
        self.ranges: dict[tuple[int, int], Ranges] = {}
        self.resident_bytes = 0
        self.step_hook = None  # called between engine steps (async planning applies migrations here)
        self.replicas: dict[tuple[int, int], tuple[int, int]] = {}
        """Expert parallelism: (layer, expert) -> (i, n) for an expert replicated on n ranks, this rank replica i:
        it computes the expert for the tokens j (in the expert's token group) with (j + turn) % n == i, `turn`
        counting this executor's calls (the same on every rank: they run the same passes), so that at batch 1
        the replicas take turns rather than replica 0 computing every token."""
        self.turn = 0
        self.set_residency(residency)
        self.build_slabs()
        slot_bytes = max(t.padded for t in store.tiles.values())
        cache_bytes = DEFAULT_CACHE_BYTES if config.cache_bytes is None else config.cache_bytes
        # No more slots than the store has tiles (plus staging): a budget above what the model can use
        # must not allocate memory that no tile could fill.
        slots = max(min(cache_bytes // slot_bytes, len(store.tiles) + config.io_depth), config.io_depth)
        self.cache = TileCache(_cache_slab(slots, slot_bytes), config.cache_policy, staging=config.io_depth)
        self.cache.weights = config.tile_weights
        self.reader = DirectReader(store.data_path)
        self.pool = cf.ThreadPoolExecutor(max_workers=config.io_depth, thread_name_prefix="tile-io")
        self.prefetching: dict[TileId, tuple[cf.Future, int, StoredTile]] = {}
        self.landed: dict[TileId, int] = {}  # prefetched tiles that arrived, held in their slot for their layer
        self.window = [0, 0]  # auto prefetch: [issued, used] since the last judgement
        self.pause = 0  # auto prefetch: layer calls left without prefetching
        self.predictions: dict[int, set[int]] = {}
        self.counters = RuntimeCounters()

    # -- residency -------------------------------------------------------------------------------
    def set_residency(self, residency: dict[tuple[int, int], Ranges]) -> None:
        """Load DRAM-resident ranges from the store and index disk tiles (also used by migration)."""
        for key, ranges in residency.items():
            self.set_expert(key, ranges)

    def set_expert(self, key: tuple[int, int], ranges: Ranges, blocks: list[torch.Tensor] | None = None) -> None:
        """(Re)place one expert: DRAM ranges become tensors (`blocks` if preloaded), `cuda` ranges GPU
        tensors, the rest stays on disk."""
        layer, expert = key
        old = self.resident.pop(key, [])
        self.resident_bytes -= sum(block_nbytes(t) for t in old)
        del old
        if blocks is None:
            blocks = self.load_blocks(key, ranges)
        if self.device.type == "cuda":  # pinned: copies of these to the GPU (prefill) run asynchronously
            blocks = [b if b.is_pinned() else b.pin_memory() for b in blocks]
        self.resident[key] = blocks
        self.resident_bytes += sum(block_nbytes(t) for t in blocks)
        if ranges.get("cuda") and self.device.type != "cuda":
            raise TileMemError(f"expert {key} has tiles on 'cuda' but the model runs on {self.device}.")
        if ranges.get("cuda") or self.ranges.get(key, {}).get("cuda"):
            self.stale_slabs.add(layer)  # `build_slabs` (re)builds the layer's VRAM slab
        self.ranges[key] = ranges
        self.on_disk[key] = [t for a, b in ranges.get("disk", []) for t in self.store.covering(layer, expert, a, b)]
        for tier, spans in ranges.items():
            if tier != "disk":
                for a, b in spans:
                    for t in self.store.covering(layer, expert, a, b):
                        if hasattr(self, "cache"):
                            self.cache.drop((layer, expert, t.start))
                            if (layer, expert, t.start) in self.landed:  # prefetched, now resident
                                self.cache.slab.free.append(self.landed.pop((layer, expert, t.start)))

    def build_slabs(self) -> None:
        """(Re)build the VRAM slab of every layer whose `cuda` ranges changed, tile by tile from the store."""
        for layer in sorted(self.stale_slabs):
            self.slabs.pop(layer, None)
            spans = {e: ranges.get("cuda", []) for (lay, e), ranges in self.ranges.items() if lay == layer}
            if any(spans.values()):
                self.slabs[layer] = self.slab(layer, spans)
        self.stale_slabs.clear()

    def slab(self, layer: int, spans: dict[int, list[tuple[int, int]]]) -> Slab:
        """A slab on this runtime's device of `layer`'s units' neuron ranges `spans` (unit -> ranges), cut into store
        tiles: FP8 and GGUF tiles as stored, x12 tiles decoded to bf16, plain tiles in the compute dtype."""
        tiles: dict[int, list[Block]] = {}
        for e, ranges in spans.items():
            for a, b in ranges:
                for t in self.store.covering(layer, e, a, b):
                    block = self._load_range(layer, e, t.start, t.end)
                    block = block.dense().to(self.dtype) if isinstance(block, X12Tile) else block  # decoded in VRAM
                    tiles.setdefault(e, []).append(block)
        first = next(iter(tiles.values()))[0]
        size, dev = self.store.tile_size, self.device
        if isinstance(first, Fp8Tile):
            return Fp8Slab({e: [(b.data, b.scale) for b in bs] for e, bs in tiles.items()}, size, dev, self.dtype)
        if isinstance(first, GgmlTile):
            return GgmlSlab({e: [b.matrices() for b in bs] for e, bs in tiles.items()}, size, dev, self.dtype)
        return TileSlab(tiles, size, dev)

    @property
    def gpu_bytes(self) -> int:
        """VRAM the expert tiles take."""
        return sum(s.nbytes for s in self.slabs.values())

    def load_blocks(self, key: tuple[int, int], ranges: Ranges) -> list[torch.Tensor]:
        """[3, n, D] tensors of an expert's DRAM (`cpu`) ranges, read from the store."""
        return [self._load_range(*key, a, b) for a, b in ranges.get("cpu", [])]

    def bytes_of(self, ranges: Ranges, key: tuple[int, int]) -> int:
        """DRAM bytes `ranges` of unit `key` (layer, expert) would take."""
        spans = ranges.get("cpu", [])
        if self.store.codec.packed:
            codec = self.store.codec.unit(*key)
            return sum(codec.payload_bytes(b - a) for a, b in spans)
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return 3 * sum(b - a for a, b in spans) * self.store.hidden * itemsize

    def between_steps(self) -> None:
        """Engine hook between steps: apply pending migrations (and rebuild VRAM slabs they changed)."""
        if self.step_hook is not None:
            self.step_hook()
        if self.stale_slabs:
            self.build_slabs()

    def _load_range(self, layer: int, expert: int, a: int, b: int) -> Block:
        """Neurons [a, b) of one expert read from the store, checked, as one block in memory of its own."""
        parts = []
        codec = self.store.codec.unit(layer, expert)
        for t in self.store.covering(layer, expert, a, b):
            raw = self.store.read_block(t)
            if self.config.verify_reads and zlib.crc32(raw) != t.crc32:
                raise TileReadError(
                    f"tile {t.key} in {self.store.data_path} fails its checksum (corrupt store); "
                    f"{self.store.repair_hint}."
                )
            parts.append(codec.view(torch.frombuffer(bytearray(raw), dtype=torch.uint8), t.end - t.start))
        return self._computed(codec.concat(parts) if len(parts) > 1 else parts[0])

    def _computed(self, block: Block) -> Block:
        """A viewed tile as this runtime computes it: packed, or in the model's dtype."""
        return block if isinstance(block, PACKED) or block.dtype == self.dtype else block.to(self.dtype)

    # -- I/O ---------------------------------------------------------------------------------------
    def _read(self, tile: StoredTile, slot: int) -> None:
        buf = self.cache.slab.buffer(slot)
        try:
            self.reader.read_into(buf, tile.offset, tile.nbytes)
        except OSError as exc:
            raise TileReadError(f"reading tile {tile.key} from {self.store.data_path} failed: {exc}") from exc
        if self.config.verify_reads and zlib.crc32(buf[: tile.nbytes]) != tile.crc32:
            raise TileReadError(
                f"tile {tile.key} in {self.store.data_path} fails its checksum (corrupt store); "
                f"{self.store.repair_hint}."
            )

    def _block(self, slot: int, tile: StoredTile) -> Block:
        codec = self.store.codec.unit(tile.layer, tile.expert)
        return self._computed(codec.view(self.cache.slab.tensor(slot, tile.nbytes, torch.uint8), tile.end - tile.start))

    def _harvest_prefetches(self) -> None:
        for tid, (fut, slot, _) in list(self.prefetching.items()):
            if fut.done():
                del self.prefetching[tid]
                if fut.exception() is None:
                    self.landed[tid] = slot  # kept for its layer: the cache's admission must not drop it first
                else:
                    self.cache.slab.free.append(slot)

    # -- execution ---------------------------------------------------------------------------------
    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The routed experts of one MoE layer: x [T, D], weights / ids [T, K] -> [T, D] fp32."""
        ids_h, weights_h = ids.cpu(), weights.cpu()
        groups = [(e, tok, weights_h[tok, k]) for e, tok, k in group_by_expert(ids_h)]
        if self.replicas:
            groups = self._my_tokens(layer, groups)
            self.turn += 1
        self._score_prediction(layer, {e for e, _, _ in groups})
        out = self._run(layer, x, groups)
        self._release_landed(layer)
        if self._prefetch_now():
            self._prefetch(layer, x)
        return out

    def _my_tokens(self, layer: int, groups: list) -> list:
        """Expert parallelism: of a replicated expert's tokens, those this rank's replica computes."""
        out = []
        for e, tok, w in groups:
            share = self.replicas.get((layer, e))
            if share is not None:
                first = (share[0] - self.turn) % share[1]
                tok, w = tok[first :: share[1]], w[first :: share[1]]
            if len(tok):
                out.append((e, tok, w))
        return out

    def unit(self, layer: int, unit: int, x: torch.Tensor) -> torch.Tensor:
        """A shared-expert (SHARED) or dense (DENSE) FFN of `layer` over every token: x [T, D] -> [T, D] fp32."""
        every = torch.arange(x.shape[0])
        return self._run(layer, x, [(unit, every, torch.ones(x.shape[0], dtype=x.dtype))])

    def _run(self, layer: int, x: torch.Tensor, groups: list) -> torch.Tensor:
        """Sum of scale * FFN over `groups` [(unit, token indices [N], scale [N])], host-side tensors."""
        if x.device.type == "cpu" and layer not in self.slabs:
            return self._host(layer, x, groups)
        # The model runs on the GPU. One synchronisation brings the activations to the host; then the
        # VRAM tiles are queued on the GPU, and the host computes its tiles and streams disk tiles
        # while the GPU works. Host partial sums go back once, at the end. (A slab on the CPU, which
        # only tests build, runs the same way, with no host tile shipped.)
        x_h = x.cpu()
        gpu = GpuAccumulator(x, self.act, self.copy_stream)
        if layer in self.slabs:
            self._vram_tiles(self.slabs[layer], x, groups, gpu)
        host = self._host(layer, x_h, groups, gpu if x.is_cuda else None)
        return gpu.result().add_(host.to(x.device, non_blocking=True))

    def _vram_tiles(self, slab: Slab, x: torch.Tensor, groups: list, gpu) -> None:
        """Queue the layer's VRAM tiles on the GPU: at a few tokens every (token, tile) pair in one
        gathered GEMM, else one stacked GEMM per unit over its tiles. FP8 / GGUF tiles are dequantized
        to the compute dtype first: at a few tokens the tiles the pairs use, at once; else a unit's."""
        groups = [g for g in groups if g[0] in slab.slots]
        self.counters.gpu_bytes += sum(slab.unit_bytes(e) for e, _, _ in groups)
        dev = x.device
        if sum(slab.slots[e][1] * len(tok) for e, tok, _ in groups) <= GATHER_MAX_PAIRS:
            tok, unit, scale = [], [], []
            for e, toks, w in groups:
                first, count = slab.slots[e]
                for t, wt in zip(toks.tolist(), w.unbind(0), strict=True):
                    tok += [t] * count
                    unit += range(first, first + count)
                    scale += [wt] * count
            if tok:
                if slab.packed:  # only the tiles the pairs use, dequantized; pairs index them
                    used = sorted(set(unit))
                    gate_up, down_t = slab.dense(used)  # [U, 2n, D], [U, n, D]
                    where = {s: i for i, s in enumerate(used)}
                    unit = [where[s] for s in unit]
                else:
                    gate_up, down_t = slab.gate_up, slab.down_t
                idx = torch.tensor([tok, unit]).to(dev, non_blocking=True)  # [2, P]
                sc = torch.stack(scale).to(dev, non_blocking=True)  # [P]
                gathered_ffn(x, gate_up, down_t, idx[0], idx[1], sc, self.act, gpu.sums.out)
            return
        for e, toks, w in groups:
            first, count = slab.slots[e]
            t_dev = toks.to(dev, non_blocking=True)
            gate_up, down_t = slab.dense(range(first, first + count))  # [k, 2n, D], [k, n, D]
            y = stacked_ffn(x[t_dev], gate_up, down_t, self.act)
            gpu.sums.add(t_dev, y * w.to(dev, non_blocking=True)[:, None])

    def _host(self, layer: int, x: torch.Tensor, groups: list, gpu: GpuAccumulator | None = None) -> torch.Tensor:
        """The DRAM and disk tiles of `groups`, computed on the host (x on the CPU); with `gpu`, the
        tiles of large token groups are shipped there. Returns the host's [T, D] fp32 sum."""
        c = self.counters
        self._harvest_prefetches()
        native = self.act_name if self.act_name in kernels.ACTS and kernels.usable(x) else None
        fp8_act = self.act_name if self.store.codec.fp8 and fp8_native_act(self.act_name, x) else None
        ggml_act = self.act_name if self.store.codec.gguf and ggml_native_act(self.act_name, x) else None
        x12_act = self.act_name if self.store.codec.x12 and x12_native_act(self.act_name, x) else None
        out = Accumulator(
            x, self.act, native, self.workspace, gpu, self.config.gpu_min_tokens, fp8_act, ggml_act, x12_act
        )  # [T, D] fp32
        pending: list[tuple[TileId, StoredTile, torch.Tensor, torch.Tensor]] = []
        ready = []
        for expert, tok, scale in groups:
            for block in self.resident.get((layer, expert), []):
                ready.append((tok, scale, block))
                c.dram_bytes += block_nbytes(block)
                c.h2d_bytes += block_nbytes(block) if out.to_gpu(tok) else 0
            for tile in self.on_disk.get((layer, expert), []):
                tid = (layer, expert, tile.start)
                slot = self.cache.lookup(tid)
                if slot is not None:
                    c.hits += 1
                    c.dram_bytes += tile.nbytes
                    c.h2d_bytes += tile.nbytes if out.to_gpu(tok) else 0
                    ready.append((tok, scale, (tid, slot, tile)))
                elif tid in self.landed:  # prefetched: read already, not from the cache
                    c.misses += 1
                    self._prefetch_used(tid)
                    c.dram_bytes += tile.nbytes
                    c.h2d_bytes += tile.nbytes if out.to_gpu(tok) else 0
                    ready.append((tok, scale, (tid, self.landed.pop(tid), tile, "landed")))
                else:
                    c.misses += 1
                    pending.append((tid, tile, tok, scale))
        in_flight: dict[cf.Future, tuple] = {}
        pending.reverse()
        try:
            self._submit(pending, in_flight)
            for tok, scale, item in ready:  # compute in DRAM while the first reads are in flight
                block = self._block(item[1], item[2]) if isinstance(item, tuple) else item
                out.add(block, tok, scale)
                c.tiles_computed += 1
            out.flush()
        finally:  # unpin cached tiles (offer landed prefetches to the cache) also on failure
            for *_, item in ready:
                if isinstance(item, tuple) and len(item) == 4:
                    self.cache.admit(item[0], item[1])
                elif isinstance(item, tuple):
                    self.cache.release(item[0])
        while in_flight:
            t0 = time.perf_counter()
            done, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
            c.stall_s += time.perf_counter() - t0
            landed = []
            for fut in done:
                tid, tile, tok, scale, slot = in_flight.pop(fut)
                if fut.exception() is not None:
                    self._abort(in_flight, slot)
                    self.cache.slab.free.extend(slot_ for _, slot_ in landed)
                    raise fut.exception()
                out.add(self._block(slot, tile), tok, scale)
                c.h2d_bytes += tile.nbytes if out.to_gpu(tok) else 0
                landed.append((tid, slot))
            out.flush()  # the tiles that landed together run as one call
            for tid, slot in landed:
                c.tiles_computed += 1
                self.cache.admit(tid, slot)
            self._submit(pending, in_flight)
        return out.result()

    def _submit(self, pending: list, in_flight: dict) -> None:
        """Start reads (or adopt prefetches in flight) while slots and queue depth allow."""
        while pending and len(in_flight) < self.config.io_depth:
            tid, tile, tok, scale = pending[-1]
            if tid in self.prefetching:
                fut, slot, _ = self.prefetching.pop(tid)
                self._prefetch_used(tid)
            else:
                slot = self.cache.take_slot()
                while slot is None and not in_flight and (self.prefetching or self.landed):
                    # Prefetches hold every free slot: let them land, offer them to the cache, retry.
                    if self.prefetching:
                        cf.wait([f for f, _, _ in self.prefetching.values()], return_when=cf.FIRST_COMPLETED)
                        self._harvest_prefetches()
                    self._release_landed()
                    slot = self.cache.take_slot()
                if slot is None:
                    if in_flight:
                        return
                    raise TileReadError("tile cache has no free slot for a read; raise the cache budget.")
                fut = self.pool.submit(self._read, tile, slot)
                self.counters.disk_bytes += tile.padded
            pending.pop()
            in_flight[fut] = (tid, tile, tok, scale, slot)

    def _abort(self, in_flight: dict, slot: int) -> None:
        """After a failed read: let the other reads finish, then give every slot back."""
        self.cache.slab.free.append(slot)
        cf.wait(in_flight)
        for item in in_flight.values():
            self.cache.slab.free.append(item[-1])
        in_flight.clear()

    def _release_landed(self, layer: int | None = None) -> None:
        """Offer landed prefetches of `layer` (mispredicted: their layer has run) to the cache, which
        keeps or frees them; None: every landed prefetch."""
        for tid in [t for t in self.landed if layer is None or t[0] == layer]:
            self.cache.admit(tid, self.landed.pop(tid))

    def _prefetch_used(self, tid: TileId) -> None:
        self.counters.prefetch_used += 1
        self.window[1] += 1

    def _prefetch_now(self) -> bool:
        """Whether to prefetch after this layer (`prefetch="auto"` judges the last window of prefetches)."""
        mode = self.config.prefetch
        if mode != "auto":
            return bool(mode)
        if self.pause:
            self.pause -= 1
            return False
        issued, used = self.window
        if issued >= PREFETCH_WINDOW:
            self.window = [0, 0]
            if used < PREFETCH_MIN_USE * issued:
                self.pause = PREFETCH_PAUSE
                self.counters.prefetch_paused += 1
                return False
        return True

    def _predict(self, layer: int, x: torch.Tensor) -> set[int]:
        """Experts `layer` will route to, by its router applied to the hidden state x [T, D] at hand."""
        gate = self.blocks[layer].gate
        _, ids = torch.topk(gate.logits(x), gate.cfg.top_k, dim=-1)  # [T, K]
        return set(ids.unique().tolist())

    def _prefetch(self, layer: int, x: torch.Tensor) -> None:
        nxt = self.next_layer.get(layer)
        if nxt is None:
            return
        experts = self._predict(nxt, x)
        self.predictions[nxt] = experts
        for expert in sorted(experts):
            for tile in self.on_disk.get((nxt, expert), []):
                tid = (nxt, expert, tile.start)
                if self.cache.contains(tid) or tid in self.prefetching or tid in self.landed:
                    continue
                if len(self.cache.slab.free) <= max(1, self.config.io_depth // 2):
                    return  # keep staging slots for demand reads
                slot = self.cache.take_slot()
                self.prefetching[tid] = (self.pool.submit(self._read, tile, slot), slot, tile)
                self.counters.prefetch_issued += 1
                self.window[0] += 1
                self.counters.disk_bytes += tile.padded

    def _score_prediction(self, layer: int, actual: set[int]) -> None:
        pred = self.predictions.pop(layer, None)
        if pred is not None:
            self.counters.predicted += len(pred)
            self.counters.actual += len(actual)
            self.counters.correct += len(pred & actual)

    def close(self) -> None:
        """Stop the I/O threads and close the store."""
        self.pool.shutdown(wait=True)
        self.reader.close()
