"""Expert parallelism: N ranks on localhost over gloo give what one process gives.

Each test starts its ranks for real (rank 0 here, `LLM(world_size=N)` starting the others as processes, or every
rank as a `tilemem` command), so the all-reduces, the step messages and the faults go through torch.distributed.
The reference is the single-process engine on the same fp32 checkpoint: greedy tokens identical, log-probabilities
(every vocabulary entry) within fp32 tolerance.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tilemem.engine.llm import LLM
from tilemem.engine.ranks import free_port
from tilemem.engine.sampling import SamplingParams
from tilemem.errors import ConfigError, RankError
from tilemem.loader.checkpoint import Checkpoint
from tilemem.models.registry import families
from tilemem.models.topology import Topology
from tilemem.parallel.group import RankSetup
from tilemem.placement.profile import LayerProfile, ModelSignature, Profile
from tilemem.synth.writer import synthesize

FAMILIES = sorted(families())
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [11, 12, 13, 14, 15]]
TOL = 1e-4


def greedy(max_tokens: int = 8, vocab: int = 0) -> SamplingParams:
    """Greedy decoding with every token's log-probability (`vocab` alternatives) recorded."""
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=vocab or None)


def assert_same(ref, got) -> None:
    """Same greedy tokens; every recorded log-probability within TOL."""
    for r, g in zip(ref, got, strict=True):
        assert g.error is None, g.error
        assert g.token_ids == r.token_ids
        for a, b in zip(r.top_logprobs, g.top_logprobs, strict=True):
            assert a.keys() == b.keys()
            worst = max(abs(a[k] - b[k]) for k in a)
            assert worst <= TOL, worst


def reference(path, **kw):
    """The single-process run of PROMPTS: outputs with full log-probabilities."""
    with LLM(path, dtype="fp32", threads=1, **kw) as llm:
        return llm.generate(PROMPTS, greedy(vocab=llm.config.vocab_size))


@pytest.fixture(scope="module")
def tiny(make_ckpt):
    return lambda family, **kw: make_ckpt(family, "fp32", **kw)


