"""Where `tilemem synth --out` may write: never over a user's files, never a traceback for odd paths."""

from __future__ import annotations

import json

import pytest

from tilemem.cli.main import main
from tilemem.errors import OutputExistsError
from tilemem.synth.output import MARKER
from tilemem.synth.writer import synthesize

SYNTH = ["synth", "olmoe", "--preset", "tiny", "--dtype", "fp32", "--layers", "1"]


def tiny(out, **kw):
    return synthesize("olmoe", "tiny", out, dtype="fp32", progress=False, overrides={"num_hidden_layers": 1}, **kw)


def test_synth_refuses_a_directory_holding_other_files(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert main([*SYNTH, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not a checkpoint tilemem synth wrote" in err and "thesis.tex" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging folder left behind


def test_synth_overwrite_replaces_only_its_own_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x01")
    tiny(out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "sub" / "data.bin").read_bytes() == b"\x01"
    assert (out / "config.json").is_file() and (out / MARKER).is_file()


def test_resynth_replaces_an_earlier_synth_checkpoint_and_its_stale_shards(tmp_path):
    out = tiny(tmp_path / "ckpt", shard_bytes=20_000)
    first = {p.name for p in out.iterdir()}
    assert sum(n.endswith(".safetensors") for n in first) > 1
    tiny(out, seed=3)  # one shard now: the earlier shards must go, nothing else may stay
    second = {p.name for p in out.iterdir()}
    assert second == set(json.loads((out / MARKER).read_text())["files"]) | {MARKER}
    assert sum(n.endswith(".safetensors") for n in second) == 1
    assert json.loads((out / MARKER).read_text())["seed"] == 3


def test_resynth_refuses_a_synth_checkpoint_the_user_added_files_to(tmp_path):
    out = tiny(tmp_path / "ckpt")
    (out / "README.md").write_text("my notes")
    with pytest.raises(OutputExistsError, match="README.md"):
        tiny(out)
    assert (out / "README.md").read_text() == "my notes"


def test_synth_writes_into_an_empty_existing_directory(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    tiny(out)
    listed = set(json.loads((out / MARKER).read_text())["files"])
    assert {"config.json", "model.safetensors.index.json"} <= listed
    assert {p.name for p in out.iterdir()} == listed | {MARKER}


def test_synth_out_dot_writes_into_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*SYNTH, "--out", "."]) == 0
    assert f"wrote {tmp_path.resolve()}" in capsys.readouterr().out
    assert (tmp_path / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_synth_out_dot_in_a_non_empty_directory_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work.py").write_text("print(1)")
    assert main([*SYNTH, "--out", "."]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "work.py" in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["work.py"]


def test_synth_out_root_is_a_clear_error(capsys):
    assert main([*SYNTH, "--out", "/"]) == 2
    assert "cannot write a checkpoint to /" in capsys.readouterr().err


def test_synth_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main([*SYNTH, "--out", str(target)]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert target.read_text() == "x"
