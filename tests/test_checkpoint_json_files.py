"""Every JSON file of a checkpoint is checked for what it claims to be: malformed ones are one clear
error naming the file, never a traceback (AttributeError, TypeError, a tokenizers Exception, ...)."""

from __future__ import annotations

import json
import shutil

import pytest

from tilemem.cli.main import main

CASES = {
    "config.json holds a list": ("config.json", "[1]", "config.json is not a JSON object (it holds a list)"),
    "index holds a list": ("model.safetensors.index.json", "[1]", "index.json is malformed"),
    "index weight_map is a list": (
        "model.safetensors.index.json",
        '{"weight_map": [1]}',
        "'weight_map' must map tensor names to shard file names",
    ),
    "generation_config holds a list": ("generation_config.json", "[1]", "generation_config.json is not a JSON object"),
    "generation_config is not JSON": ("generation_config.json", '{"x": 1', "generation_config.json is not valid JSON"),
    "tokenizer.json is not a tokenizer": ("tokenizer.json", "[1]", "tokenizer.json cannot be read"),
    "tokenizer_config holds a list": ("tokenizer_config.json", "[1]", "tokenizer_config.json is not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_malformed_checkpoint_json_file_is_one_clear_error(case, make_ckpt, tmp_path, capsys):
    name, content, expect = CASES[case]
    ckpt = shutil.copytree(make_ckpt("olmoe"), tmp_path / "ckpt")
    (ckpt / name).write_text(content)
    assert main(["generate", str(ckpt), "--dtype", "fp32", "--prompt", "hi", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expect in err and str(ckpt / name) in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_chat_template_with_a_syntax_error_names_the_line(make_ckpt, tmp_path, capsys):
    ckpt = shutil.copytree(make_ckpt("olmoe"), tmp_path / "ckpt")
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}\n{{ m.content }\n{% endfor %}"
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert main(["generate", str(ckpt), "--dtype", "fp32", "--prompt", "hi", "--max-tokens", "2", "--chat"]) == 2
    err = capsys.readouterr().err
    assert "chat_template is not a valid Jinja template (line 2:" in err and "Traceback" not in err