@pytest.fixture(scope="module")
def seven_experts(tmp_path_factory):
    """A tiny OLMoE with 7 routed experts (divisible by no world size but 7)."""
    out = tmp_path_factory.mktemp("olmoe7") / "ckpt"
    return synthesize("olmoe", "tiny", out, seed=1, dtype="fp32", overrides={"num_experts": 7}, progress=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_match_one_process(family, tiny, tmp_path):
    """Every family: 2 ranks (each its share of the experts, placed in its own DRAM) = 1 process."""
    path = tiny(family)
    ref = reference(path)
    with LLM(path, dtype="fp32", world_size=2, threads=1, budget="cpu=2GiB", store=tmp_path / "store") as llm:
        assert llm.plan.world_size == 2 and llm.plan.rank == 0
        tiers = {t.tier for t in llm.plan.tiles}
        assert "remote" in tiers and "cpu" in tiers  # rank 0 computes a share, not everything
        got = llm.generate(PROMPTS, greedy(vocab=llm.config.vocab_size))
        stats = llm.parts.ranks.stats
        moe_layers = len(llm.model.moe_blocks())
        assert stats.calls >= moe_layers  # one all-reduce per MoE layer and pass
    assert_same(ref, got)


@pytest.mark.parametrize(("world", "split"), [(2, "tile"), (3, "expert")])
def test_experts_not_divisible_with_tiles_on_disk(world, split, seven_experts, tmp_path):
    """7 experts on 2 ranks (tile split) and on 3 (whole experts), each rank's budget too small for its share, so
    tiles stream from disk on every rank."""
    path = seven_experts
    ref = reference(path)
    with LLM(
        path, dtype="fp32", world_size=world, threads=1, budget="cpu=450KiB", rank_split=split, store=tmp_path / "s"
    ) as llm:
        tiers = [t.tier for t in llm.plan.tiles]
        assert "disk" in tiers and "remote" in tiers
        got = llm.generate(PROMPTS, greedy(vocab=llm.config.vocab_size))
        assert llm.stats().runtime["disk_bytes"] > 0
    assert_same(ref, got)


def test_replicated_hot_experts_split_their_tokens(tiny, tmp_path):
    """A profile with one expert per layer hotter than half the layer: it is replicated on both ranks (tokens split
    between the replicas, taking turns at batch 1), and the output is still the single-process one."""
    path = tiny("olmoe")  # no shared experts: they would be the layer's hottest item
    ref = reference(path)
    topo = Topology.from_config(Checkpoint.open(path).config)
    sig = ModelSignature.of(topo)
    counts = tuple([400] + [1] * (sig.num_experts - 1))
    layers = tuple(LayerProfile(i, counts, (0,) * len(counts), 100, 0) for i in sig.moe_layers)
    hot = Profile(sig, layers, ("hot",), "test")
    with LLM(
        path, dtype="fp32", world_size=2, threads=1, budget="cpu=2GiB", profile=hot, rank_split="expert",
        store=tmp_path / "s",
    ) as llm:  # fmt: skip
        assert llm.plan.replicas  # expert 0 of every MoE layer, on both ranks
        got = llm.generate(PROMPTS, greedy(vocab=llm.config.vocab_size))
        single = llm.generate([PROMPTS[1]], greedy(vocab=llm.config.vocab_size))  # batch 1: replicas take turns
    assert_same(ref, got)
    assert_same(ref[1:2], single)


def test_speculative_decoding_across_ranks(tiny, tmp_path):
    """n-gram drafts verified by the 2-rank model: the same tokens as plain single-process decoding."""
    path = tiny("qwen3_moe")
    ref = reference(path)
    with LLM(
        path, dtype="fp32", world_size=2, threads=1, budget="cpu=2GiB", speculative="ngram", store=tmp_path / "s"
    ) as llm:
        got = llm.generate(PROMPTS, greedy(max_tokens=8))
        assert llm.speculator is not None and llm.speculator.stats.accepted  # drafts were verified
    for r, g in zip(ref, got, strict=True):
        assert g.token_ids == r.token_ids


def test_openai_server_on_rank_0(tiny, tmp_path):
    """The OpenAI server on rank 0 of 2 answers the official client with the single-process tokens."""
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    from tilemem.server import BackgroundServer, ServerConfig

    path = tiny("mixtral")
    with LLM(path, dtype="fp32", threads=1) as one:
        want = one.generate([PROMPTS[0]], greedy())[0].text
    with LLM(path, dtype="fp32", world_size=2, threads=1, budget="cpu=2GiB", store=tmp_path / "s") as llm:
        with BackgroundServer(llm, ServerConfig(max_batch=2, port=0)) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
            name = server.state.model_name
            out = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=8, temperature=0)
            page = httpx.get(f"{server.url}/v1/tilemem/plan", timeout=30).json()  # what the live page draws
        (follower,) = llm.parts.followers
    ranks = page["ranks"]
    assert (ranks["rank"], ranks["world_size"]) == (0, 2) and "remote" in page["tiers"]
    for layer in range(len(page["layers"])):  # each expert computed exactly once over the ranks
        for e in range(page["experts"]):
            assert ranks["share"][0][layer][e] + ranks["share"][1][layer][e] == pytest.approx(1.0)
    assert out.choices[0].text == want
    assert out.usage.completion_tokens == 8
    assert follower.returncode == 0  # closing rank 0 told rank 1 to stop, and it did


# -- launching by hand -------------------------------------------------------------------------------
def tilemem(*args: str, env: dict | None = None) -> subprocess.Popen:
    """A `tilemem` command in its own process."""
    full = {**os.environ, **(env or {})}
    cmd = [sys.executable, "-m", "tilemem.cli.main", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full)


