"""Profile: what a workload activates, per MoE layer (schema `tilemem_profile_v1`).

Per layer: routing counts per expert for prefill and decode apart, the tokens seen in each phase,
the most frequent expert pairs chosen by the same token (co-activation), and the reuse distance of
experts across decode steps of one sequence (how many steps since the expert was last routed).
Profiles merge by summing (co-activation keeps the top pairs of the sum of the kept pairs), and
refuse to describe a model with other layers or experts.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tilemem.jsonio import read_json, sha256_of, write_json_atomic
from tilemem.models.topology import Topology
from tilemem.placement.errors import ProfileError

PROFILE_SCHEMA = "tilemem_profile_v1"
COACT_TOP = 64
"""Co-activation pairs kept per layer."""
REUSE_MAX = 32
"""Reuse distances above this share the last histogram bucket."""
PHASES = ("all", "prefill", "decode")


@dataclass(frozen=True)
class ModelSignature:
    """The shape a profile was recorded on; a profile only applies to models with the same one."""

    family: str
    """Model family (informational; not compared)."""
    num_layers: int
    """Decoder layers."""
    moe_layers: tuple[int, ...]
    """Indices of MoE layers."""
    num_experts: int
    """Routed experts per MoE layer."""
    top_k: int
    """Experts per token."""

    @classmethod
    def of(cls, topology: Topology) -> ModelSignature:
        """The signature of `topology`."""
        moe = [lt for lt in topology.layers if lt.is_moe]
        return cls(
            family=topology.family,
            num_layers=len(topology.layers),
            moe_layers=tuple(lt.index for lt in moe),
            num_experts=moe[0].num_experts if moe else 0,
            top_k=moe[0].top_k if moe else 0,
        )

    def describe(self) -> str:
        """`2 layers (MoE: 0, 1) x 8 experts, top-2`."""
        moe = ", ".join(map(str, self.moe_layers)) or "none"
        return f"{self.num_layers} layers (MoE: {moe}) x {self.num_experts} experts, top-{self.top_k}"


@dataclass(frozen=True)
class LayerProfile:
    """Routing statistics of one MoE layer."""

    layer: int
    """Decoder layer index."""
    prefill_counts: tuple[int, ...]
    """Times each expert was routed during prefill."""
    decode_counts: tuple[int, ...]
    """Times each expert was routed during decode."""
    prefill_tokens: int
    """Prefill tokens this layer routed."""
    decode_tokens: int
    """Decode tokens this layer routed."""
    coactivation: tuple[tuple[int, int, int], ...] = ()
    """Top (expert i, expert j > i, tokens routed to both) pairs, most frequent first."""
    reuse_hist: tuple[int, ...] = (0,) * (REUSE_MAX + 1)
    """Decode reuse distances: entry d-1 counts distance d (1..REUSE_MAX), the last entry larger ones."""
    reuse_first: int = 0
    """Decode activations of an expert not routed before in the same sequence."""

    def counts(self, phase: str = "all") -> tuple[int, ...]:
        """Routing counts of `phase` (`all`, `prefill`, `decode`)."""
        if phase == "prefill":
            return self.prefill_counts
        if phase == "decode":
            return self.decode_counts
        return tuple(p + d for p, d in zip(self.prefill_counts, self.decode_counts, strict=True))

    def tokens(self, phase: str = "all") -> int:
        """Tokens routed in `phase`."""
        return {"prefill": self.prefill_tokens, "decode": self.decode_tokens}.get(
            phase, self.prefill_tokens + self.decode_tokens
        )

    def probabilities(self, top_k: int, phase: str = "all") -> list[float]:
        """P(expert routed for a token); uniform top_k/E when the phase saw no tokens."""
        counts, tokens = self.counts(phase), self.tokens(phase)
        if tokens == 0:
            return [top_k / len(counts)] * len(counts)
        return [c / tokens for c in counts]

    def top_share(self, fraction: float = 0.25, phase: str = "all") -> float:
        """Share of routing mass on the top `fraction` of experts (0.25 under uniform routing)."""
        counts = sorted(self.counts(phase), reverse=True)
        total = sum(counts)
        top = max(1, math.ceil(len(counts) * fraction))
        return sum(counts[:top]) / total if total else 0.0

    def mean_reuse_distance(self) -> float:
        """Mean decode reuse distance (the overflow bucket counted as REUSE_MAX + 1)."""
        n = sum(self.reuse_hist)
        return sum((d + 1) * c for d, c in enumerate(self.reuse_hist)) / n if n else 0.0


@dataclass(frozen=True)
class Profile:
    """Routing profile of one or more workloads on one model shape."""

    model: ModelSignature
    """Shape the profile was recorded on."""
    layers: tuple[LayerProfile, ...]
    """One entry per MoE layer, in layer order."""
    workloads: tuple[str, ...] = ()
    """Names of the workloads measured (several after a merge)."""
    source: str = ""
    """Where the counts came from: a checkpoint name, `uniform` or `synthetic`."""

    @property
    def total_tokens(self) -> int:
        """Tokens routed (prefill + decode) by the first MoE layer."""
        return self.layers[0].tokens() if self.layers else 0

    def layer(self, index: int) -> LayerProfile:
        """Statistics of MoE layer `index`."""
        for lp in self.layers:
            if lp.layer == index:
                return lp
        raise ProfileError(f"the profile has no MoE layer {index}; it covers {self.model.describe()}.")

    def probabilities(self, layer: int, phase: str = "all") -> list[float]:
        """P(expert routed for a token) in `layer`."""
        if phase not in PHASES:
            raise ProfileError(f"unknown phase '{phase}'; use one of {', '.join(PHASES)}.")
        return self.layer(layer).probabilities(self.model.top_k, phase)

    def check_matches(self, topology: Topology, where: str = "the profile") -> None:
        """Raise a ProfileError when the profile was recorded on another model shape."""
        mine, theirs = self.model, ModelSignature.of(topology)
        same = (mine.num_layers, mine.moe_layers, mine.num_experts, mine.top_k) == (
            theirs.num_layers,
            theirs.moe_layers,
            theirs.num_experts,
            theirs.top_k,
        )
        if not same:
            raise ProfileError(
                f"{where} was recorded on a {mine.family} model with {mine.describe()}, but this "
                f"{theirs.family} model has {theirs.describe()}; record a profile on this model with "
                "`tilemem profile MODEL --workload mixed --out profile.json`."
            )

    def merge(self, other: Profile) -> Profile:
        """Sum of two profiles of the same model shape."""
        a, b = self.model, other.model
        if (a.num_layers, a.moe_layers, a.num_experts, a.top_k) != (
            b.num_layers,
            b.moe_layers,
            b.num_experts,
            b.top_k,
        ):
            raise ProfileError(f"cannot merge profiles of different models: {a.describe()} vs {b.describe()}.")
        layers = tuple(_merge_layer(x, y) for x, y in zip(self.layers, other.layers, strict=True))
        workloads = tuple(dict.fromkeys(self.workloads + other.workloads))
        source = self.source if self.source == other.source else f"{self.source}+{other.source}"
        return replace(self, layers=layers, workloads=workloads, source=source)

    def digest(self) -> str:
        """sha256 of the canonical JSON form (plans record which profile they used)."""
        return sha256_of(self.to_dict())

    # ----- construction without a model run -----

    @classmethod
    def uniform(cls, topology: Topology, tokens: int = 0) -> Profile:
        """Every expert equally likely (the prior used when no profile is given)."""
        sig = ModelSignature.of(topology)
        per = tokens * sig.top_k // max(1, sig.num_experts)
        layers = tuple(
            LayerProfile(i, (per,) * sig.num_experts, (0,) * sig.num_experts, tokens, 0) for i in sig.moe_layers
        )
        return cls(sig, layers, ("uniform",), "uniform")

    @classmethod
    def synthetic(cls, topology: Topology, skew: float = 1.0, tokens: int = 10_000, seed: int = 0) -> Profile:
        """Zipf(skew)-shaped routing, a different expert order per layer (tests, benchmarks, demos)."""
        sig = ModelSignature.of(topology)
        rng = random.Random(seed)
        layers = []
        for i in sig.moe_layers:
            weights = [(r + 1) ** -skew for r in range(sig.num_experts)]
            scale = sig.top_k / sum(weights)
            probs = [min(1.0, w * scale) for w in weights]
            order = list(range(sig.num_experts))
            rng.shuffle(order)
            counts = [0] * sig.num_experts
            for rank, e in enumerate(order):
                counts[e] = int(probs[rank] * tokens)
            layers.append(LayerProfile(i, tuple(counts), (0,) * sig.num_experts, tokens, 0))
        return cls(sig, tuple(layers), (f"synthetic_zipf{skew:g}",), "synthetic")

    # ----- (de)serialization -----

    def to_dict(self) -> dict[str, Any]:
        """JSON form (schema `tilemem_profile_v1`)."""
        return {
            "schema_version": PROFILE_SCHEMA,
            "model": {
                "family": self.model.family,
                "num_layers": self.model.num_layers,
                "moe_layers": list(self.model.moe_layers),
                "num_experts": self.model.num_experts,
                "top_k": self.model.top_k,
            },
            "workloads": list(self.workloads),
            "source": self.source,
            "tokens": {
                "prefill": self.layers[0].prefill_tokens if self.layers else 0,
                "decode": self.layers[0].decode_tokens if self.layers else 0,
            },
            "layers": [
                {
                    "layer": lp.layer,
                    "tokens": {"prefill": lp.prefill_tokens, "decode": lp.decode_tokens},
                    "prefill_counts": list(lp.prefill_counts),
                    "decode_counts": list(lp.decode_counts),
                    "coactivation": [list(p) for p in lp.coactivation],
                    "reuse_distance": {"max": REUSE_MAX, "hist": list(lp.reuse_hist), "first": lp.reuse_first},
                    "top_quarter_share": round(lp.top_share(0.25), 6),
                }
                for lp in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "profile") -> Profile:
        """Parse and validate the JSON form."""
        if not isinstance(data, dict):
            raise ProfileError(f"{where} is not a JSON object; it should be a file written by `tilemem profile`.")
        version = data.get("schema_version")
        if version != PROFILE_SCHEMA:
            raise ProfileError(
                f"{where} has schema_version {version!r}, but this TileMEM reads {PROFILE_SCHEMA!r}; "
                "re-record it with `tilemem profile`."
            )
        try:
            m = data["model"]
            sig = ModelSignature(
                str(m["family"]), int(m["num_layers"]), tuple(m["moe_layers"]), int(m["num_experts"]), int(m["top_k"])
            )
            layers = tuple(_layer_from_dict(d, sig.num_experts) for d in data["layers"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"{where} is malformed ({type(exc).__name__}: {exc}); re-record it.") from None
        if tuple(lp.layer for lp in layers) != sig.moe_layers:
            raise ProfileError(f"{where}: its layers do not match its own model.moe_layers; the file is corrupt.")
        return cls(sig, layers, tuple(data.get("workloads", ())), str(data.get("source", "")))

    def save(self, path: str | Path) -> Path:
        """Write atomically as JSON."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, topology: Topology | None = None) -> Profile:
        """Read a profile file; with `topology`, also check it belongs to that model."""
        profile = cls.from_dict(read_json(path, "profile", ProfileError), f"profile '{path}'")
        if topology is not None:
            profile.check_matches(topology, f"profile '{path}'")
        return profile


