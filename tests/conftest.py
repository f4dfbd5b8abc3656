"""Shared fixtures: tiny synthetic checkpoints, written once per test session."""

from __future__ import annotations

import os

import pytest
import torch

from tilemem.synth.writer import synthesize

THREADS = int(os.environ.get("TILEMEM_TEST_THREADS", "1"))
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True, scope="module")
def test_threads():
    """Every module starts at the test thread count, whatever an `LLM(threads=...)` before it set: tiny
    tensors only pay fork/join and spin overhead for more threads (and the machine is shared)."""
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)


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
