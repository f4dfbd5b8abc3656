"""A workload: prompts (plain text or chat messages) with the number of tokens to generate.

`load_workload(name_or_path)` resolves a built-in name (`mixed`, `long_context`, `code`, `chat`)
or reads a JSONL file with one request per line:

    {"prompt": "def fib(n):", "max_tokens": 32}
    {"messages": [{"role": "user", "content": "Hi"}], "output_len": 16}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tilemem.errors import ConfigError

LENGTH_KEYS = ("max_tokens", "output_len", "max_new_tokens")


@dataclass(frozen=True)
class Request:
    """One profiling request."""

    prompt: str = ""
    """Prompt text (used when `messages` is empty)."""
    messages: tuple[tuple[str, str], ...] = ()
    """Chat messages as (role, content), rendered with the checkpoint's chat template."""
    max_new_tokens: int = 32
    """Tokens to generate greedily after the prompt."""


@dataclass(frozen=True)
class Workload:
    """A named list of requests."""

    name: str
    """Built-in name or file stem."""
    requests: tuple[Request, ...]
    """Requests, run in order (cycled until the token budget is spent)."""


def builtin_workloads() -> list[str]:
    """Names of the built-in workloads."""
    from tilemem.workloads.builtin import BUILTINS

    return list(BUILTINS)


def load_workload(spec: str | Path, seed: int = 0) -> Workload:
    """A built-in workload by name, or a JSONL file."""
    from tilemem.workloads.builtin import BUILTINS

    text = str(spec)
    if text in BUILTINS:
        return Workload(text, tuple(BUILTINS[text](seed)))
    path = Path(text)
    if path.suffix == ".jsonl" or path.exists():
        return read_jsonl(path)
    raise ConfigError(
        f"unknown workload '{text}': not a built-in ({', '.join(BUILTINS)}) and no such file; "
        'pass a built-in name or a .jsonl file of {"prompt": ..., "max_tokens": N} lines.'
    )


def read_jsonl(path: Path) -> Workload:
    """Requests from a JSONL file; errors name the line."""
    if not path.is_file():
        raise ConfigError(f"workload file '{path}' does not exist.")
    requests = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{where}: each line must be a JSON object with 'prompt' or 'messages'.")
        requests.append(_request(obj, where))
    if not requests:
        raise ConfigError(f"workload file '{path}' has no requests.")
    return Workload(path.stem, tuple(requests))


def _request(obj: dict, where: str) -> Request:
    length = next((obj[k] for k in LENGTH_KEYS if k in obj), 32)
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise ConfigError(f"{where}: the output length must be a non-negative integer, got {length!r}.")
    if "messages" in obj:
        msgs = obj["messages"]
        ok = isinstance(msgs, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        )
        if not ok or not msgs:
            raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings.")
        return Request(messages=tuple((m["role"], m["content"]) for m in msgs), max_new_tokens=length)
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ConfigError(f"{where}: needs a non-empty string 'prompt' (or 'messages').")
    return Request(prompt=prompt, max_new_tokens=length)
