"""`tilemem` command line: synth, inspect, generate, demo, and the planning commands.

Errors from bad input (TileMemError) print one clear line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tilemem.errors import TileMemError


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every sub-command registered."""
    from tilemem.cli import model_commands

    parser = argparse.ArgumentParser(prog="tilemem", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_commands.register(sub)
    for name in ("plan_commands", "serve_command", "tmap_commands"):
        module = importlib.import_module(f"tilemem.cli.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tilemem` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TileMemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path that cannot be read or written (missing folder, a file in the way, no space)
        print(f"error: {exc}; check the paths given.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
