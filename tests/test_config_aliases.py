"""Every family reads a config.json that transformers wrote, and every attribute alias its transformers
config class accepts (`attribute_map`): transformers 5 writes `num_local_experts` where older configs
say `num_experts`, and either name must give the same model."""

from __future__ import annotations

import json

import pytest
import torch

from tilemem.config import HFConfig
from tilemem.models.registry import config_from_hf, families, family_by_name
from tilemem.synth.writer import hf_config

transformers = pytest.importorskip("transformers")
FAMILIES = sorted(families())


def our_config(family: str) -> dict:
    """The config.json our synth writes for the family's tiny preset."""
    return hf_config(family, dict(family_by_name(family).tiny), torch.float32, eos_id=0)


def config_class(family: str):
    return transformers.CONFIG_MAPPING[family_by_name(family).model_type]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_config_saved_by_transformers_loads_as_the_same_model(family, tmp_path):
    ours = our_config(family)
    hf = config_class(family)(**{k: v for k, v in ours.items() if k not in ("architectures", "model_type")})
    hf.architectures = ours["architectures"]
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    # transformers also writes its defaults of fields ours leaves out (DeepSeek-V3: one MTP layer);
    # give ours the same, but not the fields both write in their own way, which must translate equal.
    amap = config_class(family).attribute_map
    renamed = {a for a, c in amap.items() if c in ours} | {c for a, c in amap.items() if a in ours}
    own_way = {"rope_parameters", "head_dim", "dtype", *renamed}
    defaults = {k: v for k, v in saved.items() if k not in ours and k not in own_way}
    assert config_from_hf(saved) == config_from_hf({**defaults, **ours})


@pytest.mark.parametrize(
    ("family", "alias", "canonical"),
    [(f, a, c) for f in FAMILIES for a, c in sorted(config_class(f).attribute_map.items())],
)
def test_each_attribute_alias_of_transformers_gives_the_same_model(family, alias, canonical):
    ours = our_config(family)
    expected = config_from_hf(ours)
    for name, other in ((alias, canonical), (canonical, alias)):  # config.json may hold either name
        if other not in ours and name not in ours:
            continue  # neither name is in the family's config (e.g. an optional field)
        value = ours.get(other, ours.get(name))
        renamed = {k: v for k, v in ours.items() if k not in (alias, canonical)} | {name: value}
        assert config_from_hf(renamed) == expected, f"{family}: config.json with '{name}'"


@pytest.mark.parametrize("family", FAMILIES)
def test_our_alias_table_is_transformers_attribute_map(family):
    assert family_by_name(family).attribute_map == config_class(family).attribute_map


def test_a_missing_field_names_its_aliases_too():
    ours = our_config("qwen3_moe")
    del ours["num_experts"]
    with pytest.raises(Exception, match="no field 'num_experts' \\(or 'num_local_experts'\\)"):
        config_from_hf(ours)


def test_hfconfig_does_not_change_the_callers_dict():
    data = {"num_local_experts": 8}
    HFConfig(data, aliases={"num_experts": "num_local_experts"})
    assert data == {"num_local_experts": 8}
