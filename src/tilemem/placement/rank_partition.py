"""Which rank computes which neuron ranges: the expert-parallel partition behind `ranks.build_rank_plans`.

Every MoE layer ends with an all-reduce, so a step waits for the slowest rank in each layer: the
partition balances every layer on its own. The load of a share is P(expert routed) x its bytes (decode
reads weights, so time follows bytes read), 1 x bytes for the shared experts, a replica's load is the
expert's over its replica count.

Per layer, items (routed experts and the shared experts) go hottest first:

- `replicate`: an expert hotter than the layer's mean rank load is held whole by n = ceil(load / mean)
  ranks with room (tokens split among them), when the ranks' byte room still holds the rest of the layer;
- `split="expert"`: the whole item to the least loaded rank with byte room (LPT);
- `split="tile"`: whole to the least loaded rank when that keeps it under the mean, else cut at tile
  boundaries into contiguous ranges that fill the ranks' deficits, largest first (the partial FFNs over
  disjoint neuron ranges sum in the all-reduce);
- `split="even"`: every expert (and the shared experts) cut into equal tile ranges, one per rank: each rank
  computes 1/N of every routed expert, so the ranks balance for every token at batch 1, where an expected-load
  balance of whole experts leaves the few experts one token routes to unevenly spread (8 of OLMoE's 64 experts
  on 2 ranks: 5 and 3 as often as 4 and 4).

Byte room: each rank's compute tiers (cuda, cpu) after its non-expert weights, caches and dense FFNs.
Where the ranks together hold the model, a rank takes at most its room (spread over the layers in
proportion); where they do not, every rank takes the same share of its room and its policy spills the
rest to its disk tier. Dense FFNs run whole on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tilemem.models.topology import DENSE, SHARED
from tilemem.placement.policies.base import OwnedRanges, PlacementProblem
from tilemem.placement.tiles import ffn_unit_bytes, ffn_width, units_of

SPLITS: tuple[str, ...] = ("expert", "tile", "even")
"""How routed experts are divided among ranks: whole experts, also by tile ranges where that balances the expected
load, or every expert in equal tile ranges on every rank (`even`: balanced for every token, not only on average)."""
_EPS = 1e-9
_BETTER = 1e-3
"""A layer takes a more split (or replicated) partition only when its max rank load is this much lower."""


@dataclass(frozen=True)
class Partition:
    """The neuron ranges and replicas of every rank."""

    owned: tuple[OwnedRanges, ...]
    """Per rank: (layer, expert) -> the neuron ranges it computes."""
    replicas: tuple[tuple[tuple[int, int, int, int], ...], ...]
    """Per rank: (layer, expert, replica index, replica count) of each expert it holds as a replica."""
    notes: dict
    """Counts for the plan's notes: experts split across ranks, experts replicated."""


@dataclass(frozen=True)
class _Item:
    """One FFN of a MoE layer cut on the tile grid."""

    layer: int
    expert: int
    prob: float
    tiles: tuple[tuple[int, int, int], ...]
    """(start, end, bytes) of each grid tile, in neuron order."""
    nbytes: int = field(init=False)
    """Bytes of the whole FFN."""
    load: float = field(init=False)
    """Expected bytes read per token: prob x nbytes."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbytes", sum(b for _, _, b in self.tiles))
        object.__setattr__(self, "load", self.prob * self.nbytes)


class _Layer:
    """One way of partitioning one layer: per-rank ranges, replicas, load and bytes."""

    def __init__(self, caps: list[float], tau: float) -> None:
        self.caps, self.tau = caps, tau
        self.owned: list[dict[tuple[int, int], list[tuple[int, int]]]] = [{} for _ in caps]
        self.replicas: list[list[tuple[int, int, int, int]]] = [[] for _ in caps]
        self.load = [0.0] * len(caps)
        self.bytes = [0] * len(caps)
        self.split = 0

    def room(self, r: int) -> float:
        return self.caps[r] - self.bytes[r]

    def give(self, r: int, item: _Item, i0: int, i1: int, share: int = 1) -> None:
        """Tiles i0..i1-1 of `item` to rank r (`share` > 1: as one of that many replicas)."""
        tiles = item.tiles[i0:i1]
        nbytes = sum(b for _, _, b in tiles)
        ranges = self.owned[r].setdefault((item.layer, item.expert), [])
        a, b = tiles[0][0], tiles[-1][1]
        if ranges and ranges[-1][1] == a:
            ranges[-1] = (ranges[-1][0], b)
        else:
            ranges.append((a, b))
        self.load[r] += item.prob * nbytes / share
        self.bytes[r] += nbytes

    def overflow(self, limits: list[float]) -> float:
        """Bytes placed past the ranks' `limits` (what their policies would spill to disk)."""
        return sum(max(0.0, b - c) for b, c in zip(self.bytes, limits, strict=True))

    def least_loaded(self, nbytes: int) -> int | None:
        """The least loaded rank with room for `nbytes` (None: no rank has)."""
        fits = [r for r in range(len(self.caps)) if self.room(r) + _EPS >= nbytes]
        return min(fits, key=lambda r: (self.load[r], self.bytes[r], r)) if fits else None

    def most_room(self) -> int:
        """The rank with the most byte room left (where nothing fits: the least overflow)."""
        return min(range(len(self.caps)), key=lambda r: (-self.room(r), self.load[r], r))

    def run(self, items: list[_Item], split: str, replicate: bool, even: int = 0) -> _Layer:
        """Place `items` (hottest first) whole (`expert`) or also by tile ranges (`tile`); the `even` hottest
        are cut into equal tile ranges on every rank (as tensor parallelism would: load and bytes alike)."""
        left = sum(item.nbytes for item in items)
        for i, item in enumerate(sorted(items, key=lambda it: (-it.load, it.expert))):
            left -= item.nbytes
            if i < even:
                _place_even(self, item, i)
                continue
            if replicate and item.expert >= 0 and _replicate(self, item, left):
                continue
            if split == "expert":
                _place_whole(self, item)
            else:
                self.split += _place_split(self, item)
        return self


