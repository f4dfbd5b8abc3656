"""Shared fixtures: tiny synthetic checkpoints, written once per test session."""

from __future__ import annotations

import os

import pytest
import torch

from tilemem.synth.writer import synthesize

torch.set_num_threads(int(os.environ.get("TILEMEM_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """make_ckpt(family, dtype="fp32", preset="tiny", **kw) -> path, cached per argument set."""
    cache: dict[tuple, object] = {}

    def make(family: str, dtype: str = "fp32", preset: str = "tiny", **kw):
        key = (family, dtype, preset, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{family}-{preset}-{dtype}") / "ckpt"
            cache[key] = synthesize(family, preset, out, dtype=dtype, progress=False, **kw)
        return cache[key]

    return make
