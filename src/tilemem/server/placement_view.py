"""What `/v1/tilemem/plan` shows: the active plan and the live residency of every routed expert.

Residency is a matrix (MoE layers x experts) per tier: the share of each expert's neurons resident
there. It is read from the tiered runtime, so tiles that async planning migrated show where they
are now; it is rebuilt on the engine thread (which owns the runtime) when a migration happened.
"""

from __future__ import annotations

import threading

from tilemem.artifacts.mir import plan_checksum
from tilemem.models.topology import Topology


class PlacementView:
    """Plan summary + residency matrices of one loaded `LLM`, safe to read from any thread."""

    def __init__(self, llm, model_name: str) -> None:
        self.llm = llm
        self.model_name = model_name
        self.plan = llm.plan
        self.topology: Topology = self.plan.topology if self.plan is not None else Topology.from_config(llm.config)
        self.tiers = self._tiers()
        self.layers = [lt.index for lt in self.topology.layers if lt.is_moe]
        self.experts = max((lt.num_experts for lt in self.topology.layers), default=0)
        self.summary = self._summary()
        self.ranks = self._ranks()
        self.lock = threading.Lock()
        self.version = 0
        self._signature: tuple | None = None
        self._residency: dict[str, list[list[float]]] = {}
        self.refresh()

    def _tiers(self) -> list[str]:
        if self.plan is None:
            return ["cpu"]
        tiers = list(dict.fromkeys("cpu" if u.tier == "cuda" else u.tier for u in self.plan.tiers))
        return tiers + ["remote"] * (self.plan.world_size > 1)  # what the other ranks compute

    def _ranks(self) -> dict | None:
        """Expert parallelism: this rank, the world size and, where rank 0 has every rank's plan, the share of each
        routed expert's neurons each rank computes ([rank][MoE layer][expert])."""
        plan = self.plan
        if plan is None or plan.world_size == 1:
            return None
        plans = getattr(self.llm.parts, "rank_plans", None) or []
        share = []
        for p in plans:
            rows = []
            for lt in self.topology.layers:
                if lt.is_moe:
                    row = [0.0] * self.experts
                    for e in range(lt.num_experts):
                        spans = [
                            s for tier, ss in p.resident_ranges(lt.index, e).items() if tier != "remote" for s in ss
                        ]
                        row[e] = round(sum(b - a for a, b in spans) / lt.expert_intermediate, 4)
                    rows.append(row)
            share.append(rows)
        return {"rank": plan.rank, "world_size": plan.world_size, "share": share}

    def _summary(self) -> dict | None:
        plan = self.plan
        if plan is None:
            return None
        return {
            "name": plan.name,
            "policy": plan.policy,
            "budget": plan.budget_source,
            "tile": plan.tile,
            "checksum": plan_checksum(plan),
            "rank": plan.rank,
            "world_size": plan.world_size,
            "store_bytes": plan.store_bytes,
            "expected_bytes_per_token": plan.expected_bytes_per_token,
            "tiers": [
                {
                    "tier": u.tier,
                    "capacity": u.capacity,
                    "used": u.used,
                    "non_expert": u.non_expert,
                    "tiles": u.tiles,
                    "cache": u.cache,
                }
                for u in plan.tiers
            ],
        }

    def refresh(self) -> None:
        """Rebuild the residency matrices if tiles moved since the last call (engine thread)."""
        replanner = getattr(self.llm, "replanner", None)
        sig = (replanner.stats.promoted, replanner.stats.demoted) if replanner is not None else ()
        if sig == self._signature:
            return
        residency = self._compute()
        with self.lock:
            self._residency = residency
            self._signature = sig
            self.version += 1

    def _compute(self) -> dict[str, list[list[float]]]:
        tiered = self.llm.tiered
        out = {tier: [] for tier in self.tiers}
        for lt in self.topology.layers:
            if not lt.is_moe:
                continue
            rows = {tier: [0.0] * self.experts for tier in self.tiers}
            for e in range(lt.num_experts):
                if tiered is None:
                    rows["cpu"][e] = 1.0
                    continue
                ranges = tiered.ranges.get((lt.index, e), {})
                for tier, spans in ranges.items():
                    if tier in rows:
                        rows[tier][e] += sum(b - a for a, b in spans) / lt.expert_intermediate
            for tier in self.tiers:
                out[tier].append([round(v, 4) for v in rows[tier]])
        return out

    def as_json(self) -> dict:
        """The `/v1/tilemem/plan` body."""
        with self.lock:
            residency, version = self._residency, self.version
        return {
            "model": self.model_name,
            "family": self.topology.family,
            "plan": self.summary,
            "tiers": self.tiers,
            "layers": self.layers,
            "experts": self.experts,
            "residency": residency,
            "version": version,
            "ranks": self.ranks,
        }
