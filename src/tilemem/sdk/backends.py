"""Backend capabilities and tile handles: the contract between a plan and the kernels that run it.

A backend declares which tile formats, layouts (physical layout or scale layout names), scale
granularities and projection groups it runs. `build_tile_handles` turns a manifest into one
TileHandle per tile; a handle is dispatchable when a registered backend declares its format,
layout and projection group, or when it is a plain dtype (bf16, fp16, fp32), which the built-in
backend always runs. Every handle names a fallback (dtype and backend) for when its backend is
unavailable. There is no global registry: pass the one you built.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tilemem.artifacts.mir import BUILTIN_BACKEND, MANIFEST_FILE, Manifest
from tilemem.errors import ConfigError
from tilemem.placement.errors import PlanError
from tilemem.placement.formats import FORMATS
from tilemem.placement.tiles import GROUPS


@dataclass(frozen=True)
class BackendCapability:
    """What one backend can run.

    >>> cap = BackendCapability(name="my_fp8", formats=["fp8_e4m3"], layouts=["block128x128_fp32"],
    ...                         scale_granularities=["block2d"], projection_groups=["gate_up"])
    >>> cap.supports("fp8_e4m3", "row_major", "block128x128_fp32", "block2d", "gate_up")
    True
    """

    name: str
    """Backend name written into handles."""
    formats: Sequence[str]
    """Tile formats it computes with (integration-contract names)."""
    layouts: Sequence[str] = ("row_major",)
    """Physical layouts or scale layouts it reads."""
    scale_granularities: Sequence[str] = ("none",)
    """Scale granularities it handles (`none`, `block`, `tensor`)."""
    projection_groups: Sequence[str] = GROUPS
    """Projection groups it runs (`gate_up`, `down`)."""
    runtime_entrypoint: str = ""
    """Where the kernel lives, e.g. `kernels/gemm_fp8.cu:launch`."""
    owns_quantization: bool = False
    """The backend quantizes weights itself."""
    owns_calibration: bool = False
    """The backend calibrates scales itself."""
    owns_quality: bool = False
    """The backend owner answers for output quality."""
    hardware_targets: Sequence[str] = ()
    """Hardware it targets, e.g. `cuda_sm90`."""
    fallback_dtype: str = "bf16"
    """Dtype to fall back to when this backend cannot run."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a backend capability needs a non-empty name.")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list | tuple):
                object.__setattr__(self, f.name, tuple(value))
            elif f.name in ("formats", "layouts", "scale_granularities", "projection_groups", "hardware_targets"):
                raise ConfigError(f"backend '{self.name}': {f.name} must be a list of names, got {value!r}.")
        bad = [g for g in self.projection_groups if g not in GROUPS]
        if bad:
            raise ConfigError(f"backend '{self.name}': unknown projection groups {bad}; use {', '.join(GROUPS)}.")
        fallback = FORMATS.get(self.fallback_dtype)
        if fallback is None or not fallback.plain:
            raise ConfigError(
                f"backend '{self.name}': fallback_dtype must be bf16, fp16 or fp32, got {self.fallback_dtype!r}."
            )

    def supports(self, fmt: str, layout: str, scale_layout: str, granularity: str, group: str) -> bool:
        """Whether this backend runs a tile with these properties."""
        layout_ok = layout in self.layouts or scale_layout in self.layouts
        return (
            fmt in self.formats
            and layout_ok
            and granularity in self.scale_granularities
            and group in self.projection_groups
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


BUILTIN = BackendCapability(
    name=BUILTIN_BACKEND,
    formats=("bf16", "fp16", "fp32"),
    runtime_entrypoint="tilemem.layers.moe:expert_ffn",
    hardware_targets=("cpu", "cuda"),
)
"""The built-in PyTorch backend: plain dtypes, every projection group."""


class BackendRegistry:
    """Registered backends, tried in registration order (the built-in one last, implicitly)."""

    def __init__(self, capabilities: Sequence[BackendCapability] = ()) -> None:
        self._caps: dict[str, BackendCapability] = {}
        for cap in capabilities:
            self.register(cap)

    def register(self, capability: BackendCapability, replace: bool = False) -> BackendCapability:
        """Add `capability`; re-registering a name needs `replace=True`."""
        if capability.name == BUILTIN_BACKEND:
            raise ConfigError(f"'{BUILTIN_BACKEND}' is the built-in backend's name; choose another.")
        if capability.name in self._caps and not replace:
            raise ConfigError(f"backend '{capability.name}' is already registered; pass replace=True to update it.")
        self._caps[capability.name] = capability
        return capability

    def get(self, name: str) -> BackendCapability:
        """The backend called `name` (the built-in one included)."""
        if name == BUILTIN_BACKEND:
            return BUILTIN
        if name not in self._caps:
            raise ConfigError(f"no backend '{name}' is registered; registered: {', '.join(self.names()) or 'none'}.")
        return self._caps[name]

    def names(self) -> list[str]:
        """Registered backend names (without the built-in one)."""
        return list(self._caps)

    def __iter__(self) -> Iterator[BackendCapability]:
        return iter(self._caps.values())

    def __len__(self) -> int:
        return len(self._caps)

    def find(self, fmt: str, layout: str, scale_layout: str, granularity: str, group: str) -> BackendCapability | None:
        """The first registered backend that runs such a tile, else the built-in one if it can, else None."""
        for cap in [*self._caps.values(), BUILTIN]:
            if cap.supports(fmt, layout, scale_layout, granularity, group):
                return cap
        return None


def register_backend(
    capability: BackendCapability, registry: BackendRegistry, replace: bool = False
) -> BackendCapability:
    """Register `capability` in `registry` (there is no global registry).

    >>> reg = BackendRegistry()
    >>> _ = register_backend(BackendCapability(name="my_fp8", formats=["fp8_e4m3"]), registry=reg)
    >>> reg.names()
    ['my_fp8']
    """
    return registry.register(capability, replace=replace)


@dataclass(frozen=True)
class TileHandle:
    """Everything a kernel needs to find and run one tile."""

    stable_key: str
    """Tile key, e.g. `L0:E3:gate_up:S0:N0-128`."""
    layer: int
    """Decoder layer."""
    expert: int | str
    """Routed expert index, or `shared` / `dense`."""
    projection_group: str
    """`gate_up` or `down`."""
    shard: int
    """Tensor-parallel shard."""
    start: int
    """First neuron."""
    end: int
    """One past the last neuron."""
    residency: str
    """Tier the tile is resident in."""
    dtype: str
    """Element dtype of the stored weights."""
    format: str
    """Tile format."""
    weight_offset: int
    """Byte offset of the weights in the tile store."""
    weight_bytes: int
    """Weight bytes."""
    scale_offset: int
    """Byte offset of the scales."""
    scale_bytes: int
    """Scale bytes (0: none)."""
    scale_layout: str
    """Scale layout name (`none` for plain dtypes)."""
    backend: str
    """Backend that runs it (preferred one when not dispatchable)."""
    fallback_dtype: str
    """Dtype of the fallback path."""
    fallback_backend: str
    """Backend of the fallback path."""
    dispatchable: bool
    """Whether `backend` can run the tile as stored."""


def build_tile_handles(
    manifest: Manifest | dict | str | Path, registry: BackendRegistry | None = None
) -> list[TileHandle]:
    """One TileHandle per manifest tile, dispatched against `registry` (None: built-in backend only).

    >>> import tilemem as TM
    >>> compiled = TM.plan(TM.model_spec(name="d", layers=1, experts_per_layer=2, hidden_size=8,
    ...                                  intermediate_size=16, expert_budget=1))
    >>> handles = TM.build_tile_handles(compiled.manifest)
    >>> handles[0].stable_key, handles[0].backend, handles[0].dispatchable
    ('L0:E0:gate_up:S0:N0-16', 'tilemem_builtin', True)
    """
    data = _manifest_dict(manifest)
    registry = registry or BackendRegistry()
    handles = []
    for t in data["tiles"]:
        scale = t["scale"]
        cap = registry.find(t["format"], t["layout"], scale["layout"], scale["granularity"], t["group"])
        handles.append(
            TileHandle(
                stable_key=t["key"],
                layer=t["layer"],
                expert=t["expert"],
                projection_group=t["group"],
                shard=t["shard"],
                start=t["start"],
                end=t["end"],
                residency=t["tier"],
                dtype=t["dtype"],
                format=t["format"],
                weight_offset=t["offset"],
                weight_bytes=t["bytes"],
                scale_offset=scale["offset"],
                scale_bytes=scale["bytes"],
                scale_layout=scale["layout"],
                backend=cap.name if cap else t["backend"],
                fallback_dtype=cap.fallback_dtype if cap else t["fallback"]["dtype"],
                fallback_backend=t["fallback"]["backend"],
                dispatchable=cap is not None,
            )
        )
    return handles


def _manifest_dict(manifest: Manifest | dict | str | Path) -> dict[str, Any]:
    if isinstance(manifest, Manifest):
        return manifest.data
    if isinstance(manifest, dict):
        if "tiles" not in manifest:
            raise PlanError("the manifest dict has no 'tiles'; pass a manifest written by TileMEM.")
        return manifest
    path = Path(manifest)
    path = path / MANIFEST_FILE if path.is_dir() else path
    if not path.is_file():
        raise PlanError(f"manifest '{path}' does not exist.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PlanError(f"manifest '{path}' is not valid JSON ({exc}).") from None
