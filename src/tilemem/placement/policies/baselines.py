"""Baselines: the same number of whole experts per layer in each tier.

`uniform` takes experts by index (the naive baseline); `kt_expert` by routing frequency, like
KTransformers' `--kt-num-gpu-experts` with its `frequency` strategy. Shared experts and dense FFNs
go first, whole, into the fastest tier with room.
"""

from __future__ import annotations

from abc import abstractmethod

from tilemem.placement.policies.base import Assignment, PlacementProblem, Policy, PolicyResult
from tilemem.placement.policies.common import (
    always_active,
    check_all_placed,
    first_fit,
    frequency_ranks,
    probabilities,
    size_of,
    split,
)


class SameCountPerLayer(Policy):
    """k whole experts of every MoE layer per tier, k as large as the tier allows."""

    @abstractmethod
    def expert_order(self, probs: list[float]) -> list[int]:
        """Experts of one layer, the ones to keep fastest first."""

    def assign(self, problem: PlacementProblem, free: dict[str, int | None]) -> PolicyResult:
        space = dict(free)
        out: Assignment = {}
        left = first_fit(problem, space, [u for u, _, _ in always_active(problem, None)], out)
        probs = probabilities(problem)
        # Experts another rank computes split into no units here; leave them out of the count.
        queue = {
            layer: [units for e in self.expert_order(p) if (units := split(problem, layer, e, None))]
            for layer, p in probs.items()
        }
        taken = dict.fromkeys(queue, 0)
        for tier, room in space.items():
            pending = [layer for layer in queue if taken[layer] < len(queue[layer])]
            if not pending:
                break
            if room is None:
                k = max(len(queue[layer]) - taken[layer] for layer in pending)
            else:  # the largest k whose next k experts of every layer fit (a rank's partial experts differ in size)
                k, used, most = 0, 0, min(len(queue[layer]) - taken[layer] for layer in pending)
                while k < most:
                    step = sum(size_of(problem, u) for layer in pending for u in queue[layer][taken[layer] + k])
                    if used + step > room:
                        break
                    k, used = k + 1, used + step
            for layer in pending:
                for units in queue[layer][taken[layer] : taken[layer] + k]:
                    for u in units:
                        out[u] = tier
                        if room is not None:
                            space[tier] -= size_of(problem, u)
                taken[layer] += k
        rest = [u for layer in queue for units in queue[layer][taken[layer] :] for u in units]
        left += first_fit(problem, space, rest, out)
        check_all_placed(problem, left, free)
        return PolicyResult(out, {"experts_per_layer_by_tier": self._counts(out, problem)})

    @staticmethod
    def _counts(out: Assignment, problem: PlacementProblem) -> dict[str, int]:
        """Whole experts per layer in each tier (of the first MoE layer), for the report."""
        moe = [lt.index for lt in problem.topology.layers if lt.is_moe]
        counts: dict[str, int] = {}
        if moe:
            for u, t in out.items():
                if u.layer == moe[0] and u.expert >= 0 and u.start == 0 and u.shard == 0:
                    counts[t] = counts.get(t, 0) + 1
        return dict(sorted(counts.items()))


class Uniform(SameCountPerLayer):
    name = "uniform"
    summary = "the first k experts of each layer (naive baseline)"

    def expert_order(self, probs: list[float]) -> list[int]:
        return list(range(len(probs)))


class KtExpert(SameCountPerLayer):
    name = "kt_expert"
    summary = "the k most frequently routed experts of each layer, same k everywhere (KTransformers)"

    def expert_order(self, probs: list[float]) -> list[int]:
        ranks = frequency_ranks(probs)
        return sorted(range(len(probs)), key=lambda e: ranks[e])
