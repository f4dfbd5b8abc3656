"""Text every machine has: the Python standard library's sources and docstrings.

Used to train the synthetic tokenizer and to build the built-in profiling workloads, so nothing is
downloaded. Deterministic: files are read in sorted order.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path


def stdlib_dir() -> Path:
    """The directory of the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(max_bytes: int = 4_000_000) -> Iterator[str]:
    """Source files of the standard library (no tests), up to about `max_bytes` in total."""
    total = 0
    for path in sorted(stdlib_dir().glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield text
        total += len(text)
        if total >= max_bytes:
            return


def docstrings(max_bytes: int = 2_000_000) -> Iterator[str]:
    """Module, class and function docstrings of the standard library: English prose."""
    total = 0
    for source in stdlib_sources(max_bytes * 8):
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    yield doc
                    total += len(doc)
                    if total >= max_bytes:
                        return