def partition(problem: PlacementProblem, quotas: list[int | None], split: str, replicate: bool) -> Partition:
    """Split `problem`'s FFNs among len(quotas) ranks, rank r having `quotas[r]` bytes of compute-tier room
    for routed and shared experts (None: unbounded). Each layer tries whole experts (and with `split="tile"`
    tile ranges), without (and with `replicate`) replicas, and keeps the one that spills the fewest bytes
    past the ranks' room, then has the lowest max rank load (within 0.1%: the simplest), so tile splitting
    and replication never balance a layer worse than whole experts."""
    topo = problem.topology
    world = len(quotas)
    owned: list[dict] = [{} for _ in range(world)]
    replicas: list[list[tuple[int, int, int, int]]] = [[] for _ in range(world)]
    for lt in topo.layers:
        if lt.dense_intermediate:
            for r in range(world):
                owned[r][(lt.index, DENSE)] = [(0, lt.dense_intermediate)]
    layers = {lt.index: _items(problem, lt.index) for lt in topo.layers if lt.is_moe}
    rest = sum(item.nbytes for items in layers.values() for item in items)
    remaining = list(quotas)
    split_count = 0
    variants = [(m, rep, 0) for m in SPLITS[: SPLITS.index(split) + 1] for rep in (False, True)[: 1 + replicate]]
    if split == "even":
        variants = []
    for items in layers.values():
        layer_bytes = sum(item.nbytes for item in items)
        tau = sum(item.load for item in items) / world
        caps = _caps(remaining, layer_bytes, rest)
        hot = sum(1 for it in items if it.load * layer_bytes > it.nbytes * tau * world)  # denser than the mean
        evens = [(split, rep, k) for k in _powers(hot) for rep in (False, True)[: 1 + replicate]]
        trials = [_Layer(caps, tau).run(items, mode, rep, k) for mode, rep, k in variants + evens * (split == "tile")]
        if split == "even":
            trials = [_Layer(caps, tau).run(items, "tile", False, len(items))]
        # Spill: past what a rank has left for the whole model where the ranks hold it, else past the layer's caps.
        bounded = [q for q in remaining if q is not None]
        fits = len(bounded) < world or sum(bounded) >= rest
        limits = [math.inf if q is None else q for q in remaining] if fits else caps
        best = trials[0]
        for trial in trials[1:]:
            less_spill = trial.overflow(limits) < best.overflow(limits) - 1
            same_spill = trial.overflow(limits) <= best.overflow(limits) + 1
            if less_spill or same_spill and max(trial.load) < max(best.load) * (1 - _BETTER):
                best = trial
        for r in range(world):
            owned[r].update(best.owned[r])
            replicas[r].extend(best.replicas[r])
            if remaining[r] is not None:
                remaining[r] = max(0, remaining[r] - best.bytes[r])
        split_count += best.split
        rest -= layer_bytes
    notes = {
        "split": split,
        "replicate": replicate,
        "experts_split": split_count,
        "experts_replicated": sum(1 for reps in replicas for _, _, i, _ in reps if i == 0),
    }
    return Partition(
        owned=tuple({ffn: tuple(ranges) for ffn, ranges in sorted(o.items())} for o in owned),
        replicas=tuple(tuple(sorted(reps)) for reps in replicas),
        notes=notes,
    )


