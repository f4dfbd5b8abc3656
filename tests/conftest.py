"""Shared fixtures: tiny synthetic checkpoints, written once per test session. With
`TILEMEM_EMULATE_AVX512=1` (`make test-kernels-emulated`), the native kernels' tests run on a CPU without
AVX512 too: the kernels are built on SIMDe's emulation of it (`emulated_avx512/immintrin.h`)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tilemem.errors import KernelError
from tilemem.kernels import library
from tilemem.synth.writer import synthesize

THREADS = int(os.environ.get("TILEMEM_TEST_THREADS", "1"))
torch.set_num_threads(THREADS)
EMULATED_AVX512 = Path(__file__).with_name("emulated_avx512")


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("TILEMEM_EMULATE_AVX512", "0") == "1" and not library.cpu_supported():
        config.emulated_avx512 = pytest.MonkeyPatch()
        emulate_avx512(config.emulated_avx512)


def pytest_unconfigure(config: pytest.Config) -> None:
    if (patch := getattr(config, "emulated_avx512", None)) is not None:
        patch.undo()


def emulate_avx512(patch: pytest.MonkeyPatch) -> None:
    """Build the kernels for this session on SIMDe's AVX512 (tests only: slow, and never for a real run)
    and treat the CPU as supported, without AMX. The flags name the shim and its hash, so the emulated
    library is cached apart from the native one and rebuilt when the shim changes."""
    from tilemem import kernels

    if (cc := library._compiler()) is None:
        pytest.exit("TILEMEM_EMULATE_AVX512=1 needs a C compiler: apt-get install gcc (or set CC)", returncode=2)
    cmd = [cc, "-E", "-x", "c", "-", "-o", os.devnull]
    probe = subprocess.run(cmd, input="#include <simde/x86/avx512.h>\n", capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.exit(
            "TILEMEM_EMULATE_AVX512=1 needs SIMDe's headers (simde/x86/avx512.h): apt-get install libsimde-dev"
            f"\n{probe.stderr}",
            returncode=2,
        )
    shim = hashlib.sha256((EMULATED_AVX512 / "immintrin.h").read_bytes()).hexdigest()[:16]
    flags = [f for f in library.FLAGS if not f.startswith("-mavx512")]
    flags += ["-mavx2", f"-I{EMULATED_AVX512}", f"-DTM_EMULATED_AVX512=0x{shim}", "-Wno-psabi"]
    patch.setattr(library, "FLAGS", flags)
    for module in (library, kernels):
        patch.setattr(module, "cpu_supported", lambda: True)
        patch.setattr(module, "amx_supported", lambda: False)
    library.lib.cache_clear()
    try:
        library.load()  # built here, once (xdist's workers then find it cached), so a failure stops the run
    except (RuntimeError, OSError, KernelError) as exc:
        pytest.exit(f"TILEMEM_EMULATE_AVX512=1: the emulated kernels did not build or load: {exc}", returncode=2)
    assert kernels.available()


@pytest.fixture(autouse=True, scope="module")
def test_threads():
    """Every module starts at the test thread count, whatever an `LLM(threads=...)` before it set: tiny
    tensors only pay fork/join and spin overhead for more threads (and the machine is shared)."""
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def ggml_exact():
    """The native ggml kernels' exact path (fp32 activations, as the torch dequantization computes) for a test
    module: `pytestmark = pytest.mark.usefixtures("ggml_exact")`."""
    from tilemem.layers import ggml

    before = ggml.FAST
    ggml.FAST = False
    yield
    ggml.FAST = before


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """A kernel test run on 1 and on 2 threads (the thread count its native call is given)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


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
