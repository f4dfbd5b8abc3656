"""The DRAM tile cache: eviction order per policy, admission control, pinning, staging slots, and
its capacity under any sequence of operations. Pure bookkeeping: no model, no store."""

from __future__ import annotations

import random

import pytest
import torch

from tilemem.runtime.direct_io import AlignedSlab
from tilemem.runtime.tile_cache import POLICIES, TileCache

SLOT = 4096


def make_cache(capacity: int, policy: str, staging: int = 2, weights=None) -> TileCache:
    cache = TileCache(AlignedSlab(capacity + staging, SLOT), policy, staging=staging)
    cache.weights = dict(weights or {})
    return cache


def access(cache: TileCache, tid) -> bool:
    """What the runtime does for one tile: look it up; on a miss read it into a free slot and offer it.
    Returns whether it was a hit."""
    slot = cache.lookup(tid)
    if slot is not None:
        cache.release(tid)
        return True
    slot = cache.take_slot()
    assert slot is not None, "a staging slot must always be free for a read"
    cache.admit(tid, slot)
    return False


def t(i: int):
    return (0, i, 0)


def test_lru_evicts_the_least_recently_used():
    cache = make_cache(3, "lru")
    for i in (1, 2, 3):
        access(cache, t(i))
    assert access(cache, t(1))  # 1 is now the most recent
    access(cache, t(4))  # evicts 2
    assert set(cache.entries) == {t(1), t(3), t(4)}
    access(cache, t(5))  # evicts 3
    assert set(cache.entries) == {t(1), t(4), t(5)}
    # Under LRU the newcomer always wins: nothing is ever rejected.
    assert cache.stats.evicted == 2 and cache.stats.rejected == 0


def test_lfu_evicts_the_least_frequently_used_oldest_first_on_ties():
    cache = make_cache(3, "lfu")
    for tid, n in ((t(1), 3), (t(2), 1), (t(3), 2)):
        for _ in range(n):
            access(cache, tid)
    access(cache, t(4))  # freq 1 vs victim 2 (freq 1, older): the tie goes to the newcomer
    assert set(cache.entries) == {t(1), t(3), t(4)}
    access(cache, t(2))  # freq 2 now, victim 4 (freq 1): 4 goes
    assert set(cache.entries) == {t(1), t(2), t(3)}
    access(cache, t(5))  # freq 1 < every cached tile's count: rejected
    assert set(cache.entries) == {t(1), t(2), t(3)}
    assert cache.stats.rejected == 1


def test_profile_policy_keeps_the_tiles_the_profile_says_are_hot():
    weights = {t(1): 0.9, t(2): 0.5, t(3): 0.1, t(4): 0.3, t(5): 0.05}
    cache = make_cache(2, "profile", weights=weights)
    for i in (3, 1):
        access(cache, t(i))
    access(cache, t(2))  # 0.5 > 0.1: evicts 3
    assert set(cache.entries) == {t(1), t(2)}
    for _ in range(5):  # however often a cold tile comes, its profile weight decides
        access(cache, t(5))
    assert set(cache.entries) == {t(1), t(2)}
    access(cache, t(4))  # 0.3 < 0.5: rejected
    assert set(cache.entries) == {t(1), t(2)}
    assert cache.stats.rejected == 6 and cache.stats.evicted == 1


@pytest.mark.parametrize("policy", ["lfu", "profile"])
def test_a_one_off_cold_tile_does_not_evict_a_hot_one(policy):
    weights = {t(1): 0.8, t(2): 0.7}  # cold tiles have no weight
    cache = make_cache(2, policy, weights=weights)
    for _ in range(4):
        access(cache, t(1))
        access(cache, t(2))
    for cold in range(10, 20):  # a scan of one-off tiles
        assert not access(cache, t(cold))
    assert set(cache.entries) == {t(1), t(2)}
    assert access(cache, t(1)) and access(cache, t(2))
    assert cache.stats.rejected == 10 and cache.stats.evicted == 0


def test_lru_lets_a_scan_flush_the_cache():
    """The contrast that motivates admission control: LRU keeps whatever came last."""
    cache = make_cache(2, "lru")
    for _ in range(4):
        access(cache, t(1))
        access(cache, t(2))
    for cold in range(10, 12):
        access(cache, t(cold))
    assert set(cache.entries) == {t(10), t(11)}


def test_pinned_tiles_are_never_evicted():
    cache = make_cache(2, "lru")
    access(cache, t(1))
    access(cache, t(2))
    s1, s2 = cache.lookup(t(1)), cache.lookup(t(2))  # both in use by a computation
    slot = cache.take_slot()
    assert not cache.admit(t(3), slot)  # no unpinned victim: the new tile is not kept
    assert set(cache.entries) == {t(1), t(2)} and slot in cache.slab.free
    cache.release(t(1))
    slot = cache.take_slot()
    assert cache.admit(t(3), slot)  # now 1 (unpinned) goes, 2 (pinned) stays
    assert set(cache.entries) == {t(2), t(3)} and cache.entries[t(2)].slot == s2 and s1 in cache.slab.free


