"""What a plan asks of the machine per MoE layer, reduced to what the cost model needs (no tensors).

Per routed expert: its resident blocks per compute tier (contiguous ranges run as one task each, as
the runtime merges them) and its disk tiles (store tiles, read one request each, 4 KiB aligned).
Per layer: the non-expert bytes read every step (attention, norms, router) and the always-active FFNs
(shared experts, dense layers), modelled as resident: every policy places them first (they run for
every token), so they reach the disk only under a budget below non-expert + shared/dense bytes, a case
the model does not cover. Per step: the LM head and final norm.

Bytes come from the plan's tile format (`placement.formats`): FP8 tiles count one byte per weight plus
their fp32 block scales, as the tile store holds them; a GGUF model's tiles their FFN's own quant types' blocks
(`placement.tiles.ffn_unit_bytes`). In an FP8 model the layers' non-expert matrices
(attention projections) are FP8 too, while the LM head stays in the plain dtype (`head_dtype`), and the
KV cache is in the activation dtype, so each is looked up at its own kernel rate. A bf16 model's store packs its
FFN tiles as x12 (12 bits per weight), which their own fused kernel computes: those tiles are counted and looked up
as `x12` (`tile_dtype`), the attention matrices and the LM head as bf16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tilemem.models.topology import FP8_FORMAT
from tilemem.placement.plan import Plan
from tilemem.placement.store_layout import ALIGNMENT, align
from tilemem.placement.tiles import ffn_unit_bytes

X12_FORMAT = "x12"
"""A bf16 store's 12-bit tile format (`placement.formats`), as the plan and the kernel figures name it."""
PLAIN_DTYPE = "bfloat16"
"""Dtype of an FP8 model's unquantized weights (LM head, embeddings, norms) and of its activations and KV
cache: every published FP8 checkpoint keeps them in bf16."""

_LAYER = re.compile(r"\blayers\.(\d+)\.")


def padded(nbytes: int) -> int:
    """`nbytes` rounded up to the store's 4 KiB alignment."""
    return align(nbytes)


