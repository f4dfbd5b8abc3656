"""`--help` of every `tilemem` command, sub-command and sub-sub-command, found by walking the parser
(a command added later is covered without touching this file)."""

from __future__ import annotations

import argparse

import pytest

from tilemem.cli.main import build_parser, main


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path under `parser` (the root as `()`), depth first."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                paths += command_paths(child, (*prefix, name))
    return paths


PATHS = command_paths(build_parser())


def test_the_walk_finds_nested_commands():
    assert ("bench",) in PATHS and ("serve",) in PATHS and ("tmap", "predict") in PATHS


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "tilemem")
def test_help_prints_usage_and_exits_0(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"usage: {' '.join(('tilemem', *path))}"), captured.out[:200]
    assert captured.err == ""
