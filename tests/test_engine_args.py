"""EngineArgs: one set of engine arguments for LLM, the CLI and the server; every range and choice checked
in one place (issue 19, cases 6, 9 and 10)."""

from __future__ import annotations

import argparse
import inspect
import textwrap
from dataclasses import fields

import pytest

from tilemem.cli.engine_flags import cli_fields, engine_args_from_namespace
from tilemem.cli.main import build_parser, main
from tilemem.engine.args import EngineArgs, flag_of
from tilemem.engine.llm import LLM
from tilemem.engine.sampling import SamplingParams
from tilemem.errors import ConfigError


def subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def option_strings(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


# -- flags generated from the fields -------------------------------------------------------------------
def test_every_field_has_a_doc_line_and_a_help():
    """A field is documented where it is declared; its flag help comes from the same declaration."""
    import ast

    body = ast.parse(textwrap.dedent(inspect.getsource(EngineArgs))).body[0].body
    documented = {
        node.target.id
        for node, after in zip(body, body[1:], strict=False)
        if isinstance(node, ast.AnnAssign)
        and isinstance(after, ast.Expr)
        and isinstance(after.value, ast.Constant)
        and isinstance(after.value.value, str)
    }
    assert documented == {f.name for f in fields(EngineArgs)}
    assert all("help" in f.metadata for f in fields(EngineArgs))


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_generate_and_serve_get_a_flag_for_every_field(command):
    flags = option_strings(subparser(command))
    want = {flag_of(f.name) for f in cli_fields()} - ({"--max-batch"} if command == "generate" else set())
    assert want <= flags, want - flags
    assert {"--tile-size", "--spec", "--no-prefetch", "--cache-policy", "--weight-codec"} <= flags


def test_flags_keep_their_names_and_defaults():
    """The defaults parsed from the command line are EngineArgs' own (serve prefills 512 tokens a step)."""
    gen = engine_args_from_namespace(build_parser().parse_args(["generate", "ckpt"]))
    assert gen == EngineArgs("ckpt")
    serve = engine_args_from_namespace(build_parser().parse_args(["serve", "ckpt"]))
    assert serve == EngineArgs("ckpt", prefill_chunk=512)
    bench = build_parser().parse_args(["bench", "ckpt"])
    assert (bench.threads, bench.tile, bench.store) == (2, None, None)  # make_plan picks the tile
    ns = build_parser().parse_args(
        [
            "serve",
            "ckpt",
            "--tile-size",
            "64",
            "--spec",
            "ngram",
            "--num-draft",
            "2",
            "--no-prefetch",
            "--max-batch",
            "3",
        ]
    )
    args = engine_args_from_namespace(ns)
    assert (args.tile, args.speculative, args.num_draft, args.prefetch, args.max_batch) == (64, "ngram", 2, False, 3)


def test_llm_keywords_are_the_engine_args_fields():
    """`LLM(path, **kw)` takes exactly EngineArgs' fields (nothing to keep in sync by hand)."""
    with pytest.raises(TypeError, match="bogus"):
        LLM("ckpt", bogus=1)
    sig = inspect.signature(LLM)
    assert list(sig.parameters) == ["path"] + [f.name for f in fields(EngineArgs) if f.name != "model"]
    assert {p.name: p.default for p in sig.parameters.values() if p.name != "path"} == {
        f.name: f.default for f in fields(EngineArgs) if f.name != "model"
    }
    assert {"dtype", "threads", "max_batch", "plan", "budget", "tile", "runtime", "speculative"} <= set(sig.parameters)


def test_llm_and_from_args_build_the_same_engine(make_ckpt):
    path = make_ckpt("olmoe")
    params = SamplingParams(max_tokens=4, temperature=0)
    a = LLM(path, dtype="fp32", max_batch=2, prefill_chunk=7)
    b = LLM.from_args(EngineArgs(path, dtype="fp32", max_batch=2, prefill_chunk=7))
    assert a.args == b.args == EngineArgs(model=path, dtype="fp32", max_batch=2, prefill_chunk=7)
    assert (b.max_batch, b.prefill_chunk) == (2, 7)
    assert a.generate([[1, 2, 3]], params)[0].token_ids == b.generate([[1, 2, 3]], params)[0].token_ids


# -- range and choice checks (API level) ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "expect"),
    [
        ("threads", 0, r"threads must be at least 1 thread \(--threads\), got 0"),
        ("threads", -3, r"threads must be at least 1 thread \(--threads\), got -3"),
        ("max_batch", 0, r"max_batch must be at least 1 sequence \(--max-batch\), got 0"),
        ("max_model_len", 0, r"max_model_len must be at least 1 token \(--max-model-len\), got 0"),
        ("prefill_chunk", 0, r"prefill_chunk must be at least 1 token \(--prefill-chunk\), got 0"),
        ("tile", 0, r"tile must be at least 1 neuron \(--tile-size\), got 0"),
        ("num_draft", 0, r"num_draft must be at least 1 token \(--num-draft\), got 0"),
        ("replan_interval_s", 0.0, r"replan_interval_s must be greater than 0 s \(--replan-interval\), got 0.0"),
        (
            "replan_interval_s",
            float("nan"),
            r"replan_interval_s must be greater than 0 s \(--replan-interval\), got nan",
        ),
        ("threads", "2", r"threads \(--threads\) must be a number, got '2'"),
        ("policy", "foo", r"policy must be one of uniform, kt_expert, .*auto \(--policy\), got 'foo'"),
        ("cache_policy", "bogus", r"cache_policy must be one of lru, lfu, profile \(--cache-policy\), got 'bogus'"),
        ("weight_codec", "zip", r"weight_codec must be one of x12, none \(--weight-codec\), got 'zip'"),
        ("dtype", "int3", r"dtype must be one of bf16, .*fp32.* \(--dtype\), got 'int3'"),
        ("speculative", "eagle", r"unknown speculative method 'eagle' \(--spec\); use one of ngram, mtp, draft:PATH"),
        ("speculative", "draft:", r"unknown speculative method 'draft:'"),
        ("device", "tpu", r"unknown device 'tpu'; use 'cpu' or 'cuda'"),
        ("prefetch", "sometimes", r"prefetch must be one of True, False, auto \(--no-prefetch\), got 'sometimes'"),
    ],
)
def test_bad_engine_args_name_the_field_flag_value_and_choices(field, value, expect):
    with pytest.raises(ConfigError, match=expect):
        EngineArgs("ckpt", **{field: value})