@dataclass(frozen=True)
class ExpertShape:
    """One routed expert as placed."""

    expert: int
    """Expert index."""
    blocks: dict[str, tuple[int, ...]]
    """Compute tier -> bytes of each resident block (merged contiguous range; x12 tiles in DRAM: each store tile,
    as the runtime runs a merged x12 range one kernel task per tile)."""
    disk_tiles: tuple[int, ...]
    """Bytes of each store tile read from disk when the expert runs."""


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer."""

    index: int
    """Layer number."""
    non_expert_bytes: int
    """Attention, norms and router weights read every step."""
    kv_bytes_per_token: int
    """KV-cache bytes read per cached token per sequence."""
    always_bytes: int
    """Shared-expert / dense FFN bytes (always run, resident)."""
    experts: tuple[ExpertShape, ...]
    """Routed experts (empty for dense layers)."""


@dataclass(frozen=True)
class PlanShape:
    """A plan reduced to bytes, blocks and tiles: the cost model's view of a `Plan` (not a model shape)."""

    layers: tuple[LayerShape, ...]
    """Every decoder layer."""
    head_bytes: int
    """LM head and final norm, read every step."""
    fastest: str
    """Tier of the non-expert weights."""
    cache_bytes: int | None
    """DRAM left to the runtime's tile cache (None: the runtime's default)."""
    slot_bytes: int
    """Bytes of one tile-cache slot (the largest store tile)."""
    dtype: str
    """Weight format of the experts and the layers' non-expert matrices (`bfloat16`, `fp8_e4m3`, ...)."""
    head_dtype: str = ""
    """Dtype of the LM head (an FP8 model's is `PLAIN_DTYPE`; empty: `dtype`)."""
    tile_dtype: str = ""
    """Format the routed and always-active FFN tiles are computed in, as the kernel figures name it: `x12` where a
    bf16 model's store packs them so (its own fused kernel, at its own rate; `placement.formats`), else `dtype`
    (empty: `dtype`)."""

    @classmethod
    def of(cls, plan: Plan, store_tile: int | None = None) -> PlanShape:
        """Reduce `plan`; disk ranges are read in store tiles of `store_tile` neurons (default the plan's)."""
        topo = plan.topology
        store_tile = store_tile or plan.tile
        fp8 = topo.dtype == FP8_FORMAT
        x12_tiles = plan.fmt.name == X12_FORMAT

        def ffn(layer: int, expert: int, neurons: int) -> int:  # bytes of `neurons` neurons of an FFN, with scales
            return ffn_unit_bytes(topo, layer, expert, neurons, plan.fmt)

        per_layer: dict[int, int] = {}
        kv: dict[int, int] = {}  # the KV cache holds activations: the activations' bytes, whatever the weights'
        for name, width in topo.kv_values():
            if m := _LAYER.search(name):
                kv[int(m.group(1))] = kv.get(int(m.group(1)), 0) + width * topo.kv_element_bytes
        head = 0
        names = [n for n, _ in topo.non_expert]
        tied = not any(n.startswith("lm_head") for n in names)
        for name, nbytes in topo.non_expert:
            m = _LAYER.search(name)
            if m:
                layer = int(m.group(1))
                per_layer[layer] = per_layer.get(layer, 0) + nbytes
            elif "embed_tokens" in name:
                head += nbytes if tied else 0  # a tied embedding is the LM head; else one row is read
            else:
                head += nbytes
        ranges: dict[tuple[int, int], dict[str, list[tuple[int, int]]]] = {}
        always: dict[int, int] = {}
        for t in plan.tiles:
            if t.group != "gate_up":
                continue
            if t.expert < 0:
                always[t.layer] = always.get(t.layer, 0) + ffn(t.layer, t.expert, t.end - t.start)
                continue
            spans = ranges.setdefault((t.layer, t.expert), {}).setdefault(t.tier, [])
            spans.append((t.start, t.end))
        layers = []
        for lt in topo.layers:
            experts = []
            for e in range(lt.num_experts):
                blocks: dict[str, tuple[int, ...]] = {}
                disk: list[int] = []
                for tier, spans in ranges.get((lt.index, e), {}).items():
                    merged = _merge(spans)
                    if tier == "disk":  # the runtime reads every whole store tile a disk range touches
                        starts = sorted({s for a, b in merged for s in range(a - a % store_tile, b, store_tile)})
                        ends = [min(s + store_tile, lt.expert_intermediate) for s in starts]
                        disk += [padded(ffn(lt.index, e, b - s)) for s, b in zip(starts, ends, strict=True)]
                    elif tier == "cpu" and x12_tiles:  # an x12 range keeps each store tile's payload: a task each
                        cuts = [(s, min(s + store_tile, b)) for a, b in merged for s in range(a, b, store_tile)]
                        blocks[tier] = tuple(ffn(lt.index, e, b - a) for a, b in cuts)
                    else:
                        blocks[tier] = tuple(ffn(lt.index, e, b - a) for a, b in merged)
                experts.append(ExpertShape(e, blocks, tuple(disk)))
            layers.append(
                LayerShape(
                    lt.index, per_layer.get(lt.index, 0), kv.get(lt.index, 0), always.get(lt.index, 0), tuple(experts)
                )  # fmt: skip
            )
        cpu = next((u for u in plan.tiers if u.tier == "cpu"), None)
        cache = None
        if cpu is not None and cpu.capacity is not None:
            cache = cpu.capacity - cpu.non_expert - cpu.tiles
        tiles = [ffn(lt.index, 0, min(store_tile, lt.expert_intermediate)) for lt in topo.layers if lt.is_moe]
        slot = padded(max(tiles)) if any(tiles) else ALIGNMENT  # the largest routed store tile
        head_dtype = PLAIN_DTYPE if fp8 else topo.dtype
        tile_dtype = X12_FORMAT if x12_tiles else topo.dtype
        return cls(tuple(layers), head, plan.tiers[0].tier, cache, slot, topo.dtype, head_dtype, tile_dtype)

    @property
    def moe_layers(self) -> list[LayerShape]:
        """Layers with routed experts."""
        return [lay for lay in self.layers if lay.experts]


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out
