"""Check `tilemem doctor --probe` against independent tools, interleaved in one run.

Disk: the probe's sequential O_DIRECT reads (queue depth 1) vs `dd iflag=direct` with the same block
size on the same file, alternating probe / dd / probe / ... per size, dd reading the bytes the probe
just read, so the disk's drifting speed hits both alike. DRAM: the probe's reduction vs `numpy.sum`
over the same size, both single-threaded, alternating. Prints medians and the ratio probe / tool (the
acceptance bound: within 25%).

    .venv/bin/python benchmarks/probe_check.py [--rounds 3] [--file-gib 1]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from tilemem.tmap import probe

SIZES = {"4K": 4 << 10, "64K": 64 << 10, "1M": 1 << 20, "4M": 4 << 20}
UNITS = {"kB": 1e3, "MB": 1e6, "GB": 1e9}


def dd_rate(path: Path, bs: str, nbytes: int) -> float:
    """Bytes/s `dd iflag=direct` reports reading `nbytes` of `path` in `bs` blocks."""
    count = max(1, nbytes // SIZES[bs])
    out = subprocess.run(
        ["dd", f"if={path}", "of=/dev/null", f"bs={bs}", f"count={count}", "iflag=direct"],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    m = re.search(r"([\d.]+) ([kMG]B)/s", out)
    if m is None:
        raise RuntimeError(f"cannot parse dd output: {out!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def numpy_rate(x: np.ndarray, repeats: int = 5) -> float:
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best.append(x.nbytes / (time.perf_counter() - t0))
    return statistics.median(best)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--file-gib", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=1.0, help="per probe point")
    ap.add_argument("--dir", default=".")
    args = ap.parse_args()
    path = probe._make_file(Path(args.dir), int(args.file_gib * 2**30))
    rows = []
    try:
        for bs, size in SIZES.items():
            d, p = [], []
            for _ in range(args.rounds):
                fig = probe.disk_point(path, size, 1, args.seconds, sequential=True)
                # dd reads the same bytes from the same place (capped by the file)
                nbytes = min(path.stat().st_size, int(fig.bandwidth_gbps * 1e9 * args.seconds))
                p.append(fig.bandwidth_gbps * 1e9)
                d.append(dd_rate(path, bs, nbytes))
            rows.append((f"disk {bs} sequential qd1", statistics.median(p), statistics.median(d), "dd iflag=direct"))
    finally:
        path.unlink()
    torch.set_num_threads(1)
    x = np.ones(256 << 18, dtype=np.float32)  # 256 MiB
    d, p = [], []
    for _ in range(args.rounds):
        d.append(numpy_rate(x))
        p.append(probe.dram_bandwidth(256 << 20))
    rows.append(("DRAM read, 1 thread", statistics.median(p), statistics.median(d), "numpy.sum"))
    print(f"{'figure':28s} {'probe GB/s':>11s} {'tool GB/s':>10s} {'probe/tool':>10s}  tool")
    worst = 0.0
    for name, pv, tv, tool in rows:
        worst = max(worst, abs(pv / tv - 1))
        print(f"{name:28s} {pv / 1e9:11.3f} {tv / 1e9:10.3f} {pv / tv:10.2f}  {tool}")
    print(f"largest disagreement {100 * worst:.0f}% (bound 25%): {'PASS' if worst <= 0.25 else 'FAIL'}")


if __name__ == "__main__":
    main()