def merge_profiles(profiles: list[Profile]) -> Profile:
    """Sum of several profiles of one model shape.

    >>> import tilemem as TM
    >>> topo = TM.model_spec(name="m", layers=1, experts_per_layer=4, hidden_size=8, intermediate_size=8).topology()
    >>> TM.merge_profiles([Profile.uniform(topo, 10), Profile.synthetic(topo, tokens=30)]).total_tokens
    40
    """
    if not profiles:
        raise ProfileError("no profiles to merge.")
    out = profiles[0]
    for p in profiles[1:]:
        out = out.merge(p)
    return out


def top_pairs(pairs: dict[tuple[int, int], int], keep: int = COACT_TOP) -> tuple[tuple[int, int, int], ...]:
    """The `keep` most frequent pairs, ties broken by expert ids (deterministic)."""
    ranked = sorted(((i, j, c) for (i, j), c in pairs.items() if c > 0), key=lambda t: (-t[2], t[0], t[1]))
    return tuple(ranked[:keep])


def _merge_layer(a: LayerProfile, b: LayerProfile) -> LayerProfile:
    pairs: dict[tuple[int, int], int] = {}
    for i, j, c in a.coactivation + b.coactivation:
        pairs[(i, j)] = pairs.get((i, j), 0) + c
    return LayerProfile(
        layer=a.layer,
        prefill_counts=tuple(x + y for x, y in zip(a.prefill_counts, b.prefill_counts, strict=True)),
        decode_counts=tuple(x + y for x, y in zip(a.decode_counts, b.decode_counts, strict=True)),
        prefill_tokens=a.prefill_tokens + b.prefill_tokens,
        decode_tokens=a.decode_tokens + b.decode_tokens,
        coactivation=top_pairs(pairs),
        reuse_hist=tuple(x + y for x, y in zip(a.reuse_hist, b.reuse_hist, strict=True)),
        reuse_first=a.reuse_first + b.reuse_first,
    )


def _layer_from_dict(d: dict[str, Any], experts: int) -> LayerProfile:
    pre, dec = tuple(map(int, d["prefill_counts"])), tuple(map(int, d["decode_counts"]))
    if len(pre) != experts or len(dec) != experts:
        raise ValueError(f"layer {d.get('layer')} has {len(pre)}/{len(dec)} counts for {experts} experts")
    if min(pre + dec, default=0) < 0:
        raise ValueError(f"layer {d.get('layer')} has negative counts")
    reuse = d.get("reuse_distance", {})
    hist = tuple(map(int, reuse.get("hist", (0,) * (REUSE_MAX + 1))))
    if len(hist) != REUSE_MAX + 1:
        raise ValueError(f"layer {d.get('layer')} reuse histogram has {len(hist)} buckets, expected {REUSE_MAX + 1}")
    return LayerProfile(
        layer=int(d["layer"]),
        prefill_counts=pre,
        decode_counts=dec,
        prefill_tokens=int(d["tokens"]["prefill"]),
        decode_tokens=int(d["tokens"]["decode"]),
        coactivation=tuple((int(i), int(j), int(c)) for i, j, c in d.get("coactivation", ())),
        reuse_hist=hist,
        reuse_first=int(reuse.get("first", 0)),
    )
