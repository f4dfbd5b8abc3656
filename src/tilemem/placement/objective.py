"""The placement objective: expected bytes per token served from each tier.

For a token, a tile is read when its FFN runs: always for shared experts and dense FFNs, with the
routing probability P(expert | layer) from the profile for routed experts. Non-expert weights are
read for every token. Policies maximize what faster tiers serve; the slowest tier's share is the
number the benchmarks compare (lower is better).
"""

from __future__ import annotations

from collections.abc import Iterable

from tilemem.placement.plan import NonExpertWeight, PlacedTile
from tilemem.placement.profile import Profile


def tile_probability(tile: PlacedTile, probs: dict[int, list[float]]) -> float:
    """P(tile is read for one token)."""
    return 1.0 if tile.expert < 0 else probs[tile.layer][tile.expert]


def expected_bytes_per_token(
    tiles: Iterable[PlacedTile],
    non_expert: Iterable[NonExpertWeight],
    profile: Profile,
    tiers: Iterable[str],
    phase: str = "all",
) -> dict[str, float]:
    """Expected bytes read per token from each tier, by `profile`'s routing probabilities."""
    probs = {layer: profile.probabilities(layer, phase) for layer in profile.model.moe_layers}
    out = dict.fromkeys(tiers, 0.0)
    for w in non_expert:
        out[w.tier] += w.nbytes
    for t in tiles:
        out[t.tier] += tile_probability(t, probs) * t.total_bytes
    return {k: round(v, 3) for k, v in out.items()}