def test_staging_slots_are_reserved_for_reads_in_flight():
    cache = make_cache(2, "lfu", staging=3)
    assert cache.capacity == 2 and cache.slab.slots == 5
    for i in range(6):
        access(cache, t(i))
    assert len(cache.entries) == 2 and len(cache.slab.free) == 3  # the staging slots are free again
    taken = [cache.take_slot() for _ in range(3)]
    assert None not in taken and cache.take_slot() is None  # every slot busy: the runtime must wait
    for slot in taken:
        cache.slab.free.append(slot)


def test_no_room_beyond_staging_keeps_nothing():
    cache = make_cache(0, "lru", staging=2)
    for i in range(5):
        assert not access(cache, t(i))
    assert not cache.entries and len(cache.slab.free) == 2
    assert cache.stats.rejected == 5 and cache.stats.hit_rate == 0.0


def test_a_tile_admitted_twice_keeps_one_slot():
    cache = make_cache(3, "lfu")
    access(cache, t(1))
    first = cache.entries[t(1)].slot
    slot = cache.take_slot()  # e.g. a prefetch of the same tile landed after a demand read
    assert not cache.admit(t(1), slot)
    assert cache.entries[t(1)].slot == first and slot in cache.slab.free
    assert len(cache.slab.free) + len(cache.entries) == cache.slab.slots


def test_drop_frees_the_slot():
    cache = make_cache(2, "lfu")
    access(cache, t(1))
    cache.drop(t(1))
    cache.drop(t(9))  # unknown: a no-op
    assert not cache.contains(t(1)) and len(cache.slab.free) == cache.slab.slots


@pytest.mark.parametrize("policy", POLICIES)
def test_capacity_and_slot_accounting_hold_under_random_use(policy):
    rng = random.Random(POLICIES.index(policy))
    weights = {t(i): rng.random() for i in range(40)}
    cache = make_cache(6, policy, staging=3, weights=weights)
    held: dict = {}  # slots taken for reads in flight: slot -> tile id
    pinned: list = []
    for _ in range(3000):
        op = rng.random()
        tid = t(int(rng.paretovariate(1.0)) % 40)  # a skewed stream: some tiles hot
        if op < 0.5:
            slot = cache.lookup(tid)
            if slot is not None:
                pinned.append(tid)
            elif len(held) < cache.staging and (slot := cache.take_slot()) is not None:
                held[slot] = tid
        elif op < 0.8 and held:
            slot = rng.choice(list(held))
            cache.admit(held.pop(slot), slot)
        elif op < 0.95 and pinned:
            cache.release(pinned.pop(rng.randrange(len(pinned))))
        else:
            cache.drop(tid)
            pinned = [p for p in pinned if p != tid]
        assert len(cache.entries) <= cache.capacity
        slots = [e.slot for e in cache.entries.values()] + list(held) + cache.slab.free
        assert sorted(slots) == list(range(cache.slab.slots)), "a slot is lost or counted twice"
        assert all(e.pinned >= 0 for e in cache.entries.values())
    s = cache.stats
    assert s.hits + s.misses > 0 and 0 <= s.hit_rate <= 1
    assert s.admitted - s.evicted >= len(cache.entries)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown cache policy 'mru'; use one of lru, lfu, profile"):
        make_cache(2, "mru")


def test_slab_slots_are_page_aligned_views():
    slab = AlignedSlab(3, 2 * SLOT)
    assert slab.nbytes == 6 * SLOT
    for slot in range(3):
        view = slab.tensor(slot, 16, torch.float32)
        assert view.data_ptr() % 4096 == 0 and view.numel() == 4
        slab.buffer(slot)[:16] = torch.full((4,), float(slot + 1)).numpy().tobytes()
        assert torch.equal(view, torch.full((4,), float(slot + 1)))  # no copy: writes show through


@pytest.mark.parametrize("policy", POLICIES)
def test_heap_victim_is_the_scan_minimum_under_random_operations(policy):
    """The victim kept in a heap (lazy deletion) is always the unpinned tile a full scan would pick: the
    lowest (score, last use), through hits, admissions, pins, releases, drops and heap rebuilds."""
    rng = random.Random(7)
    weights = {t(i): rng.random() for i in range(60)}
    cache = make_cache(12, policy, weights=weights)
    pinned: list = []
    for step in range(3000):
        tid = t(int(rng.paretovariate(1.2)) % 60)
        op = rng.random()
        if op < 0.6:
            access(cache, tid)
        elif op < 0.75 and cache.lookup(tid) is not None:
            pinned.append(tid)  # held across the next operations, as tiles of the layer being computed are
        elif op < 0.9 and pinned:
            cache.release(pinned.pop(rng.randrange(len(pinned))))
        elif op < 0.93:
            cache.drop(tid)
        scan = [(cache._score(x, e.last_use), x) for x, e in cache.entries.items() if not e.pinned]
        assert cache._victim() == (min(scan)[1] if scan else None), step
        assert len(cache.entries) <= cache.capacity
