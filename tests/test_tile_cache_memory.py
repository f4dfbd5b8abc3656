"""The DRAM tile cache is sized from what the model can use, not from the budget alone, and a cache
the machine cannot give is a clear error, not an ENOMEM traceback."""

from __future__ import annotations

import errno

import pytest

from tilemem.cli.main import main
from tilemem.engine.llm import LLM
from tilemem.errors import BudgetError
from tilemem.runtime import tiered


def test_a_budget_far_above_the_model_allocates_no_more_cache_than_its_tiles(make_ckpt):
    llm = LLM(make_ckpt("olmoe"), dtype="fp32", budget="cpu=2GiB", tile=16)
    try:
        ex = llm.tiered
        slot = max(t.padded for t in ex.store.tiles.values())
        assert ex.cache.slab.slot_bytes == slot
        assert ex.cache.slab.slots == len(ex.store.tiles) + ex.config.io_depth  # was 2 GiB / slot
        assert ex.cache.slab.nbytes < 2 << 20
    finally:
        llm.close()


def test_a_cache_the_machine_cannot_allocate_is_one_clear_error(make_ckpt, monkeypatch, capsys):
    def no_memory(slots, slot_bytes):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(tiered, "AlignedSlab", no_memory)
    argv = ["generate", str(make_ckpt("olmoe")), "--dtype", "fp32", "--budget", "cpu=2GiB", "--tile-size", "16"]
    assert main([*argv, "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot allocate the DRAM tile cache") and "Cannot allocate memory" in err
    assert "lower the cpu budget" in err and "available" in err and len(err.strip().splitlines()) == 1


def test_a_plan_that_keeps_more_in_dram_than_the_machine_has_is_refused(make_ckpt, monkeypatch):
    monkeypatch.setenv("TILEMEM_FAKE_RAM", "64KiB")  # a machine smaller than the tiny model
    with pytest.raises(BudgetError, match="the plan keeps .* in DRAM .* more than this machine's 64.00 KiB"):
        LLM(make_ckpt("olmoe"), dtype="fp32", budget="cpu=2GiB", tile=16)
