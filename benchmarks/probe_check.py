"""Check `tilemem doctor --probe` against independent tools, interleaved in one run.

Disk: the probe's sequential O_DIRECT reads (queue depth 1) vs `dd iflag=direct` with the same block
size on the same file, dd reading the bytes the probe reads. DRAM: the probe's reduction vs
`sysbench memory --memory-oper=read` (or `numpy.sum` where sysbench is missing), on one thread and on
every thread the probe uses. Each round measures the pair back to back, in
alternating order (probe first, then tool first), and the verdict uses the median of the per-round
ratios probe / tool: this virtual disk and memory drift by tens of percent within seconds, and a
ratio of two medians taken at different moments measures that drift, not the probe (the acceptance
bound: within 25%).

    .venv/bin/python benchmarks/probe_check.py [--rounds 7] [--seconds 2] [--file-gib 1]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from tilemem.tools import probe

SIZES = {"4K": 4 << 10, "64K": 64 << 10, "1M": 1 << 20, "4M": 4 << 20}
UNITS = {"kB": 1e3, "MB": 1e6, "GB": 1e9}


def tool_rate(cmd: list[str], pattern: str, scale) -> float:
    """Run an independent tool and read the rate it reports (stdout and stderr) with `pattern`."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    m = re.search(pattern, proc.stdout + proc.stderr)
    if m is None:
        raise RuntimeError(f"cannot parse the output of {cmd[0]}: {(proc.stdout + proc.stderr)[-500:]!r}")
    return scale(m)


def dd_rate(path: Path, bs: str, nbytes: int) -> float:
    """Bytes/s `dd iflag=direct` reports reading `nbytes` of `path` in `bs` blocks."""
    count = max(1, nbytes // SIZES[bs])
    cmd = ["dd", f"if={path}", "of=/dev/null", f"bs={bs}", f"count={count}", "iflag=direct"]
    return tool_rate(cmd, r"([\d.]+) ([kMG]B)/s", lambda m: float(m.group(1)) * UNITS[m.group(2)])


def sysbench_rate(threads: int, block: int = 256 << 20) -> float:
    """Bytes/s `sysbench memory` reads with `threads` threads over `block`-sized buffers."""
    cmd = ["sysbench", "memory", "--memory-oper=read", f"--memory-block-size={block}", "--memory-total-size=8G"]
    cmd += [f"--threads={threads}", "run"]
    return tool_rate(cmd, r"\(([\d.]+) MiB/sec\)", lambda m: float(m.group(1)) * 2**20)


def numpy_rate(x: np.ndarray, repeats: int = 5) -> float:
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best.append(x.nbytes / (time.perf_counter() - t0))
    return statistics.median(best)


def paired(probe_fn, tool_fn, rounds: int) -> tuple[float, float, list[float]]:
    """Median probe and tool rates, and the per-round ratios probe / tool; the order alternates."""
    p, t = [], []
    for r in range(rounds):
        if r % 2:
            t.append(tool_fn())
            p.append(probe_fn())
        else:
            p.append(probe_fn())
            t.append(tool_fn())
    return statistics.median(p), statistics.median(t), [a / b for a, b in zip(p, t, strict=True)]


def disk_pair(path: Path, bs: str, seconds: float, rounds: int) -> tuple[float, float, list[float]]:
    """`paired` for one block size; dd reads as many bytes as the probe's last round did."""
    last = [256 << 20]

    def probe_disk() -> float:
        bw = probe.disk_point(path, SIZES[bs], 1, seconds, sequential=True).bandwidth_gbps * 1e9
        last[0] = min(path.stat().st_size, int(bw * seconds))
        return bw

    return paired(probe_disk, lambda: dd_rate(path, bs, last[0]), rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--file-gib", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=2.0, help="per probe point")
    ap.add_argument("--dir", default=".")
    args = ap.parse_args()
    path = probe._make_file(Path(args.dir), int(args.file_gib * 2**30))
    rows = []
    try:
        for bs in SIZES:
            figures = disk_pair(path, bs, args.seconds, args.rounds)
            rows.append((f"disk {bs} sequential qd1", *figures, "dd iflag=direct"))
    finally:
        path.unlink()
    threads = torch.get_num_threads()
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        if shutil.which("sysbench"):
            tool, name = (lambda n=n: sysbench_rate(n)), "sysbench memory read"
        elif n == 1:
            x = np.ones(256 << 18, dtype=np.float32)  # 256 MiB
            tool, name = (lambda x=x: numpy_rate(x)), "numpy.sum"
        else:
            continue
        dram = paired(lambda: probe.dram_bandwidth(256 << 20), tool, args.rounds)
        rows.append((f"DRAM read, {n} thread{'s' if n > 1 else ''}", *dram, name))
    torch.set_num_threads(threads)
    print(f"{'figure':28s} {'probe GB/s':>11s} {'tool GB/s':>10s} {'probe/tool':>10s} {'per round':>30s}  tool")
    worst = 0.0
    for name, pv, tv, ratios, tool in rows:
        ratio = statistics.median(ratios)
        worst = max(worst, abs(ratio - 1))
        each = " ".join(f"{r:.2f}" for r in ratios)
        print(f"{name:28s} {pv / 1e9:11.3f} {tv / 1e9:10.3f} {ratio:10.2f} {each:>30s}  {tool}")
    print(f"largest disagreement {100 * worst:.0f}% (bound 25%): {'PASS' if worst <= 0.25 else 'FAIL'}")


if __name__ == "__main__":
    main()