def _items(problem: PlacementProblem, layer: int) -> list[_Item]:
    """The routed experts and the shared experts of MoE layer `layer` on the tile grid."""
    topo = problem.topology
    probs = problem.profile.probabilities(layer, problem.phase)
    experts = ([SHARED] if topo.layers[layer].shared_intermediate else []) + list(range(len(probs)))
    out = []
    for e in experts:
        units = units_of(topo, layer, e, problem.tile, problem.shard_count)
        tiles = tuple((u.start, u.end, ffn_unit_bytes(topo, layer, e, u.neurons, problem.fmt)) for u in units)
        if ffn_width(topo, layer, e):
            out.append(_Item(layer, e, 1.0 if e == SHARED else probs[e], tiles))
    return out


def _caps(remaining: list[int | None], layer_bytes: int, rest: int) -> list[float]:
    """Each rank's byte room for one layer: its remaining room spread over the layers still to place where the
    ranks hold them all, else the same share of every rank's room (the policies spill the rest to disk)."""
    bounded = [q for q in remaining if q is not None]
    total = sum(bounded)
    if len(bounded) < len(remaining) or total >= rest:
        return [math.inf if q is None else q * layer_bytes / max(rest, 1) for q in remaining]
    if total == 0:
        return [layer_bytes / len(remaining)] * len(remaining)
    return [q * layer_bytes / total for q in bounded]


def _replicate(state: _Layer, item: _Item, rest_bytes: int) -> bool:
    """Hold a routed expert hotter than the mean rank load whole on several ranks with room to spare."""
    world = len(state.caps)
    if world < 2 or item.load <= state.tau * (1 + _EPS) or state.tau <= 0:
        return False
    n = min(world, math.ceil(item.load / state.tau - _EPS))
    fits = sorted((r for r in range(world) if state.room(r) + _EPS >= item.nbytes), key=lambda r: (state.load[r], r))
    if len(fits) < n:
        return False
    chosen = sorted(fits[:n])
    spare = sum(state.room(r) for r in range(world)) - n * item.nbytes
    if spare + _EPS < rest_bytes:  # the copies would push the rest of the layer out of the ranks' room
        return False
    for i, r in enumerate(chosen):
        state.give(r, item, 0, len(item.tiles), share=n)
        state.replicas[r].append((item.layer, item.expert, i, n))
    return True


def _powers(n: int) -> list[int]:
    """1, 2, 4, ... up to n (and n itself)."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return out + [n] if n else out


def _place_even(state: _Layer, item: _Item, index: int) -> None:
    """Equal contiguous tile ranges of `item` on every rank (the remainder tiles rotate with `index`)."""
    world, n = len(state.caps), len(item.tiles)
    pos = 0
    for k in range(world):
        r = (k + index) % world
        take = n // world + (1 if k < n % world else 0)
        if take:
            state.give(r, item, pos, pos + take)
            pos += take
    state.split += int(min(n, world) > 1)


def _place_whole(state: _Layer, item: _Item) -> None:
    """The whole item to the least loaded rank with room (none: the one with most room; it spills)."""
    r = state.least_loaded(item.nbytes)
    state.give(state.most_room() if r is None else r, item, 0, len(item.tiles))


def _place_split(state: _Layer, item: _Item) -> int:
    """Whole where that keeps a rank under the mean load, else contiguous tile ranges filling the ranks'
    deficits, largest first. Returns 1 when the item ended up on several ranks."""
    r = state.least_loaded(item.nbytes)
    if r is not None and state.load[r] + item.load <= state.tau * (1 + _EPS):
        state.give(r, item, 0, len(item.tiles))
        return 0
    pos, n, used = 0, len(item.tiles), set()
    for r in sorted(range(len(state.caps)), key=lambda r: (state.load[r] - state.tau, r)):
        if pos >= n:
            break
        deficit, room = state.tau - state.load[r], state.room(r)
        take, acc_load, acc_bytes = 0, 0.0, 0
        while pos + take < n:
            nbytes = item.tiles[pos + take][2]
            tile_load = item.prob * nbytes
            # Take a tile when at least half of its load fits the deficit (rounds to the nearest tile).
            if acc_bytes + nbytes > room + _EPS or acc_load + tile_load / 2 > deficit:
                break
            acc_load, acc_bytes, take = acc_load + tile_load, acc_bytes + nbytes, take + 1
        if take:
            state.give(r, item, pos, pos + take)
            pos = pos + take
            used.add(r)
    if pos < n:
        nbytes = sum(b for _, _, b in item.tiles[pos:])
        r = state.least_loaded(nbytes)
        r = state.most_room() if r is None else r
        state.give(r, item, pos, n)
        used.add(r)
    return int(len(used) > 1)
