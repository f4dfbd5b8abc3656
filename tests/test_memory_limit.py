"""The memory the process may use (`tilemem.memlimit`) on fake /proc and /sys trees, and `--budget auto`
planning within it."""

from __future__ import annotations

import argparse
import resource
from functools import partial
from pathlib import Path

import pytest

from tilemem import memlimit
from tilemem.errors import ConfigError
from tilemem.memlimit import EXPLICIT, MEM_AVAILABLE, RLIMIT_AS, RLIMIT_DATA, V1_LIMIT, V2_MAX, memory_limit

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture(autouse=True)
def no_rlimits(monkeypatch):
    """No rlimits and no faked RAM unless a test sets them: the machine running the tests must not leak in."""
    monkeypatch.delenv("TILEMEM_FAKE_RAM", raising=False)
    rlimits = {resource.RLIMIT_AS: resource.RLIM_INFINITY, resource.RLIMIT_DATA: resource.RLIM_INFINITY}
    monkeypatch.setattr(resource, "getrlimit", lambda which: (rlimits.get(which, resource.RLIM_INFINITY),) * 2)
    return rlimits


def fake_tree(root: Path, cgroup: str = "0::/\n", available: int = 20 * GiB, status: str = "", **files: str) -> Path:
    """A fake `/`: proc/self/cgroup, proc/meminfo (MemAvailable `available`), proc/self/status and `files`
    (relative path with `__` for `/` -> contents)."""
    (root / "proc/self").mkdir(parents=True, exist_ok=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    (root / "proc/meminfo").write_text(
        f"MemTotal:       {64 * GiB // 1024} kB\nMemAvailable:   {available // 1024} kB\n"
    )
    (root / "proc/self/status").write_text(
        status or "VmRSS:\t  102400 kB\nVmSize:\t 1048576 kB\nVmData:\t  524288 kB\n"
    )
    for name, text in files.items():
        path = root / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_cgroup_v2_limit_less_what_the_cgroup_holds(tmp_path):
    root = fake_tree(
        tmp_path,
        cgroup="0::/user.slice/app.service\n",
        **{
            "sys/fs/cgroup/user.slice/app.service/memory.max": f"{8 * GiB}\n",
            "sys/fs/cgroup/user.slice/app.service/memory.current": f"{2 * GiB}\n",
        },
    )
    limit = memory_limit(root=root)
    assert (limit.available, limit.source, limit.limit, limit.used) == (6 * GiB, V2_MAX, 8 * GiB, 2 * GiB)
    assert limit.describe() == "memory limit 6.00 GiB (cgroup v2 memory.max 8.00 GiB, 2.00 GiB in use)"
    assert limit.machine_available == 20 * GiB and limit.notes == ()


def test_cgroup_v2_nested_takes_the_smallest_up_the_tree(tmp_path):
    root = fake_tree(
        tmp_path,
        cgroup="0::/user.slice/app.service\n",
        **{
            "sys/fs/cgroup/user.slice/app.service/memory.max": f"{8 * GiB}\n",  # 7 GiB left here
            "sys/fs/cgroup/user.slice/app.service/memory.current": f"{1 * GiB}\n",
            "sys/fs/cgroup/user.slice/memory.max": f"{4 * GiB}\n",  # the parent: 1 GiB left for all its children
            "sys/fs/cgroup/user.slice/memory.current": f"{3 * GiB}\n",
        },
    )
    limit = memory_limit(root=root)
    assert (limit.available, limit.source, limit.limit, limit.used) == (1 * GiB, V2_MAX, 4 * GiB, 3 * GiB)
    chosen = next(b for b in limit.bounds if b.source == V2_MAX)
    assert chosen.where == str(root / "sys/fs/cgroup/user.slice/memory.max")


def test_cgroup_v2_max_is_no_limit(tmp_path):
    root = fake_tree(
        tmp_path,
        cgroup="0::/app\n",
        available=5 * GiB,
        **{
            "sys/fs/cgroup/app/memory.max": "max\n",
            "sys/fs/cgroup/app/memory.current": f"{2 * GiB}\n",
            "sys/fs/cgroup/memory.max": "max\n",
        },
    )
    limit = memory_limit(root=root)
    assert (limit.available, limit.source) == (5 * GiB, MEM_AVAILABLE)
    assert [b.source for b in limit.bounds] == [MEM_AVAILABLE]
    assert limit.describe().startswith("memory limit 5.00 GiB (the machine's MemAvailable")


def test_cgroup_v1_limit_less_usage(tmp_path):
    root = fake_tree(
        tmp_path,
        cgroup="9:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n",
        **{
            "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": f"{3 * GiB}\n",
            "sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes": f"{512 * MiB}\n",
            "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",  # the root: no limit
        },
    )
    limit = memory_limit(root=root)
    assert (limit.available, limit.source, limit.limit, limit.used) == (
        3 * GiB - 512 * MiB,
        V1_LIMIT,
        3 * GiB,
        512 * MiB,
    )
    assert limit.describe() == "memory limit 2.50 GiB (cgroup v1 memory.limit_in_bytes 3.00 GiB, 512.00 MiB in use)"


def test_inactive_page_cache_is_not_counted_as_in_use_v1_and_v2(tmp_path):
    # A cold start reads torch's libraries and the checkpoint into the cgroup's page cache; the kernel reclaims
    # its inactive part before it fails a charge, so it is not memory the process holds (the kubelet's
    # "working set"). Active file pages still count; a stat line that is not a number is ignored with a note.
    v1 = fake_tree(
        tmp_path / "v1",
        cgroup="4:memory:/app\n",
        **{
            "sys/fs/cgroup/memory/app/memory.limit_in_bytes": f"{4 * GiB}\n",
            "sys/fs/cgroup/memory/app/memory.usage_in_bytes": f"{3 * GiB}\n",
            "sys/fs/cgroup/memory/app/memory.stat": f"cache {2 * GiB}\ninactive_file 1\n"
            f"total_inactive_file {1536 * MiB}\ntotal_active_file {512 * MiB}\n",
        },
    )
    limit = memory_limit(root=v1)
    assert (limit.available, limit.used, limit.reclaimable) == (2560 * MiB, 1536 * MiB, 1536 * MiB)
    assert limit.describe() == (
        "memory limit 2.50 GiB (cgroup v1 memory.limit_in_bytes 4.00 GiB, 1.50 GiB in use not counting "
        "1.50 GiB of inactive page cache)"
    )
    v2 = fake_tree(
        tmp_path / "v2",
        cgroup="0::/app\n",
        **{
            "sys/fs/cgroup/app/memory.max": f"{4 * GiB}\n",
            "sys/fs/cgroup/app/memory.current": f"{1 * GiB}\n",
            "sys/fs/cgroup/app/memory.stat": f"anon {256 * MiB}\nfile {768 * MiB}\ninactive_file {5 * GiB}\n",
        },
    )
    limit = memory_limit(root=v2)  # never more reclaimable than the usage itself
    assert (limit.available, limit.used, limit.reclaimable) == (4 * GiB, 0, 1 * GiB)
    (v2 / "sys/fs/cgroup/app/memory.stat").write_text("inactive_file lots\n")
    limit = memory_limit(root=v2)
    assert (limit.available, limit.used, limit.reclaimable) == (3 * GiB, 1 * GiB, 0)
    assert any("inactive_file" in n and "not a number" in n for n in limit.notes), limit.notes


def test_cgroup_v1_in_a_container_reads_the_mount_root(tmp_path):
    # A cgroup namespace shows the host's path in /proc/self/cgroup, the container's own cgroup at the mount.
    root = fake_tree(
        tmp_path,
        cgroup="4:memory,hugetlb:/kubepods/pod1/c2\n",
        **{
            "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{2 * GiB}\n",
            "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{1 * GiB}\n",
        },
    )
    limit = memory_limit(root=root)
    assert (limit.available, limit.source) == (1 * GiB, V1_LIMIT)


def test_cgroup_v1_unlimited_value_is_no_limit(tmp_path):
    root = fake_tree(
        tmp_path,
        cgroup="4:memory:/process_api/c0\n",
        available=7 * GiB,
        **{
            "sys/fs/cgroup/memory/process_api/c0/memory.limit_in_bytes": "9223372036854771712\n",
            "sys/fs/cgroup/memory/process_api/c0/memory.usage_in_bytes": f"{7 * GiB}\n",
        },
    )
    limit = memory_limit(root=root)
    assert (limit.available, limit.source) == (7 * GiB, MEM_AVAILABLE)


def test_rlimit_as_smaller_than_the_rest_counts_the_address_space_in_use(tmp_path, no_rlimits):
    no_rlimits[resource.RLIMIT_AS] = 6 * GiB
    no_rlimits[resource.RLIMIT_DATA] = 16 * GiB
    status = "VmRSS:\t  102400 kB\nVmSize:\t 5242880 kB\nVmData:\t 1048576 kB\n"  # 5 GiB mapped, 1 GiB data
    root = fake_tree(
        tmp_path,
        cgroup="0::/app\n",
        status=status,
        **{"sys/fs/cgroup/app/memory.max": f"{8 * GiB}", "sys/fs/cgroup/app/memory.current": f"{1 * GiB}"},
    )
    limit = memory_limit(root=root)
    assert (limit.available, limit.source, limit.limit, limit.used) == (1 * GiB, RLIMIT_AS, 6 * GiB, 5 * GiB)
    data = next(b for b in limit.bounds if b.source == RLIMIT_DATA)
    assert data.available == 15 * GiB
    assert limit.describe() == "memory limit 1.00 GiB (RLIMIT_AS 6.00 GiB, 5.00 GiB in use)"


def test_rlimit_data_counts_the_data_segment(tmp_path, no_rlimits):
    no_rlimits[resource.RLIMIT_DATA] = 3 * GiB
    root = fake_tree(tmp_path, status="VmSize:\t 9437184 kB\nVmData:\t 1048576 kB\n")  # 9 GiB mapped, 1 GiB data
    limit = memory_limit(root=root)
    assert (limit.available, limit.source, limit.used) == (2 * GiB, RLIMIT_DATA, 1 * GiB)


def test_mem_available_only(tmp_path, monkeypatch):
    root = fake_tree(tmp_path, cgroup="", available=3 * GiB)
    (root / "proc/self/cgroup").unlink()  # no cgroups at all (another OS, a bare chroot)
    limit = memory_limit(root=root)
    assert (limit.available, limit.source, limit.used) == (3 * GiB, MEM_AVAILABLE, 0)
    assert limit.notes == ()  # a missing file is no surprise; only malformed ones are noted
    monkeypatch.setenv("TILEMEM_FAKE_RAM", "2GiB")  # a smaller machine, faked, still wins over /proc/meminfo
    assert memory_limit(root=root).available == 2 * GiB


def test_explicit_limit_overrides_every_measured_one(tmp_path):
    root = fake_tree(
        tmp_path,
        cgroup="0::/app\n",
        **{"sys/fs/cgroup/app/memory.max": f"{1 * GiB}", "sys/fs/cgroup/app/memory.current": "0"},
    )
    limit = memory_limit("6GiB", root=root)
    # the whole process's cap: what it already holds (VmRSS 100 MiB) counts against it
    assert (limit.available, limit.source, limit.limit, limit.used) == (
        6 * GiB - 100 * MiB,
        EXPLICIT,
        6 * GiB,
        100 * MiB,
    )
    assert not limit.above_machine
    assert limit.describe() == "memory limit 5.90 GiB (--memory-limit 6.00 GiB, 100.00 MiB in use)"
    assert memory_limit(4 * GiB, root=root).limit == 4 * GiB  # bytes as a number too


def test_explicit_limit_above_the_machine_is_used_and_says_so(tmp_path):
    root = fake_tree(tmp_path, available=4 * GiB)
    limit = memory_limit("16GiB", root=root)
    assert limit.source == EXPLICIT and limit.available == 16 * GiB - 100 * MiB
    assert limit.above_machine
    assert limit.describe().endswith("; above the machine's 4.00 GiB available)")


def test_an_unreadable_explicit_limit_is_refused():
    with pytest.raises(ConfigError, match="--memory-limit: cannot read 'lots'"):
        memory_limit("lots")


def test_malformed_files_are_ignored_with_a_reason(tmp_path, monkeypatch):
    root = fake_tree(
        tmp_path,
        cgroup="garbage line\n0::/a/b\n",
        status="VmRSS:\t lots\n",
        **{
            "sys/fs/cgroup/a/b/memory.max": "eight gigabytes\n",  # not a number: this level is ignored
            "sys/fs/cgroup/a/memory.max": f"{4 * GiB}\n",
            "sys/fs/cgroup/a/memory.current": "n/a\n",  # usage unreadable: counted as 0, and said
        },
    )
    (root / "proc/meminfo").write_text("MemTotal: 1 kB\n")  # no MemAvailable: falls back to sysinfo
    monkeypatch.setattr(memlimit.sysinfo, "memory", lambda: memlimit.sysinfo.MemoryInfo(9 * GiB, 9 * GiB))
    limit = memory_limit(root=root)
    assert (limit.available, limit.source, limit.machine_available) == (4 * GiB, V2_MAX, 9 * GiB)
    notes = "\n".join(limit.notes)
    assert "'garbage line' is not ID:CONTROLLERS:PATH" in notes
    assert f"{root / 'sys/fs/cgroup/a/b/memory.max'}: 'eight gigabytes' is neither a number nor 'max'" in notes
    assert f"{root / 'sys/fs/cgroup/a/memory.current'}: 'n/a' is not a number; counting 0 in use" in notes
    assert "has no MemAvailable line" in notes
    explicit = memory_limit("6GiB", root=root)  # VmRSS unreadable: 0 in use, and said
    assert explicit.used == 0 and any("VmRSS" in n for n in explicit.notes)


def test_this_machine_measures_without_error():
    limit = memory_limit()
    assert limit.available > 0 and limit.source in memlimit.SOURCES and limit.describe().startswith("memory limit ")


# -- --memory-limit on the engine, and --budget auto within it --------------------------------------
def test_memory_limit_flag_is_generated_and_checked():
    from tilemem.cli.engine_flags import add_engine_args, engine_args_from_namespace
    from tilemem.engine.args import EngineArgs

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    add_engine_args(parser)
    args = engine_args_from_namespace(parser.parse_args(["ckpt", "--budget", "auto", "--memory-limit", "6GiB"]))
    assert args.memory_limit == "6GiB"
    for bad in ("lots", "0", -1, True):
        with pytest.raises(ConfigError, match=r"memory_limit \(--memory-limit\) must be a positive byte size"):
            EngineArgs("ckpt", memory_limit=bad)


def test_budget_auto_with_memory_limit_plans_within_it(tmp_path, make_ckpt, monkeypatch, capsys):
    from tilemem.engine.args import EngineArgs
    from tilemem.engine.build import resolve_plan
    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.models.topology import Topology
    from tilemem.tmap.auto import SAFETY_MARGIN, kv_reserve, staging_reserve

    path = make_ckpt("olmoe")
    ckpt = Checkpoint.open(path)
    topo = Topology.from_config(ckpt.config, "fp32")
    experts = topo.total_bytes - topo.non_expert_bytes
    rss = 100 * MiB  # the fake tree's VmRSS, so the test does not depend on this process's size
    want = int((topo.non_expert_bytes + experts // 2) / (1 - SAFETY_MARGIN)) + kv_reserve(topo, 4096, 1)
    want += staging_reserve(topo, 128)
    cap = want + rss
    # the machine looks huge, unlimited and without a GPU: only --memory-limit can make the plan leave experts out
    monkeypatch.setattr(memlimit.sysinfo, "gpu", lambda: None)
    monkeypatch.setattr(memlimit, "memory_limit", partial(memory_limit, root=fake_tree(tmp_path, available=64 * GiB)))
    plan = resolve_plan(EngineArgs(path, budget="auto", memory_limit=str(cap)), ckpt)
    cpu = plan.usage("cpu")
    assert cpu.capacity is not None and cpu.used <= cpu.capacity <= (cap - rss) * (1 - SAFETY_MARGIN)
    assert topo.non_expert_bytes < cpu.used < topo.total_bytes  # within the limit: some experts on disk
    assert plan.tiles_in("disk")
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("--budget auto:"))
    assert line.startswith("--budget auto: memory limit ") and "(--memory-limit " in line
    assert "non-expert weights + " in line and "expert weights (" in line
    # without the flag the same machine fits the whole model
    plan = resolve_plan(EngineArgs(path, budget="auto"), ckpt)
    assert plan.usage("cpu").capacity == topo.total_bytes and not plan.tiles_in("disk")


def test_plan_command_budget_auto_plans_for_the_memory_limit_given(tmp_path, make_ckpt, monkeypatch, capsys):
    """`tilemem plan --budget auto --memory-limit` plans for another machine's limit (here: half the model's
    experts), keeping room for `--max-batch` caches of `--max-model-len` tokens; a bad count is refused."""
    from tilemem.artifacts.mir import load_plan
    from tilemem.cli.main import main
    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.models.topology import Topology
    from tilemem.tmap.auto import SAFETY_MARGIN, kv_reserve, staging_reserve

    path = make_ckpt("olmoe")
    topo = Topology.from_config(Checkpoint.open(path).config)
    monkeypatch.setattr(memlimit.sysinfo, "gpu", lambda: None)
    monkeypatch.setattr(memlimit, "memory_limit", partial(memory_limit, root=fake_tree(tmp_path, available=64 * GiB)))
    experts = topo.total_bytes - topo.non_expert_bytes
    kv = kv_reserve(topo, 256, 2)
    cap = int((topo.non_expert_bytes + experts // 2) / (1 - SAFETY_MARGIN)) + kv + staging_reserve(topo, 128)
    cap += 100 * MiB  # the fake tree's VmRSS
    flags = ["--budget", "auto", "--memory-limit", str(cap), "--max-model-len", "256", "--max-batch", "2"]
    assert main(["plan", str(path), *flags, "--no-heatmap", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "(--memory-limit " in out and "KV cache (256 tokens x 2)" in out, out
    cpu = load_plan(tmp_path / "p").usage("cpu")
    assert topo.non_expert_bytes < cpu.capacity <= (cap - 100 * MiB - kv) * (1 - SAFETY_MARGIN) < topo.total_bytes
    assert main(["plan", str(path), *flags[:-1], "0", "--out", str(tmp_path / "q")]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err


def test_budget_auto_without_a_profile_learns_hot_experts_in_a_cache(make_ckpt, capsys):
    """With the uniform prior `auto` cannot tell hot experts from cold ones: LEARNING_CACHE_SHARE of the DRAM
    left for routed experts becomes an LFU tile cache (one line says so); a measured profile places experts
    up front instead, and a budget that holds the whole model needs no cache."""
    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.models.topology import Topology
    from tilemem.placement.budgets import Budgets
    from tilemem.placement.profile import Profile
    from tilemem.tmap.auto import LEARNING_CACHE_SHARE, learning_cache, with_learning_cache

    topo = Topology.from_config(Checkpoint.open(make_ckpt("olmoe")).config)
    half = topo.non_expert_bytes + (topo.total_bytes - topo.non_expert_bytes) // 2
    budgets = Budgets.parse(f"cpu={half}B")
    uniform = Profile.uniform(topo)
    text = learning_cache(topo, budgets, uniform)
    assert text == f"cpu={int((half - topo.non_expert_bytes - topo.shared_and_dense_bytes) * LEARNING_CACHE_SHARE)}B"
    cached = with_learning_cache(topo, budgets, uniform)
    assert cached.cache_bytes("cpu") == int(text[4:-1]) and "learns the hot ones" in capsys.readouterr().out
    assert learning_cache(topo, budgets, Profile.synthetic(topo, skew=1.0)) is None
    assert learning_cache(topo, Budgets.parse(f"cpu={topo.total_bytes}B"), uniform) is None
    assert learning_cache(topo, Budgets.parse("cpu=1B"), uniform) is None  # nothing left past the non-experts
