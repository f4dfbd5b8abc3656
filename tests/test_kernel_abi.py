"""The kernels' library interface: one ABI version (csrc/tilemem.h) and the ctypes mirrors' sizes checked
at load, a mismatch refused with a clear error (and the kernels left off), the build keyed by every source
and header, and a kernel that cannot allocate raising MemoryError instead of crashing.

The ABI checks build `abi.c` alone (a second's compile, no AVX512 needed to load it); the allocation
tests need the kernels to run here."""

from __future__ import annotations

import ctypes
import logging
import shutil
import subprocess

import pytest
import torch

from tilemem import kernels
from tilemem.errors import KernelABIError, KernelMemoryError
from tilemem.kernels import library
from tilemem.kernels.structs import STRUCTS, X12

CC = library._compiler()
needs_cc = pytest.mark.skipif(CC is None, reason="needs a C compiler")
needs_kernels = pytest.mark.skipif(not kernels.available(), reason="needs AVX512-BF16 and a C compiler")


@pytest.fixture(scope="module")
def abi_lib(tmp_path_factory) -> str:
    """A library of the ABI functions alone, compiled from csrc/abi.c with the library's flags."""
    out = tmp_path_factory.mktemp("abi") / "abi.so"
    cmd = [CC, "-O1", "-fPIC", "-shared", "-fvisibility=hidden", str(library.CSRC / "abi.c"), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    return str(out)


def _loaded(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    library.declare_abi(lib)
    return lib


@needs_cc
def test_the_library_reports_the_header_version_and_the_mirrors_sizes(abi_lib):
    lib = _loaded(abi_lib)
    assert lib.tm_abi_version() == library.header_constant("TM_ABI_VERSION")
    for struct in STRUCTS:
        assert lib.tm_struct_size(struct.c_name.encode()) == ctypes.sizeof(struct), struct.c_name
    assert lib.tm_struct_size(b"tm_nothing") == -1
    library.check_abi(lib)  # no error


@needs_cc
def test_load_refuses_another_abi_version(abi_lib, monkeypatch):
    real = library.header_constant("TM_ABI_VERSION")
    monkeypatch.setattr(library, "header_constant", lambda name: real + 1)
    with pytest.raises(KernelABIError, match=f"interface version {real}, but tilemem expects {real + 1}"):
        library.load(abi_lib)


@needs_cc
def test_load_refuses_a_ctypes_mirror_of_another_size(abi_lib, monkeypatch):
    class Drifted(ctypes.Structure):  # tm_x12 with a field the C struct lacks
        c_name = "tm_x12"
        _fields_ = [*X12._fields_, ("extra", ctypes.c_int64)]

    monkeypatch.setattr(library, "STRUCTS", (Drifted, *STRUCTS[1:]))
    want = ctypes.sizeof(X12)
    with pytest.raises(KernelABIError, match=rf"struct tm_x12 is {want} bytes in .* but {want + 8} in .*Drifted"):
        library.load(abi_lib)


@needs_cc
def test_a_mismatched_library_leaves_the_kernels_off_with_a_warning(abi_lib, monkeypatch, caplog):
    real = library.header_constant("TM_ABI_VERSION")
    monkeypatch.setattr(library, "cpu_supported", lambda: True)
    monkeypatch.setenv("TILEMEM_KERNELS", "1")
    monkeypatch.setattr(library, "build", lambda: abi_lib)
    monkeypatch.setattr(library, "header_constant", lambda name: real + 1)
    with caplog.at_level(logging.WARNING, logger=library.__name__):
        assert library.lib.__wrapped__() is None  # the uncached loader: torch keeps running
    assert "native kernels unavailable, using torch" in caplog.text and "interface version" in caplog.text


def test_the_version_lives_in_the_header_alone():
    text = (library.CSRC / "tilemem.h").read_text()
    assert f"#define TM_ABI_VERSION {library.header_constant('TM_ABI_VERSION')}" in text
    assert not hasattr(kernels, "ABI_VERSION") and not hasattr(library, "ABI_VERSION")


def test_the_build_is_keyed_by_every_source_and_header(tmp_path, monkeypatch):
    csrc = tmp_path / "csrc"
    shutil.copytree(library.CSRC, csrc)
    monkeypatch.setattr(library, "CSRC", csrc)
    monkeypatch.setenv("TILEMEM_CACHE", str(tmp_path / "cache"))
    first = library.library_path("gcc")
    assert library.library_path("gcc") == first
    for name in ("internal.h", "simd.h", "gemm.c"):
        path = csrc / name
        original = path.read_text()
        path.write_text(original + "\n")
        assert library.library_path("gcc") != first, name
        path.write_text(original)
    assert library.library_path("gcc") == first
    (csrc / "extra.c").write_text("")  # a new file is a new library
    assert library.library_path("gcc") != first


def test_a_failed_allocation_raises_a_memory_error_naming_the_kernel():
    enomem = library.header_constant("TM_ENOMEM")
    with pytest.raises(KernelMemoryError, match="moe experts: the native kernel could not allocate") as info:
        library.check(enomem, "moe experts")
    assert isinstance(info.value, MemoryError)
    library.check(library.header_constant("TM_OK"), "moe experts")  # no error


@needs_kernels
def test_prefill_attention_too_large_to_allocate_fails_cleanly():
    """A prefill whose packed keys cannot be allocated (2^40 tokens: 128 TiB) returns TM_ENOMEM before it
    reads anything; the wrapper's check turns that into KernelMemoryError (no segfault)."""
    t, hd = 1 << 40, 64
    q = torch.zeros(hd, dtype=torch.bfloat16)  # never read: the call fails first
    status = library.lib().tm_attn_prefill_bf16(
        q.data_ptr(), 0, 0, 0, q.data_ptr(), q.data_ptr(), 0, 0, 0, q.data_ptr(), 1, 1, 1, t, hd, 1.0, 1
    )
    assert status == library.header_constant("TM_ENOMEM")
    with pytest.raises(KernelMemoryError):
        library.check(status, "prefill attention")


@needs_kernels
def test_moe_too_large_to_plan_fails_cleanly():
    """A MoE call whose token/expert plan cannot be allocated (2^46 pairs: 256 TiB of token indices) returns
    TM_ENOMEM before it reads the routing."""
    t, k, e, d, i = 1 << 45, 2, 8, 64, 32
    z = torch.zeros(64, dtype=torch.int64)  # never read: the call fails first
    p = z.data_ptr()
    status = library.lib().tm_moe_bf16(p, p, t, d, i, p, p, k, e, p, p, p, None, None, None, 0, 1, p, p)
    assert status == library.header_constant("TM_ENOMEM")
