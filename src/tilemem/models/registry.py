"""Model family registry: adding a family = one file + one line in FAMILIES + one parity-test entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tilemem.config import HFConfig, ModelConfig
from tilemem.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Family:
    """How one Hugging Face architecture maps onto TileMEM's model."""

    name: str
    """Registry key, e.g. `olmoe`."""
    architecture: str
    """Hugging Face `architectures[0]`, e.g. `OlmoeForCausalLM`."""
    model_type: str
    """Hugging Face `model_type`."""
    config_from_hf: Callable[[HFConfig], ModelConfig]
    """Translates config.json into a ModelConfig."""
    renames: tuple[tuple[str, str], ...] = ()
    """(hub substring, our substring) pairs applied in order to checkpoint names; reversible."""
    tiny: dict[str, Any] = field(default_factory=dict)
    """HF config fields of the `tiny` synthetic preset (unit tests)."""
    attribute_map: dict[str, str] = field(default_factory=dict)
    """transformers' `attribute_map` of the config class (alias -> canonical): config.json may use either."""

    def read_config(self, data: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Translate a config.json dict of this family, accepting every attribute alias."""
        return self.config_from_hf(HFConfig(data, source, self.attribute_map))

    def to_ours(self, hub_name: str) -> str:
        """Our module name for a hub tensor name."""
        for hub, ours in self.renames:
            hub_name = hub_name.replace(hub, ours)
        return hub_name

    def to_hub(self, our_name: str) -> str:
        """The hub tensor name for one of our module names."""
        for hub, ours in reversed(self.renames):
            our_name = our_name.replace(ours, hub)
        return our_name


def _families() -> dict[str, Family]:
    from tilemem.models import deepseek_v2, deepseek_v3, deepseek_v32, glm_moe_dsa, mixtral, olmoe, qwen2_moe, qwen3_moe

    fams = [
        olmoe.FAMILY,
        mixtral.FAMILY,
        qwen2_moe.FAMILY,
        qwen3_moe.FAMILY,
        deepseek_v2.FAMILY,
        deepseek_v3.FAMILY,
        deepseek_v32.FAMILY,
        glm_moe_dsa.FAMILY,
    ]
    return {f.name: f for f in fams}


def families() -> dict[str, Family]:
    """All registered families by name."""
    return _families()


def family_by_name(name: str) -> Family:
    """The family called `name`, or a clear error listing the known ones."""
    fams = families()
    if name not in fams:
        raise UnsupportedArchitectureError(f"unknown model family '{name}'; known families: {', '.join(fams)}.")
    return fams[name]


def family_for_architecture(architecture: str) -> Family:
    """The family registered for a Hugging Face architecture name."""
    for fam in families().values():
        if fam.architecture == architecture:
            return fam
    supported = ", ".join(f.architecture for f in families().values())
    raise UnsupportedArchitectureError(
        f"architecture '{architecture}' is not supported; supported architectures: {supported}."
    )


def config_from_hf(data: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face config dict into a ModelConfig via its family."""
    archs = data.get("architectures")
    if not archs:
        raise UnsupportedArchitectureError(
            f"{source} has no 'architectures' list, so the model family is unknown; add e.g. "
            '"architectures": ["OlmoeForCausalLM"].'
        )
    return family_for_architecture(archs[0]).read_config(data, source)
