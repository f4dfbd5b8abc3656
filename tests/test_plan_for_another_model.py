"""A plan is refused, by name, on a model it was not made for (family or FFN shapes differ)."""

from __future__ import annotations

import pytest

from tilemem.cli.main import main
from tilemem.loader.checkpoint import Checkpoint
from tilemem.placement.errors import PlanError
from tilemem.runtime.setup import check_plan_matches, make_plan


@pytest.fixture(scope="module")
def olmoe_plan_dir(make_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "olmoe-plan"
    args = ["plan", str(make_ckpt("olmoe")), "--budget", "cpu=1MiB", "--tile-size", "16", "--no-heatmap"]
    assert main([*args, "--out", str(out)]) == 0
    return out


def test_generate_with_a_plan_for_another_model_names_both_models(make_ckpt, olmoe_plan_dir, capsys):
    mixtral = make_ckpt("mixtral")  # same layer count and experts; expert width 48, not 32
    capsys.readouterr()
    argv = ["generate", str(mixtral), "--dtype", "fp32", "--plan", str(olmoe_plan_dir), "--max-tokens", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: plan 'ckpt' was made for another model: olmoe, 2 layers")
    assert f"but {mixtral} is mixtral" in err and "width 32" in err and "width 48" in err
    assert f"tilemem plan {mixtral}" in err and "tile boundaries" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_plan_of_another_family_is_refused(make_ckpt):
    olmoe, qwen = Checkpoint.open(make_ckpt("olmoe")), Checkpoint.open(make_ckpt("qwen2_moe"))
    plan = make_plan(olmoe, "cpu=1MiB", "tilepo_fine", None, 16)
    with pytest.raises(PlanError, match="made for another model: olmoe.*is qwen2_moe"):
        check_plan_matches(plan, qwen)


def test_a_plan_of_the_same_model_is_accepted(make_ckpt):
    ckpt = Checkpoint.open(make_ckpt("olmoe"))
    check_plan_matches(make_plan(ckpt, "cpu=1MiB", "tilepo_fine", None, 16), ckpt)
