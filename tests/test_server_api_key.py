"""Where `tilemem serve` takes its API key from (flag, file, environment), and that an empty key is an
error instead of a server without authentication."""

from __future__ import annotations

import pytest

import tilemem.cli.model_commands as model_commands
import tilemem.server as server_pkg
from tilemem.cli.main import main
from tilemem.errors import ConfigError
from tilemem.server import ServerConfig
from tilemem.server.api_key import API_KEY_ENV, resolve_api_key


@pytest.fixture
def served(monkeypatch) -> list[ServerConfig]:
    """Run `tilemem serve` up to the point it would serve: the ServerConfig it would serve with."""
    configs: list[ServerConfig] = []
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.setattr(model_commands, "llm_from_args", lambda *a, **k: object())
    monkeypatch.setattr(server_pkg, "serve", lambda llm, config: configs.append(config))
    return configs


def test_no_key_anywhere_serves_without_one(served):
    assert main(["serve", "ckpt"]) == 0
    assert served[0].api_key is None


def test_the_flag_gives_the_key(served):
    assert main(["serve", "ckpt", "--api-key", "sk-flag"]) == 0
    assert served[0].api_key == "sk-flag"


def test_the_environment_gives_the_key(served, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "sk-env")
    assert main(["serve", "ckpt"]) == 0
    assert served[0].api_key == "sk-env"


def test_a_file_gives_the_key_without_its_line_break(served, tmp_path):
    path = tmp_path / "key"
    path.write_text("sk-file\n")
    assert main(["serve", "ckpt", "--api-key-file", str(path)]) == 0
    assert served[0].api_key == "sk-file"


def test_the_flag_wins_over_the_environment(served, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "sk-env")
    assert main(["serve", "ckpt", "--api-key", "sk-flag"]) == 0
    assert served[0].api_key == "sk-flag"


def test_an_empty_flag_is_refused(served, capsys):
    assert main(["serve", "ckpt", "--api-key", ""]) == 2
    err = capsys.readouterr().err
    assert "--api-key is empty" in err and "authentication off" in err
    assert served == []


def test_an_empty_environment_variable_is_refused(served, monkeypatch, capsys):
    monkeypatch.setenv(API_KEY_ENV, "")
    assert main(["serve", "ckpt"]) == 2
    assert f"${API_KEY_ENV} is empty" in capsys.readouterr().err
    assert served == []


def test_an_empty_file_is_refused(served, tmp_path, capsys):
    path = tmp_path / "key"
    path.write_text("\n")
    assert main(["serve", "ckpt", "--api-key-file", str(path)]) == 2
    assert "is empty" in capsys.readouterr().err
    assert served == []


def test_a_missing_file_is_refused(served, tmp_path, capsys):
    assert main(["serve", "ckpt", "--api-key-file", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_flag_and_file_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        resolve_api_key("sk-a", tmp_path / "key", environ={})


def test_a_key_with_surrounding_whitespace_is_refused():
    with pytest.raises(ConfigError, match="whitespace"):
        resolve_api_key(" sk-a", None, environ={})


def test_server_config_refuses_an_empty_key():
    with pytest.raises(ConfigError, match="empty"):
        ServerConfig(api_key="")
