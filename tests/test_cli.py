"""The `tilemem` command line: synth, inspect and generate."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tilemem.cli.main import main
from tilemem.engine.llm import LLM, peak_rss_bytes
from tilemem.engine.sampling import SamplingParams
from tilemem.loader.checkpoint import Checkpoint

STATS = re.compile(r"prefill (\d+) tok @ ([\d.]+) tok/s \| decode (\d+) tok @ ([\d.]+) tok/s \| peak RSS ([\d.]+) GiB")


@pytest.fixture(scope="module")
def cli_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "olmoe-tiny"
    assert main(["synth", "olmoe", "--preset", "tiny", "--out", str(out), "--dtype", "fp32"]) == 0
    return out


def test_synth_writes_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "ckpt"
    argv = ["synth", "olmoe", "--preset", "tiny", "--out", str(out), "--dtype", "fp32", "--layers", "3"]
    assert main([*argv, "--seed", "4", "--routing-skew", "1.5"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["OlmoeForCausalLM"]
    assert cfg["torch_dtype"] == "float32"
    assert cfg["num_hidden_layers"] == 3
    meta = json.loads((out / "tilemem_synth.json").read_text())
    assert (meta["seed"], meta["routing_skew"]) == (4, 1.5)
    ckpt = Checkpoint.open(out)
    assert ckpt.config.num_layers == 3
    assert any(name.startswith("model.layers.2.") for name in ckpt.weight_map)


def read_rows(text: str) -> dict[str, str]:
    """`inspect` output as {label: value} (columns are separated by two or more spaces)."""
    rows = {}
    for line in text.strip().splitlines():
        label, value = re.split(r"\s{2,}", line, maxsplit=1)
        rows[label] = value
    return rows


def count_from_files(path: Path) -> dict[str, int]:
    """Bytes and parameters by kind, read from the weight files (independently of Topology)."""
    routed = other_ffn = rest = params = 0
    for shard in path.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                n = t.numel() * t.element_size()
                params += t.numel()
                if ".experts." in name:
                    routed += n
                elif name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")):
                    other_ffn += n
                else:
                    rest += n
    return dict(routed=routed, other_ffn=other_ffn, rest=rest, params=params)


@pytest.mark.parametrize("family", ["olmoe (cli synth)", "qwen2_moe", "mixtral"])
def test_inspect_prints_the_topology(family, cli_ckpt, make_ckpt, capsys):
    path = cli_ckpt if family.startswith("olmoe") else make_ckpt(family)
    assert main(["inspect", str(path)]) == 0
    rows = read_rows(capsys.readouterr().out)
    cfg = Checkpoint.open(path).config
    files = count_from_files(path)
    moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4  # fp32

    assert rows["family"] == f"{cfg.family} ({cfg.architecture})"
    assert rows["layers"].startswith(f"{cfg.num_layers} ({len(moe_layers)} MoE")
    assert rows["experts"] == f"{cfg.num_experts} routed per MoE layer, top-{cfg.top_k}"
    assert rows["dtype"] == "float32"
    assert rows["bytes per expert"].endswith(f"({expert:,} B)")
    assert files["routed"] == expert * cfg.num_experts * len(moe_layers)
    assert rows["routed expert bytes"].endswith(f"({files['routed']:,} B)")
    assert rows["non-expert bytes"].endswith(f"({files['rest']:,} B)")
    inactive = (cfg.num_experts - cfg.top_k) * len(moe_layers) * expert // 4
    assert rows["total parameters"] == f"{files['params'] / 1e6:.3f} M"
    assert rows["active parameters"] == f"{(files['params'] - inactive) / 1e6:.3f} M per token"
    if cfg.dense_layers:
        assert str(list(cfg.dense_layers)) in rows["layers"]
    if cfg.num_shared_experts:
        assert rows["shared experts"] == f"{cfg.num_shared_experts} x width {cfg.shared_intermediate_size}"
        assert files["other_ffn"] > 0
        assert rows["shared + dense FFN bytes"].endswith(f"({files['other_ffn']:,} B)")


class Recorder:
    """Stands in for sys.stdout and remembers each write and flush."""

    def __init__(self) -> None:
        self.events: list[str | None] = []

    def write(self, text: str) -> int:
        self.events.append(text)
        return len(text)

    def flush(self) -> None:
        self.events.append(None)

    def text(self) -> str:
        return "".join(e for e in self.events if e)


def test_generate_streams_text_and_prints_stats(cli_ckpt, capsys, monkeypatch):
    want = LLM(cli_ckpt, dtype="fp32").generate("hi", SamplingParams(max_tokens=5, temperature=0))[0]
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    argv = ["generate", str(cli_ckpt), "--prompt", "hi", "--max-tokens", "5", "--temperature", "0", "--stats"]
    assert main(argv) == 0
    assert out.text() == "hi" + want.text + "\n"
    # Streamed: the prompt, then deltas, each flushed as it came, then the newline.
    writes = [e for e in out.events if e is not None]
    assert len(writes) >= 3 and writes[0] == "hi" and writes[-1] == "\n"
    assert all(out.events[i + 1] is None for i, e in enumerate(out.events[:-1]) if e not in (None, "\n"))

    err = capsys.readouterr().err
    stats = STATS.search(err)
    assert stats, err
    assert int(stats[1]) == len(want.prompt_token_ids)
    assert int(stats[3]) == len(want.token_ids) - 1  # the first token comes from the prefill
    # Peak RSS in GiB: this process's high-water mark when the line was printed (2 decimals).
    assert abs(float(stats[5]) - peak_rss_bytes() / 2**30) <= 0.01


def test_generate_without_stats_prints_none(cli_ckpt, capsys):
    assert main(["generate", str(cli_ckpt), "--prompt", "hi", "--max-tokens", "2", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("hi")
    assert not STATS.search(captured.err)


def test_generate_chat_uses_the_template(cli_ckpt, capsys):
    argv = ["generate", str(cli_ckpt), "--prompt", "hi", "--chat", "--max-tokens", "3", "--temperature", "0"]
    assert main(argv) == 0
    llm = LLM(cli_ckpt, dtype="fp32")
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt.startswith("<|user|>\nhi")
    want = llm.generate(prompt, SamplingParams(max_tokens=3, temperature=0))[0]
    assert capsys.readouterr().out == prompt + want.text + "\n"
