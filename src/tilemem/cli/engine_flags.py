"""Command-line flags generated from `EngineArgs` fields, so `generate`, `serve` and `bench` cannot drift
apart from each other or from `LLM(...)`.

add_engine_args(parser, exclude=("max_batch",))
args = engine_args_from_namespace(parser.parse_args())  # an EngineArgs, checked
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from dataclasses import MISSING, Field
from typing import Any

from tilemem.engine.args import ENGINE_FIELDS, EngineArgs, allowed, flag_of


def cli_fields() -> list[Field]:
    """EngineArgs fields that have a command-line flag (all but `model` and the Python-only ones)."""
    return [f for f in ENGINE_FIELDS.values() if f.metadata.get("flag") != ""]


def _value_type(f: Field) -> type:
    """int, float or str from the field's annotation (a string under `from __future__ import annotations`)."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    head = text.split("|")[0].strip()
    return {"int": int, "float": float}.get(head, str)


def add_engine_args(
    parser: argparse.ArgumentParser,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """Add a flag for each EngineArgs field in `include` (default: every field with a flag) but not in
    `exclude`; `defaults` overrides a field's default for this command (e.g. serve's prefill chunk)."""
    names = [f.name for f in cli_fields()] if include is None else list(include)
    skip, defaults = set(exclude), defaults or {}
    for name in names:
        if name in skip:
            continue
        f = ENGINE_FIELDS[name]
        meta = f.metadata
        default = defaults.get(name, f.default if f.default is not MISSING else None)
        flag = flag_of(name)
        text = meta["help"].replace("%", "%%")  # argparse formats help with %
        if meta.get("list_choices"):
            text += ": " + ", ".join(str(c) for c in allowed(meta["choices"]))
        if name in defaults:  # this command's own default replaces what the field's help says
            text = re.sub(r" \(default: [^)]*\)", "", text)
        if default is not None and not isinstance(default, bool) and "default" not in text:
            text += " (default: %(default)s)"
        kw: dict[str, Any] = {"dest": name, "default": default, "help": text}
        if "action" in meta:
            kw["action"] = meta["action"]
            if "const" in meta:
                kw["const"] = meta["const"]
        else:
            kw["type"] = _value_type(f)
            kw["metavar"] = flag.removeprefix("--").upper().replace("-", "_")
            if meta.get("argparse_choices"):
                kw["choices"] = allowed(meta["choices"])
                del kw["metavar"]
        parser.add_argument(flag, **kw)


def engine_args_from_namespace(ns: argparse.Namespace, **overrides: Any) -> EngineArgs:
    """The (checked) EngineArgs of parsed flags: `ns.model` plus every EngineArgs field found on `ns`;
    `overrides` win over both."""
    values = {f.name: getattr(ns, f.name) for f in cli_fields() if hasattr(ns, f.name)}
    values.update(overrides)
    values.setdefault("model", getattr(ns, "model", None))
    return EngineArgs(**values)


def checkpoint_tile(model: str) -> int:
    """Neurons per tile for `model` where `--tile-size` is not given: 128, or a K-quant GGUF file's block (256)."""
    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.runtime.setup import default_tile

    return default_tile(Checkpoint.open(model))
