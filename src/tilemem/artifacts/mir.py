"""Plan artifacts: the MIR (`tilemem_mir_v1`) and the manifest (`tilemem_manifest_v1`).

- `mir.json`: the model structure, tiling, tiers with budgets and use, policy, profile reference,
  non-expert weights, residency per FFN (neuron ranges per tier), the objective, and the
  manifest's sha256.
  A rank plan (`world_size` > 1) adds `ranks`: its rank, the world size and its expert replicas; tiles
  other ranks compute are in tier `remote`. `load_rank_plan(dir, r)` reads `dir/rank{r}`.
- `manifest.json`: one record per tile: key, tier, byte offset and size in the tile store, dtype,
  format, layout, scale metadata, preferred backend and fallback.

Both carry a `checksum` (sha256 of their canonical JSON without it); the MIR's is the plan's.
Everything is written atomically; reading verifies both checksums and rebuilds the Plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilemem.jsonio import checksum_ok, read_json, with_checksum, write_json_atomic
from tilemem.models.topology import LayerTopology, Topology
from tilemem.placement.errors import PlanError
from tilemem.placement.formats import tile_format
from tilemem.placement.plan import NonExpertWeight, PlacedTile, Plan, TierUsage
from tilemem.placement.store_layout import ALIGNMENT
from tilemem.placement.tiles import expert_from_label, expert_key, expert_label

MIR_SCHEMA = "tilemem_mir_v1"
MANIFEST_SCHEMA = "tilemem_manifest_v1"
MIR_FILE = "mir.json"
MANIFEST_FILE = "manifest.json"
HEATMAP_FILE = "heatmap.png"
BUILTIN_BACKEND = "tilemem_builtin"
OBJECTIVE = "maximize expected bytes/token served from faster tiers (P(route) x tile bytes), fastest first"


@dataclass(frozen=True)
class Mir:
    """The public model/tile intermediate representation of a plan (a checksummed JSON object)."""

    data: dict[str, Any]
    """The JSON object, `checksum` included."""

    @property
    def name(self) -> str:
        """Plan name."""
        return self.data["name"]

    @property
    def schema_version(self) -> str:
        """`tilemem_mir_v1`."""
        return self.data["schema_version"]

    @property
    def checksum(self) -> str:
        """sha256 of the MIR (the plan's checksum)."""
        return self.data["checksum"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return self.data


@dataclass(frozen=True)
class Manifest:
    """Deployment metadata of every tile (a checksummed JSON object)."""

    data: dict[str, Any]
    """The JSON object, `checksum` included."""

    @property
    def name(self) -> str:
        """Plan name."""
        return self.data["name"]

    @property
    def tiles(self) -> list[dict[str, Any]]:
        """One record per tile, in store order."""
        return self.data["tiles"]

    @property
    def checksum(self) -> str:
        """sha256 of the manifest."""
        return self.data["checksum"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return self.data


def build_artifacts(plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    """(MIR, manifest) JSON objects of `plan`, each with its checksum."""
    manifest = with_checksum(_manifest(plan))
    return with_checksum(_mir(plan, manifest["checksum"])), manifest


def plan_checksum(plan: Plan) -> str:
    """sha256 of the plan's MIR (which covers the manifest): equal plans, equal checksums."""
    return build_artifacts(plan)[0]["checksum"]


def save_plan(plan: Plan, out_dir: str | Path, heatmap: bool = True) -> dict[str, Path]:
    """Write mir.json and manifest.json (and heatmap.png) into `out_dir`, each atomically."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PlanError(f"output '{out}' exists and is not a directory; choose another --out.")
    mir, manifest = build_artifacts(plan)
    paths = {
        "manifest": write_json_atomic(out / MANIFEST_FILE, manifest),
        "mir": write_json_atomic(out / MIR_FILE, mir),
    }
    if heatmap:
        from tilemem.artifacts.heatmap import write_heatmap

        paths["heatmap"] = write_heatmap(plan, out / HEATMAP_FILE)
    return paths


def load_plan(out_dir: str | Path) -> Plan:
    """Rebuild the Plan from a directory written by `save_plan` (`tilemem plan` / `tilemem compile`),
    verifying both checksums."""
    out = Path(out_dir)
    mir = read_json(out / MIR_FILE, "plan MIR", PlanError)
    manifest = read_json(out / MANIFEST_FILE, "plan manifest", PlanError)
    for what, obj, schema in (("MIR", mir, MIR_SCHEMA), ("manifest", manifest, MANIFEST_SCHEMA)):
        if not isinstance(obj, dict) or obj.get("schema_version") != schema:
            raise PlanError(f"{out}: the {what} is not {schema}; re-create the plan with `tilemem plan`.")
        if not checksum_ok(obj):
            raise PlanError(
                f"{out}: the {what} checksum does not match its contents; the file was modified or is corrupt."
            )
    if mir["manifest"]["sha256"] != manifest["checksum"]:
        raise PlanError(f"{out}: manifest.json is not the one mir.json was written with; re-create the plan.")
    return plan_from_artifacts(mir, manifest)


def plan_from_artifacts(mir: dict[str, Any], manifest: dict[str, Any]) -> Plan:
    """The Plan described by a MIR and its manifest."""
    m = mir["model"]
    topo = Topology(
        family=m["family"],
        hidden_size=m["hidden_size"],
        dtype=m["dtype"],
        dtype_bytes=m["dtype_bytes"],
        layers=tuple(LayerTopology(**lt) for lt in m["layers"]),
        non_expert=tuple((w["name"], w["bytes"]) for w in mir["non_expert"]),
        ffn_types=tuple(tuple(t) for t in m.get("ffn_types", ())),  # a plan saved before them: none
        kv_widths=tuple((w["name"], w["width"]) for w in m.get("kv_widths", ())),  # likewise
    )
    tiles = tuple(
        PlacedTile(
            t["key"],
            t["layer"],
            expert_from_label(str(t["expert"])),
            t["group"],
            t["shard"],
            t["start"],
            t["end"],
            t["tier"],
            t["offset"],
            t["bytes"],
            t["scale"]["offset"],
            t["scale"]["bytes"],
        )  # fmt: skip
        for t in manifest["tiles"]
    )
    tiling = mir["tiling"]
    return Plan(
        name=mir["name"],
        topology=topo,
        fmt=tile_format(tiling["format"]),
        tile=tiling["tile"],
        shard_count=tiling["shard_count"],
        policy=mir["policy"]["name"],
        policy_params=mir["policy"]["params"],
        tiers=tuple(TierUsage(t["tier"], t["capacity"], t["cache"], t["non_expert"], t["tiles"]) for t in mir["tiers"]),
        budget_source=mir["budget"],
        non_expert=tuple(NonExpertWeight(w["name"], w["bytes"], w["tier"]) for w in mir["non_expert"]),
        tiles=tiles,
        store_bytes=tiling["store_bytes"],
        profile=mir["profile"],
        expected_bytes_per_token=mir["expected_bytes_per_token"],
        settings=mir["settings"],
        **_ranks_from(mir),
    )


def _ranks_from(mir: dict[str, Any]) -> dict[str, Any]:
    """Plan fields of a rank plan's `ranks` section (absent: a single-process plan, rank 0 of 1)."""
    ranks = mir.get("ranks")
    if ranks is None:
        return {}
    return {
        "rank": int(ranks["rank"]),
        "world_size": int(ranks["world_size"]),
        "replicas": tuple(tuple(int(x) for x in rep) for rep in ranks["replicas"]),
    }


def load_rank_plan(out_dir: str | Path, rank: int) -> Plan:
    """Rank `rank`'s plan from a directory written by `tilemem plan --world-size N` (`DIR/rank{rank}/`),
    checked to be that rank's."""
    out = Path(out_dir)
    path = out / f"rank{rank}"
    if not (path / MIR_FILE).exists():
        found = sorted(p.name for p in out.glob("rank*") if p.is_dir()) if out.is_dir() else []
        has = f"it has {', '.join(found)}" if found else "it has no rank directories"
        raise PlanError(
            f"{out}: no plan for rank {rank} ({path / MIR_FILE} is missing; {has}); write one with "
            f"`tilemem plan MODEL --budget ... --world-size N --out {out}` where N > {rank}."
        )
    plan = load_plan(path)
    if plan.rank != rank or plan.world_size <= rank:
        raise PlanError(
            f"{path}: this is the plan of rank {plan.rank} of {plan.world_size}, not of rank {rank}; the directory "
            "was renamed or mixed up: re-create the plans with `tilemem plan ... --world-size N`."
        )
    return plan


def _mir(plan: Plan, manifest_sha: str) -> dict[str, Any]:
    topo = plan.topology
    residency: dict[str, dict[str, list[list[int]]]] = {}
    ffns = sorted({(t.layer, t.expert) for t in plan.tiles})
    for layer, expert in ffns:
        ranges = plan.resident_ranges(layer, expert)
        residency[expert_key(layer, expert)] = {k: [list(r) for r in v] for k, v in ranges.items()}
    out = {
        "schema_version": MIR_SCHEMA,
        "name": plan.name,
        "model": {
            "family": topo.family,
            "dtype": topo.dtype,
            "dtype_bytes": topo.dtype_bytes,
            "hidden_size": topo.hidden_size,
            "layers": [
                {
                    "index": lt.index,
                    "is_moe": lt.is_moe,
                    "num_experts": lt.num_experts,
                    "top_k": lt.top_k,
                    "expert_intermediate": lt.expert_intermediate,
                    "shared_intermediate": lt.shared_intermediate,
                    "dense_intermediate": lt.dense_intermediate,
                }
                for lt in topo.layers
            ],
            "non_expert_bytes": topo.non_expert_bytes,
            "total_bytes": sum(w.nbytes for w in plan.non_expert) + sum(t.total_bytes for t in plan.tiles),
        },
        "tiling": {
            "format": plan.fmt.name,
            "tile": plan.tile,
            "shard_count": plan.shard_count,
            "groups": ["gate_up", "down"],
            "key_format": "L{layer}:E{expert|shared|dense}:{group}:S{shard}:N{start}-{end}",
            "store_alignment": ALIGNMENT,
            "store_layout": "per unit, 4 KiB aligned: gate rows [n,D], up rows [n,D], down columns as [n,D], scales; "
            "routed experts first by (layer, expert, shard, start), then shared/dense FFNs",
            "store_bytes": plan.store_bytes,
            "tiles": len(plan.tiles),
        },
        "tiers": [
            {
                "tier": u.tier,
                "capacity": u.capacity,
                "cache": u.cache,
                "non_expert": u.non_expert,
                "tiles": u.tiles,
                "used": u.used,
                "compute": u.compute,
            }
            for u in plan.tiers
        ],
        "budget": plan.budget_source,
        "policy": {"name": plan.policy, "params": plan.policy_params, "objective": OBJECTIVE},
        "profile": plan.profile,
        "non_expert": [{"name": w.name, "bytes": w.nbytes, "tier": w.tier} for w in plan.non_expert],
        "residency": residency,
        "expected_bytes_per_token": plan.expected_bytes_per_token,
        "settings": plan.settings,
        "manifest": {"file": MANIFEST_FILE, "sha256": manifest_sha},
    }
    if topo.ffn_types:  # a GGUF model's FFN quant types: the cost model counts a loaded plan's tiles by them
        out["model"]["ffn_types"] = [list(t) for t in topo.ffn_types]
    if topo.kv_widths:  # the KV cache's values per token (a quantized k/v weight's bytes do not give them)
        out["model"]["kv_widths"] = [{"name": n, "width": w} for n, w in topo.kv_widths]
    if plan.world_size > 1:  # a rank plan (single-process MIRs keep their form, and their checksums)
        out["ranks"] = {
            "rank": plan.rank,
            "world_size": plan.world_size,
            "replicas": [list(rep) for rep in plan.replicas],
        }
    return out


def _manifest(plan: Plan) -> dict[str, Any]:
    fmt = plan.fmt
    fallback = tile_format(plan.topology.dtype)
    # Plain dtypes run on the built-in backend; other formats name the spec's backend (else the built-in one
    # where it computes the format, FP8 included, or `external`).
    default = BUILTIN_BACKEND if fmt.builtin else "external"
    backend = BUILTIN_BACKEND if fmt.plain else plan.settings.get("backend") or default
    return {
        "schema_version": MANIFEST_SCHEMA,
        "name": plan.name,
        "store": {"alignment": ALIGNMENT, "bytes": plan.store_bytes, "file": "tiles.bin"},
        "tiles": [
            {
                "key": t.key,
                "layer": t.layer,
                "expert": t.expert if t.expert >= 0 else expert_label(t.expert),
                "group": t.group,
                "shard": t.shard,
                "start": t.start,
                "end": t.end,
                "tier": t.tier,
                "offset": t.offset,
                "bytes": t.nbytes,
                "dtype": fmt.name,
                "format": fmt.name,
                "layout": fmt.layout,
                "scale": {
                    "offset": t.scale_offset,
                    "bytes": t.scale_bytes,
                    "layout": fmt.scale_layout,
                    "granularity": fmt.scale_granularity,
                },
                "backend": backend,
                "fallback": {"dtype": fallback.name, "backend": BUILTIN_BACKEND},
            }
            for t in plan.tiles
        ],
    }
