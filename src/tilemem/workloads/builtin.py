"""Built-in workloads drawn from the Python standard library's sources and docstrings: no download,
deterministic for a seed. Sizes are in characters; the profiler truncates prompts to its limit."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from tilemem.synth.corpus import docstrings, stdlib_sources
from tilemem.workloads.workload import Request

_DEF = re.compile(r"^(?:    )?def \w+\(", re.MULTILINE)


def _prose(n: int) -> list[str]:
    return list(docstrings(max_bytes=n))


def _code(n: int) -> list[str]:
    """Function definitions (with what follows, up to ~1500 chars) from stdlib sources."""
    out = []
    for src in stdlib_sources(max_bytes=n):
        starts = [m.start() for m in _DEF.finditer(src)]
        out.extend(src[s : s + 1500] for s in starts[::7])
    return out


def mixed(seed: int) -> list[Request]:
    """Prose and code prompts of varied length, short and medium outputs."""
    rng = random.Random(seed)
    prose, code = _prose(40_000), _code(300_000)
    reqs = []
    for i in range(24):
        pool = prose if i % 2 == 0 else code
        text = pool[rng.randrange(len(pool))]
        reqs.append(Request(prompt=text[: rng.randint(200, 1200)], max_new_tokens=rng.choice((16, 32, 64))))
    return reqs


def long_context(seed: int) -> list[Request]:
    """Long prompts (several concatenated sources) with short outputs."""
    rng = random.Random(seed)
    code, prose = _code(300_000), _prose(40_000)
    reqs = []
    for _ in range(6):
        parts = [rng.choice(code) for _ in range(3)] + [rng.choice(prose) for _ in range(3)]
        rng.shuffle(parts)
        reqs.append(Request(prompt="\n\n".join(parts), max_new_tokens=16))
    return reqs


def code(seed: int) -> list[Request]:
    """Code completion: a function head and body start, long outputs."""
    rng = random.Random(seed)
    pool = _code(300_000)
    return [
        Request(prompt=pool[rng.randrange(len(pool))][: rng.randint(150, 600)], max_new_tokens=64) for _ in range(16)
    ]


def chat(seed: int) -> list[Request]:
    """Chat turns asking about a docstring's subject, rendered with the chat template."""
    rng = random.Random(seed)
    prose = _prose(40_000)
    reqs = []
    for _ in range(16):
        doc = prose[rng.randrange(len(prose))]
        first = doc.split("\n\n")[0][:400]
        messages = (("system", "You are a helpful assistant."), ("user", f"Explain this, briefly:\n{first}"))
        reqs.append(Request(messages=messages, max_new_tokens=48))
    return reqs


BUILTINS: dict[str, Callable[[int], list[Request]]] = {
    "mixed": mixed,
    "long_context": long_context,
    "code": code,
    "chat": chat,
}
