"""`.tmem` plan configs: blocks of `key = value` lines, `#` comments.

    # OLMoE-like demo, 8 experts per layer on the GPU
    model {
      name = olmoe_like_demo
      layers = 16
      experts_per_layer = 64
      hidden_size = 2048
      intermediate_size = 1024
      top_k = 8
      expert_budget = 8
    }
    tile { intermediate_tile = 128 }
    schedule {
      policy = tilepo_fine
    }

Blocks: model, workload, tile, memory, precision, schedule, runtime (keys: `spec.SCHEMA`). A block
may sit on one line (`tile { intermediate_tile = 128 }`) with one key. Values run to the end of the
line (or a closing `}`); surrounding double quotes are removed. Every error names file:line:col.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tilemem.placement.errors import TmemSyntaxError
from tilemem.sdk.model_spec import BLOCKS, SCHEMA, ModelSpec, build_spec, coerce

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _strip_comment(line: str) -> str:
    """The line without a `#` comment (a `#` inside double quotes is kept)."""
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"':
            quoted = not quoted
        elif ch == "#" and not quoted:
            return line[:i]
    return line


class _Parser:
    def __init__(self, text: str, source: str) -> None:
        self.lines = text.splitlines()
        self.source = source
        self.blocks: dict[str, dict[str, Any]] = {}

    def error(self, line: int, col: int, msg: str) -> TmemSyntaxError:
        return TmemSyntaxError(f"{self.source}:{line}:{col}: {msg}")

    def parse(self) -> dict[str, dict[str, Any]]:
        block: str | None = None
        opened_at = 0
        for n, raw in enumerate(self.lines, 1):
            line = _strip_comment(raw)
            pos = len(line) - len(line.lstrip())
            rest = line.strip()
            while rest:
                col = pos + 1
                if block is None:
                    m = _IDENT.match(rest)
                    if not m:
                        raise self.error(n, col, f"expected a block name ({', '.join(BLOCKS)}), found {rest[:1]!r}")
                    name = m.group(0)
                    if name not in SCHEMA:
                        raise self.error(n, col, f"unknown block '{name}'; blocks: {', '.join(BLOCKS)}")
                    if name in self.blocks:
                        raise self.error(n, col, f"block '{name}' appears twice; merge them into one")
                    after = rest[m.end() :].lstrip()
                    if not after.startswith("{"):
                        brace_col = col + len(rest) - len(after)
                        raise self.error(n, brace_col, f"expected '{{' after block name '{name}'")
                    block, opened_at = name, n
                    self.blocks[name] = {}
                    consumed = len(rest) - len(after) + 1
                elif rest.startswith("}"):
                    block, consumed = None, 1
                else:
                    consumed = self.entry(block, rest, n, col)
                pos += consumed
                stripped = rest[consumed:]
                pos += len(stripped) - len(stripped.lstrip())
                rest = stripped.strip()
        if block is not None:
            raise self.error(opened_at, 1, f"block '{block}' is never closed; add '}}'")
        return self.blocks

    def entry(self, block: str, rest: str, n: int, col: int) -> int:
        """Parse `key = value` at the start of `rest`; return characters consumed."""
        m = _IDENT.match(rest)
        if not m:
            raise self.error(n, col, f"expected 'key = value' or '}}' in block '{block}', found {rest[:1]!r}")
        key = m.group(0)
        if key not in SCHEMA[block]:
            raise self.error(n, col, f"unknown key '{key}' in block '{block}'; keys: {', '.join(SCHEMA[block])}")
        if key in self.blocks[block]:
            raise self.error(n, col, f"key '{key}' is set twice in block '{block}'")
        after = rest[m.end() :]
        eq_at = m.end() + len(after) - len(after.lstrip())
        if rest[eq_at : eq_at + 1] != "=":
            raise self.error(n, col + eq_at, f"expected '=' after key '{key}'")
        v0 = eq_at + 1
        v0 += len(rest[v0:]) - len(rest[v0:].lstrip())
        if rest[v0 : v0 + 1] == '"':
            close = rest.find('"', v0 + 1)
            if close < 0:
                raise self.error(n, col + v0, "unterminated string; close it with '\"'")
            value, consumed = rest[v0 + 1 : close], close + 1
            tail = rest[consumed:].strip()
            if tail and not tail.startswith("}"):
                raise self.error(n, col + consumed, f"unexpected {tail[:1]!r} after the value of '{key}'")
        else:
            brace = rest.find("}", v0)
            consumed = brace if brace >= 0 else len(rest)
            value = rest[v0:consumed].strip()
            if not value:
                raise self.error(n, col + v0, f"key '{key}' has no value")
        try:
            self.blocks[block][key] = coerce(block, key, value)
        except ValueError as exc:
            raise self.error(n, col + v0, str(exc.args[0])) from None
        return consumed


def parse_tmem(text: str, source: str = "<tmem>") -> ModelSpec:
    r"""The ModelSpec a `.tmem` text describes.

    >>> spec = parse_tmem("model {\n  layers = 2\n  experts_per_layer = 4\n  hidden_size = 8\n"
    ...                   "  intermediate_size = 16\n}\ntile { intermediate_tile = 4 }\n")
    >>> spec.layers, spec.setting("tile", "intermediate_tile")
    (2, 4)
    """
    blocks = _Parser(text, source).parse()
    if "model" not in blocks:
        raise TmemSyntaxError(f"{source}:1:1: no 'model' block; every plan config needs one")
    model = blocks.pop("model")
    return build_spec(model, blocks, source)


def load_tmem(path: str | Path) -> ModelSpec:
    r"""Parse a `.tmem` file.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "plan.tmem")
    >>> _ = open(path, "w").write("model {\n  preset = olmoe-1b-7b\n  expert_budget = 8\n}\n")
    >>> load_tmem(path).experts_per_layer
    64
    """
    p = Path(path)
    if not p.is_file():
        raise TmemSyntaxError(f"plan config '{p}' does not exist.")
    return parse_tmem(p.read_text(encoding="utf-8"), str(p))


def format_tmem(spec: ModelSpec) -> str:
    """The `.tmem` text of `spec` (parses back to an equal spec).

    >>> import tilemem as TM
    >>> spec = TM.model_spec(name="d", layers=2, experts_per_layer=4, hidden_size=8, intermediate_size=16)
    >>> print(format_tmem(spec))
    # d: written by TileMEM
    model {
      name = d
      layers = 2
      experts_per_layer = 4
      hidden_size = 8
      intermediate_size = 16
    }
    <BLANKLINE>
    >>> parse_tmem(format_tmem(spec)) == spec
    True
    """
    out = [f"# {spec.name}: written by TileMEM"]
    for block, values in spec.to_dict().items():
        out.append(f"{block} {{")
        for key, value in values.items():
            if isinstance(value, bool):
                text = "on" if value else "off"
            elif isinstance(value, list):
                text = ", ".join(map(str, value))
            else:
                text = str(value)
                if any(c in text for c in '#}"') or text != text.strip():
                    text = f'"{text}"'  # values cannot hold '"'; spec strings never need it
            out.append(f"  {key} = {text}")
        out.append("}")
    return "\n".join(out) + "\n"
