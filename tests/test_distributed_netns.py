"""Two ranks that talk over a real network interface: each in its own network namespace, joined by a veth pair.

Root only (network namespaces); skipped with the reason otherwise. Rank 0 runs `tilemem generate`, rank 1
`tilemem follow`, each with `GLOO_SOCKET_IFNAME` naming its end of the pair and its own tile store (as two machines
would have); rank 0's output equals the single-process run, and bytes went through the veth pair.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

PORT = "29611"


def sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture
def netns_pair():
    """(namespace 0, namespace 1, address 0, interface 0, interface 1): two namespaces joined by a veth pair."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("the `ip` tool (iproute2) is not installed")
    tag = str(os.getpid() % 10000)
    ns, dev = [f"tm{tag}n{i}" for i in (0, 1)], [f"tm{tag}v{i}" for i in (0, 1)]
    addr = [f"10.78.{int(tag) % 250}.{i + 1}" for i in (0, 1)]
    made = sh("ip", "netns", "add", ns[0])
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    try:
        steps = [
            ("ip", "netns", "add", ns[1]),
            ("ip", "link", "add", dev[0], "type", "veth", "peer", "name", dev[1]),
            *(("ip", "link", "set", dev[i], "netns", ns[i]) for i in (0, 1)),
            *(("ip", "-n", ns[i], "addr", "add", f"{addr[i]}/24", "dev", dev[i]) for i in (0, 1)),
            *(("ip", "-n", ns[i], "link", "set", d, "up") for i in (0, 1) for d in (dev[i], "lo")),
        ]
        for step in steps:
            done = sh(*step)
            if done.returncode != 0:
                pytest.skip(f"cannot set up the veth pair ({' '.join(step)}): {done.stderr.strip()}")
        yield ns[0], ns[1], addr[0], dev[0], dev[1]
    finally:
        for n in ns:
            sh("ip", "netns", "del", n)  # deletes the veth pair with it


def tx_bytes(ns: str, dev: str) -> int:
    out = sh("ip", "netns", "exec", ns, "cat", f"/sys/class/net/{dev}/statistics/tx_bytes")
    return int(out.stdout.strip() or 0)


def test_two_ranks_over_a_veth_pair(netns_pair, make_ckpt, tmp_path):
    ns0, ns1, addr0, dev0, dev1 = netns_pair
    path = str(make_ckpt("qwen2_moe", "fp32"))
    common = ["--dtype", "fp32", "--threads", "1"]
    gen = ["--prompt", "hello", "--max-tokens", "6", "--temperature", "0"]
    cli = [sys.executable, "-m", "tilemem.cli.main"]
    one = subprocess.run([*cli, "generate", path, *common, *gen], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    flags = [*common, "--budget", "cpu=2GiB", "--world-size", "2", "--master-addr", addr0, "--master-port", PORT]

    def rank(ns: str, dev: str, *args: str) -> subprocess.Popen:
        env = {**os.environ, "GLOO_SOCKET_IFNAME": dev}
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, *cli, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    before = tx_bytes(ns1, dev1)
    r1 = rank(ns1, dev1, "follow", path, *flags, "--rank", "1", "--store", str(tmp_path / "store1"))
    r0 = rank(ns0, dev0, "generate", path, *flags, *gen, "--rank", "0", "--store", str(tmp_path / "store0"))
    try:
        out0, err0 = r0.communicate(timeout=180)
        out1, err1 = r1.communicate(timeout=60)
    finally:
        for p in (r0, r1):
            if p.poll() is None:
                p.kill()
    assert r0.returncode == 0, err0
    assert r1.returncode == 0, err1
    assert out0 == one.stdout
    assert tx_bytes(ns1, dev1) - before > 10_000  # rank 1's shares and messages crossed the veth pair