def test_good_engine_args_pass():
    import torch

    args = EngineArgs("ckpt", dtype=torch.bfloat16, threads=1, policy="auto", device="cuda:1", speculative="draft:d")
    assert args.draft_model == "d"
    assert EngineArgs("ckpt", dtype="BF16").dtype == "BF16"  # names are case-insensitive, as the loader reads them


def test_plan_and_budget_are_exclusive():
    with pytest.raises(ConfigError, match="either --plan or --budget"):
        EngineArgs("ckpt", plan="p", budget="cpu=1GiB")


def test_tiered_config_from_cache_policy_and_prefetch():
    from tilemem.runtime.tiered import TieredConfig

    assert EngineArgs("c").tiered_config() == TieredConfig(cache_policy="lfu", prefetch="auto")
    assert EngineArgs("c").tiered_config(plan_prefetch=False).prefetch is False  # the plan's setting
    assert EngineArgs("c", prefetch=False, cache_policy="lru").tiered_config() == TieredConfig(
        cache_policy="lru", prefetch=False
    )
    mine = TieredConfig(io_depth=2)
    assert EngineArgs("c", runtime=mine, cache_policy="lru").tiered_config() is mine


# -- the CLI cases of issue 19: exit 2, one clear line, no traceback, nothing loaded ---------------------
@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--policy", "foo"], "policy must be one of"),
        (["--cache-policy", "bogus"], "cache_policy must be one of lru, lfu, profile (--cache-policy), got 'bogus'"),
        (["--tile-size", "0"], "tile must be at least 1 neuron (--tile-size), got 0"),
        (["--threads", "0"], "threads must be at least 1 thread (--threads), got 0"),
        (["--threads", "-3"], "threads must be at least 1 thread (--threads), got -3"),
        (["--spec", "ngram", "--num-draft", "0"], "num_draft must be at least 1 token (--num-draft), got 0"),
        (["--budget", "cpu=230KiB", "--cache-policy", "bogus"], "cache_policy must be one of lru, lfu, profile"),
        (["--max-model-len", "0"], "max_model_len must be at least 1 token (--max-model-len), got 0"),
        (["--replan-interval", "-1"], "replan_interval_s must be greater than 0 s (--replan-interval), got -1.0"),
    ],
)
def test_generate_rejects_bad_engine_flags(extra, expect, make_ckpt, capsys, monkeypatch):
    from tilemem.engine import build

    monkeypatch.setattr(build, "build_engine", lambda args: pytest.fail("loaded despite a bad flag"))
    code = main(["generate", str(make_ckpt("olmoe")), "--prompt", "hi", "--max-tokens", "2", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and expect in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--threads", "-1"], "threads must be at least 1 thread (--threads), got -1"),
        (["--policy", "foo"], "(--policy), got 'foo'"),
        (["--max-batch", "0"], "max_batch must be at least 1 sequence (--max-batch), got 0"),
        (["--prefill-chunk", "0"], "prefill_chunk must be at least 1 token (--prefill-chunk), got 0"),
    ],
)
def test_serve_rejects_bad_engine_flags(extra, expect, make_ckpt, capsys, monkeypatch):
    from tilemem.engine import build

    monkeypatch.setattr(build, "build_engine", lambda args: pytest.fail("loaded despite a bad flag"))
    code = main(["serve", str(make_ckpt("olmoe")), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and expect in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--shutdown-grace", "-1"], "shutdown_grace_s must be >= 0 seconds (--shutdown-grace), got -1.0"),
        (["--log-level", "loud"], "log_level must be one of critical, error, warning, info, debug, trace"),
        (["--port", "70000"], "port must be 1..65535"),
    ],
)
def test_serve_rejects_bad_server_flags_before_loading(extra, expect, make_ckpt, capsys, monkeypatch):
    """Server settings are checked in ServerConfig, before the model loads (a bad --log-level used to
    surface from uvicorn after loading)."""
    from tilemem.engine import build

    monkeypatch.setattr(build, "build_engine", lambda args: pytest.fail("loaded despite a bad flag"))
    code = main(["serve", str(make_ckpt("olmoe")), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and expect in err, err


def test_server_config_checks_its_ranges():
    from tilemem.server.config import ServerConfig

    assert ServerConfig(port=0).port == 0  # any free port, for tests and benchmarks
    for bad, expect in [
        ({"max_batch": 0}, r"max_batch must be at least 1 \(--max-batch\), got 0"),
        ({"max_queue": -2}, r"max_queue must be at least 1 \(--max-queue\), got -2"),
        ({"prefill_chunk": 0}, r"prefill_chunk must be at least 1 \(--prefill-chunk\), got 0"),
        ({"shutdown_grace_s": float("nan")}, "shutdown_grace_s must be >= 0 seconds"),
    ]:
        with pytest.raises(ConfigError, match=expect):
            ServerConfig(**bad)


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--threads", "0"], "threads must be at least 1 thread (--threads), got 0"),
        (["--tile-size", "-4"], "tile must be at least 1 neuron (--tile-size), got -4"),
        (["--repeats", "0"], "repeats must be an integer >= 1 (--repeats), got 0"),
        (["--decode-tokens", "0"], "decode_tokens must be an integer >= 1 (--decode-tokens), got 0"),
        (["--prompt-tokens", "-1"], "prompt_tokens must be an integer >= 1 (--prompt-tokens), got -1"),
        (["--policies", ","], "at least one entry in policies (--policies)"),
    ],
)
def test_bench_rejects_bad_flags_before_running(extra, expect, make_ckpt, capsys, monkeypatch, tmp_path):
    """`bench --repeats 0` used to run nothing and write a report; `--decode-tokens 0` failed after profiling."""
    import tilemem.bench.runner as runner

    monkeypatch.setattr(runner, "run_bench", lambda spec: pytest.fail("ran despite a bad flag"))
    code = main(["bench", str(make_ckpt("olmoe")), "--out", str(tmp_path / "b"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and expect in err and "Traceback" not in err, err
    assert not (tmp_path / "b").exists()


# -- one build path: the server's draft model follows --dtype -----------------------------------------
def test_server_draft_model_is_loaded_with_the_engine_dtype(make_ckpt, monkeypatch):
    """`tilemem serve --spec draft:PATH --dtype bf16` used to load the draft in its checkpoint's dtype."""
    import torch

    import tilemem.loader.checkpoint as checkpoint
    from tilemem.server.app import create_app
    from tilemem.server.config import ServerConfig

    target, draft = make_ckpt("olmoe"), make_ckpt("olmoe", seed=1)
    seen = []
    load = checkpoint.load_model

    def spy(path, dtype=None, *a, **kw):
        seen.append((str(getattr(path, "path", path)), dtype))
        return load(path, dtype, *a, **kw)

    monkeypatch.setattr(checkpoint, "load_model", spy)
    args = EngineArgs(target, dtype="bf16", speculative=f"draft:{draft}", num_draft=2)
    app = create_app(args, ServerConfig(max_batch=2))
    state = app.state.tilemem
    assert state.llm.model.dtype == torch.bfloat16
    assert (str(draft), "bf16") in seen
    assert state.llm.args.draft_model == str(draft)


def test_cache_policy_and_prefetch_flags_reach_the_tiered_runtime(make_ckpt, tmp_path, monkeypatch, capsys):
    import tilemem.runtime.setup as setup
    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.models.topology import Topology

    seen = []
    attach = setup.attach_tiered
    monkeypatch.setattr(setup, "attach_tiered", lambda *a, **kw: seen.append(a[4]) or attach(*a, **kw))
    path = make_ckpt("olmoe")
    non_expert = Topology.from_config(Checkpoint.open(path).config).non_expert_bytes
    argv = ["generate", str(path), "--prompt", "hi", "--max-tokens", "2", "--budget", f"cpu={non_expert}B"]
    argv += ["--tile-size", "16", "--store", str(tmp_path / "store")]
    assert main([*argv, "--cache-policy", "lru", "--no-prefetch"]) == 0
    assert main(argv) == 0
    assert [(c.cache_policy, c.prefetch) for c in seen] == [("lru", False), ("lfu", "auto")]
