"""Async planning: a background thread keeps a rolling routing histogram, re-solves the plan and
migrates tiles between tiers between decode steps, never exceeding the DRAM budget.

Protocol (the engine thread owns the executor; the planner thread only prepares):
1. The executor's router observer feeds `observe(layer, ids)`; counts decay by half each re-plan.
2. Every `interval_s`, the planner thread re-solves the plan from the histogram (pure Python) and
   diffs each expert's DRAM ranges against the current ones.
3. Demotions (DRAM -> disk) are queued first; the engine applies them at the next step boundary,
   freeing memory. Only then does the planner read each promoted expert's new ranges from the
   store — allocating at most what the budget has free — and queue it; the engine swaps it in at
   a later step boundary. Resident bytes never pass the budget, also mid-migration.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from tilemem.placement.plan import Plan
from tilemem.placement.profile import LayerProfile, Profile
from tilemem.runtime.tiered import Ranges, TieredExperts

log = logging.getLogger(__name__)


@dataclass
class MigrationStats:
    """What async planning has done."""

    replans: int = 0
    promoted: int = 0
    demoted: int = 0
    peak_resident_bytes: int = 0


class AsyncReplanner:
    """Background re-planning and migration for one TieredExperts executor."""

    def __init__(
        self,
        executor: TieredExperts,
        plan: Plan,
        solve: Callable[[Profile], Plan],
        residency_of: Callable[[Plan], dict[tuple[int, int], Ranges]],
        resident_budget: int,
        interval_s: float = 2.0,
    ) -> None:
        self.executor = executor
        self.plan = plan
        self.solve = solve
        self.residency_of = residency_of
        self.resident_budget = resident_budget
        self.interval_s = interval_s
        sig = plan.topology
        self.moe_layers = [lt.index for lt in sig.layers if lt.is_moe]
        experts = max(lt.num_experts for lt in sig.layers)
        self.hist = {layer: torch.zeros(experts, dtype=torch.float64) for layer in self.moe_layers}
        self.tokens = {layer: 0.0 for layer in self.moe_layers}
        self.fresh = 0
        """Routing observations since the last re-plan (none: the histogram only decayed, skip)."""
        self.lock = threading.Lock()
        self.pending: list[tuple[tuple[int, int], Ranges, list[torch.Tensor] | None]] = []
        self.applied = threading.Event()
        self.stop_event = threading.Event()
        self.stats = MigrationStats(peak_resident_bytes=executor.resident_bytes)
        self.current = residency_of(plan)
        self.thread = threading.Thread(target=self._loop, name="tilemem-replanner", daemon=True)

    def start(self) -> AsyncReplanner:
        """Start the background thread and hook routing observation and step-boundary application."""
        for block in self.executor.blocks.values():
            block.on_route = self.observe
        self.executor.step_hook = self.apply_pending
        self.thread.start()
        return self

    def observe(self, layer: int, ids: torch.Tensor) -> None:
        """Count routed experts of one forward (engine thread)."""
        counts = torch.bincount(ids.reshape(-1), minlength=self.hist[layer].numel()).double()
        with self.lock:
            self.hist[layer] += counts
            self.tokens[layer] += ids.shape[0]
            self.fresh += 1

    def profile(self) -> Profile:
        """The rolling histogram as a Profile."""
        base = self.plan_profile()
        with self.lock:
            layers = tuple(
                LayerProfile(
                    layer,
                    tuple(int(c) for c in self.hist[layer].tolist()),
                    (0,) * len(self.hist[layer]),
                    int(self.tokens[layer]),
                    0,
                )
                for layer in self.moe_layers
            )
        return replace(base, layers=layers, workloads=("rolling",), source="async")

    def plan_profile(self) -> Profile:
        return Profile.uniform(self.plan.topology)

    def apply_pending(self) -> None:
        """Engine thread, between steps: apply queued demotions / promotions."""
        with self.lock:
            work, self.pending = self.pending, []
        for key, ranges, blocks in work:
            self.executor.set_expert(key, ranges, blocks)
            self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.executor.resident_bytes)
        if work:
            self.applied.set()

    def _queue_and_wait(self, items: list) -> bool:
        self.applied.clear()
        with self.lock:
            self.pending.extend(items)
        while not self.applied.wait(0.1):
            if self.stop_event.is_set():
                return False
        return True

    def _loop(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            try:
                self.replan_once()
            except Exception:  # planning must never take generation down
                log.exception("async re-planning failed; keeping the current plan")

    def replan_once(self) -> None:
        """One re-plan + migration (planner thread; tests may call it with the engine idle)."""
        with self.lock:
            if not self.fresh:  # nothing routed since the last re-plan (idle engine): nothing to learn
                return
            self.fresh = 0
        new_plan = self.solve(self.profile())
        target = self.residency_of(new_plan)
        with self.lock:  # decay: recent routing counts most
            for layer in self.moe_layers:
                self.hist[layer] *= 0.5
                self.tokens[layer] *= 0.5
        self.stats.replans += 1
        demote, promote = [], []
        for key, ranges in target.items():
            old = self.current.get(key, {})
            if _dram(ranges) == _dram(old):
                continue
            # Demote the whole expert, then load its new ranges: slicing the old block would keep its
            # storage alive, and cloning it would briefly hold both copies.
            if _dram(old):
                demote.append((key, {"disk": [(0, _width(ranges))]}))
            if _dram(ranges):
                promote.append((key, ranges))
        # 1) shrink every changed expert to what it keeps (frees memory), applied by the engine.
        if demote:
            if not self._queue_and_wait([(k, r, None) for k, r in demote]):
                return
            self.stats.demoted += len(demote)
        # 2) grow each expert to its new ranges, only while the budget has room.
        for key, ranges in promote:
            need = self.executor.bytes_of(ranges, key) - self.executor.bytes_of(self.executor_ranges(key), key)
            if self.executor.resident_bytes + need > self.resident_budget:
                continue  # would pass the budget (e.g. another promotion not applied yet): skip
            blocks = self.executor.load_blocks(key, ranges)
            if not self._queue_and_wait([(key, ranges, blocks)]):
                return
            self.stats.promoted += 1
        self.current = {k: self.executor_ranges(k) for k in target}
        self.plan = new_plan

    def executor_ranges(self, key: tuple[int, int]) -> Ranges:
        """What the executor holds for one expert now."""
        return self.executor.ranges.get(key, {})

    def stop(self) -> None:
        """Stop the thread (pending work is dropped)."""
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)


def _dram(ranges: Ranges) -> list[tuple[int, int]]:
    return sorted(r for tier, rs in ranges.items() if tier != "disk" for r in rs)


def _width(ranges: Ranges) -> int:
    return max((b for rs in ranges.values() for _, b in rs), default=0)