def test_cli_ranks_by_flags_and_by_torchrun_env(tiny, tmp_path):
    """`tilemem generate --world-size 2 --rank 0` + `tilemem follow --rank 1` print what one process prints, and
    so do two `tilemem generate` under torchrun's environment variables."""
    path = str(tiny("olmoe"))
    common = ["--dtype", "fp32", "--threads", "1", "--prompt", "hello", "--max-tokens", "6", "--temperature", "0"]
    one = subprocess.run(
        [sys.executable, "-m", "tilemem.cli.main", "generate", path, *common], capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr
    store = ["--budget", "cpu=2GiB", "--store", str(tmp_path / "s")]
    port = str(free_port())
    flags = ["--world-size", "2", "--master-port", port]
    rank1 = tilemem("follow", path, *common[:4], *store, *flags, "--rank", "1")
    rank0 = tilemem("generate", path, *common, *store, *flags, "--rank", "0")
    out0, err0 = rank0.communicate(timeout=120)
    out1, err1 = rank1.communicate(timeout=60)
    assert rank0.returncode == 0, err0
    assert rank1.returncode == 0, err1
    assert out0 == one.stdout and out1 == ""
    port = str(free_port())
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    ranks = [tilemem("generate", path, *common, *store, env={**env, "RANK": str(r)}) for r in (1, 0)]
    outs = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outs
    assert outs[1][0] == one.stdout and outs[0][0] == ""


# -- faults ------------------------------------------------------------------------------------------
def test_killed_rank_stops_rank_0_with_a_clear_error(tiny, tmp_path):
    """Rank 1 killed mid-generation: rank 0's generate raises RankError naming rank 1 within the timeout."""
    path = tiny("olmoe")
    llm = LLM(path, dtype="fp32", world_size=2, threads=1, budget="cpu=2GiB", store=tmp_path / "s", dist_timeout=20)
    (follower,) = llm.parts.followers
    steps = [0]
    engine = llm.engine()
    original = engine.step

    def step():  # kill rank 1 after a few steps, mid-generation
        steps[0] += 1
        if steps[0] == 3:
            follower.send_signal(signal.SIGKILL)
            follower.wait()
        return original()

    engine.step = step
    t0 = time.monotonic()
    with pytest.raises(RankError, match="rank 1"):
        llm.generate(PROMPTS, greedy(max_tokens=40))
    assert time.monotonic() - t0 < 25
    llm.close()  # no hang: nothing left to tell
    assert not list(tmp_path.glob("s/*.tmp*"))  # no half-written artifact


def test_server_answers_503_and_exits_non_zero_when_a_rank_dies(tiny, tmp_path):
    """`tilemem serve` on rank 0 of 2: rank 1 killed while a request runs -> that request gets 503, the server
    exits non-zero, naming rank 1."""
    httpx = pytest.importorskip("httpx")
    path = str(tiny("olmoe"))
    port, http = str(free_port()), free_port()
    flags = ["--dtype", "fp32", "--threads", "1", "--budget", "cpu=2GiB", "--store", str(tmp_path / "s")]
    flags += ["--world-size", "2", "--master-port", port, "--max-model-len", "4096", "--max-batch", "2"]
    rank1 = tilemem("follow", path, *flags, "--rank", "1")
    rank0 = tilemem("serve", path, *flags, "--rank", "0", "--port", str(http), "--log-level", "warning")
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert rank0.poll() is None and time.monotonic() < deadline, rank0.stderr.read() if rank0.poll() else ""
            time.sleep(0.3)
        body = {"model": "ckpt", "prompt": [1, 2, 3], "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
        result = {}
        sender = threading.Thread(
            target=lambda: result.update(r=httpx.post(f"{url}/v1/completions", json=body, timeout=120))
        )
        sender.start()
        time.sleep(2.0)  # the request is decoding
        rank1.send_signal(signal.SIGKILL)
        sender.join(60)
        assert result["r"].status_code == 503, result["r"].text
        assert "rank 1" in result["r"].text
        rank0.wait(timeout=60)
        err = rank0.stderr.read()
        assert rank0.returncode not in (0, None) and "rank 1" in err, err
    finally:
        for p in (rank0, rank1):
            if p.poll() is None:
                p.kill()


def test_hung_rank_times_out(tiny, tmp_path):
    """A rank that stops answering (SIGSTOP) makes rank 0 stop after --dist-timeout, naming it."""
    path = tiny("olmoe")
    llm = LLM(path, dtype="fp32", world_size=2, threads=1, budget="cpu=2GiB", store=tmp_path / "s", dist_timeout=3)
    (follower,) = llm.parts.followers
    follower.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(RankError, match="rank 1"):
            llm.generate(PROMPTS, greedy())
        assert time.monotonic() - t0 < 15
    finally:
        follower.send_signal(signal.SIGKILL)
        follower.wait()
        llm.close()


def test_mismatched_checkpoints_are_refused_at_start(tiny, seven_experts, tmp_path):
    """Rank 1 on another checkpoint: both ranks refuse to start, naming the difference."""
    a, b = str(tiny("olmoe")), str(seven_experts)
    port = str(free_port())
    flags = ["--dtype", "fp32", "--threads", "1", "--budget", "cpu=2GiB", "--world-size", "2", "--master-port", port]
    rank1 = tilemem("follow", b, *flags, "--rank", "1", "--store", str(tmp_path / "b"))
    rank0 = tilemem("generate", a, *flags, "--rank", "0", "--store", str(tmp_path / "a"), "--max-tokens", "2")
    _, err0 = rank0.communicate(timeout=120)
    _, err1 = rank1.communicate(timeout=60)
    assert rank0.returncode != 0 and rank1.returncode != 0
    assert "checkpoint" in err0 + err1 and "Traceback" not in err0 + err1


def test_a_rank_that_never_comes_is_reported(tiny):
    """Rank 0 alone: start-up gives up after --dist-timeout with the flags to check."""
    with pytest.raises(RankError, match="could not join"):
        LLM(tiny("olmoe"), dtype="fp32", world_size=2, rank=0, master_port=free_port(), dist_timeout=2)


@pytest.mark.parametrize(
    ("kw", "env", "message"),
    [
        ({"world_size": 2}, {}, "needs this process's rank"),
        ({"world_size": 2, "rank": 2}, {}, "between 0 and 1"),
        ({}, {"WORLD_SIZE": "two"}, "not an integer"),
        ({"world_size": 2, "rank": 0, "master_port": 70000}, {}, "master port"),
    ],
)
def test_bad_rank_setups_are_refused(kw, env, message):
    with pytest.raises(ConfigError, match=message):
        RankSetup.resolve(env=env, **kw)


def test_torchrun_environment_is_read():
    env = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600"}
    s = RankSetup.resolve(env=env)
    assert (s.world_size, s.rank, s.local_rank, s.master_addr, s.master_port) == (4, 2, 0, "10.0.0.1", 29600)
    assert s.local_world == 1  # one rank per machine unless torchrun says otherwise
    assert RankSetup.resolve(env={**env, "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"}).local_world == 2
    here = RankSetup.resolve(world_size=3, rank=1, env={})  # rank 0 on 127.0.0.1: every rank on this machine
    assert (here.local_rank, here.local_world) == (1, 3)
    assert RankSetup.resolve(env={}) is None
    assert RankSetup.resolve(world_size=1, env=env) is None  # a flag wins over the environment


def test_all_reduce_sums_over_ranks_in_threads():
    """The group itself: two ranks (threads of this process cannot share a default group, so two processes)."""
    code = (
        "import sys, torch\n"
        "from tilemem.parallel.group import RankGroup, RankSetup\n"
        "r = int(sys.argv[1]); g = RankGroup(RankSetup(2, r, '127.0.0.1', int(sys.argv[2]), r, 20.0))\n"
        "t = torch.full((3,), float(r + 1)); g.all_reduce(t)\n"
        "assert t.tolist() == [3.0] * 3, t\n"
        "assert g.gather(r) == [0, 1]\n"
        "g.send('hi') if r == 0 else print(g.receive())\n"
        "g.close()\n"
    )
    port = str(free_port())
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(r), port], stdout=subprocess.PIPE, text=True) for r in (0, 1)
    ]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[1].strip() == "hi"


def test_automatic_budgets_share_the_machine_among_its_ranks(tiny, monkeypatch):
    """Ranks on one machine each plan within their share of its memory (rank_budget's `share`), not all of it: with
    2 MB available (a tiny model of 0.8 MB), one rank may hold it all, each of two ranks only part."""
    import dataclasses

    from tilemem.placement.budgets import Budgets
    from tilemem.runtime import setup

    measured = setup.memlimit.memory_limit()
    monkeypatch.setattr(
        setup.memlimit, "memory_limit", lambda explicit=None: dataclasses.replace(measured, available=2_000_000)
    )
    ckpt = Checkpoint.open(tiny("olmoe"))
    budgets = [setup.rank_budget(ckpt, None, context=256, share=n) for n in (1, 2)]
    one, two = (Budgets.parse(b).tiers[0].capacity for b in budgets)
    assert two < one <= ckpt.nbytes() + 4096
    assert setup.rank_budget(ckpt, "cpu=1GiB", share=2) == "cpu=1GiB"  # a budget given is each rank's own


def test_world_size_one_is_one_process(tiny):
    with LLM(tiny("olmoe"), dtype="fp32", world_size=1, threads=1) as llm:
        assert llm.parts.ranks is None and llm.plan is None
