"""`tilemem doctor` checks and a small `doctor --probe` run."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from tilemem.tmap.hardware import HardwareProfile
from tilemem.tools.doctor import Check, check_o_direct, format_checks, run_checks
from tilemem.tools.probe import MiB, ProbeConfig, _fit, probe


def _cli(argv):
    from tilemem.cli import tmap_commands

    parser = argparse.ArgumentParser(prog="tilemem")
    tmap_commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_checks_report_status_and_fix(tmp_path):
    checks = run_checks(tmp_path)
    names = {c.name for c in checks}
    assert {"python", "torch", "threads", "cpu kernels", "gpu", "dram", "disk space", "o_direct"} <= names
    assert all(c.status in ("PASS", "WARN", "FAIL") for c in checks)
    assert all(c.fix for c in checks if c.status == "FAIL")
    text = format_checks(checks + [Check("WARN", "demo", "something", "do this")])
    assert "WARN  demo" in text and "fix: do this" in text
    assert text.splitlines()[-1].startswith("doctor: ")


def test_cpu_kernels_check_says_which_native_path_runs(monkeypatch):
    """PASS names the native kernels (and AMX) when they load; a failed build is a WARN that names the fix."""
    from tilemem import kernels
    from tilemem.tools import doctor

    c = doctor.check_cpu_features()
    if not kernels.available():
        pytest.skip("native kernels unavailable here")
    assert c.status == "PASS" and "native kernels on" in c.detail
    assert ("AMX" in c.detail) == kernels.amx_enabled()
    monkeypatch.setattr(kernels, "available", lambda: False)
    c = doctor.check_cpu_features()
    assert c.status == "WARN" and "failed to build" in c.detail and "gcc" in c.fix


def test_o_direct_check_on_a_real_directory(tmp_path):
    c = check_o_direct(tmp_path)
    assert c.status in ("PASS", "WARN")
    assert not list(tmp_path.iterdir())  # its probe file is gone


def test_doctor_cli_exit_code(tmp_path, capsys):
    code = _cli(["doctor", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code in (0, 1)
    assert any(line.startswith("FAIL") for line in out.splitlines()) == (code == 1)
    assert "PASS" in out


def test_fit_recovers_overhead_and_bandwidth():
    a, b = _fit([(1000, 10e-6 + 1000e-9), (4000, 10e-6 + 4000e-9), (16000, 10e-6 + 16000e-9)])
    assert abs(a - 10e-6) < 1e-12 and abs(b - 1e-9) < 1e-15
    a, b = _fit([(1000, 3e-6), (2000, 2e-6)])  # noise: never a negative slope
    assert a == 0 and b == pytest.approx(5e-6 / 3000)  # the line through the origin: total time / total size


def test_fp8_kernel_figures_count_weights_and_scales():
    """The probe times FP8 tiles as the runtime holds them (`Fp8Tile`s), their bytes as the plan counts them."""
    from tilemem.placement.formats import tile_format
    from tilemem.placement.tiles import unit_bytes
    from tilemem.runtime.tile_format import Fp8Tile
    from tilemem.tools.probe import kernel_sweep, tile_blocks

    blocks, act = tile_blocks("fp8_e4m3", 2, 128, 192)
    assert all(isinstance(b, Fp8Tile) for b in blocks) and act == torch.bfloat16
    assert blocks[0].nbytes == unit_bytes(128, 192, tile_format("fp8_e4m3")) == 3 * 128 * 192 + 3 * 1 * 2 * 4
    (fig,) = kernel_sweep("cpu", ("fp8_e4m3",), (1,), 192, working_set=1 * MiB, rounds=1)
    assert (fig.dtype, fig.batch) == ("fp8_e4m3", 1) and fig.bandwidth_gbps > 0


def test_small_probe_writes_a_measured_profile(tmp_path):
    cfg = ProbeConfig(
        name="t", threads=1, disk_dir=str(tmp_path), hidden=128, dtypes=("float32",), batches=(1, 4),
        request_sizes=(4096, 65536), queue_depths=(1, 2), disk_file_bytes=8 * MiB, engine=False,
        seconds_per_point=0.05, dram_bytes=32 * MiB, kernel_working_set=4 * MiB,
    )  # fmt: skip
    lines = []
    hw = probe(cfg, log=lines.append)
    assert hw.measured and hw.dram_bandwidth_gbps > 0 and hw.disk_bandwidth_gbps > 0
    assert len(hw.kernels) == 2 and all(k.bandwidth_gbps > 0 for k in hw.kernels)
    assert {(d.request_bytes, d.queue_depth) for d in hw.disk} == {(4096, 1), (65536, 1), (4096, 2), (65536, 2)}
    assert all(("GB/s" in s) or (" us" in s) or (" ns" in s) for s in lines)  # every figure has units
    path = hw.save(tmp_path / "hw.json")
    assert HardwareProfile.load(path) == hw
    assert json.loads(path.read_text())["measured"] is True
    assert not list(tmp_path.glob(".tilemem-probe-*"))  # the probe file is removed


def test_probe_writes_nothing_into_the_current_directory(tmp_path, monkeypatch):
    """Without a directory the probe measures the system temp directory, in a scratch folder it removes."""
    import tempfile

    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    made = []
    import tilemem.tools.probe as probe_module

    real = probe_module._make_file
    monkeypatch.setattr(probe_module, "_make_file", lambda d, n: made.append(d) or real(d, n))
    cfg = ProbeConfig(
        name="t", threads=1, hidden=128, dtypes=("float32",), batches=(1,), request_sizes=(4096,),
        queue_depths=(1,), disk_file_bytes=4 * MiB, engine=False, seconds_per_point=0.02, dram_bytes=8 * MiB,
        kernel_working_set=1 * MiB, fetch_rows=(32,),
    )  # fmt: skip
    hw = probe(cfg, log=lambda s: None)
    assert hw.meta["disk_dir"] == str(tmp.resolve())
    assert made and made[0].parent == tmp  # its file lived in a scratch folder under the temp directory
    assert not list(cwd.iterdir()) and not list(tmp.iterdir())
