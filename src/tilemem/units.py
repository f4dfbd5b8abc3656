"""Byte sizes as people write them (`20GiB`, `512MiB`, `1.5e9`) and back."""

from __future__ import annotations

import re

from tilemem.errors import BudgetError

UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str | int | float, what: str = "size") -> int:
    """`20GiB` -> 21474836480. Binary (KiB, MiB, GiB) and decimal (KB, MB, GB) units; bare = bytes."""
    if isinstance(text, bool):
        raise BudgetError(f"{what}: expected a byte size such as 8GiB, got {text!r}.")
    if isinstance(text, int | float):
        if text < 0:
            raise BudgetError(f"{what}: a byte size cannot be negative ({text}).")
        return int(text)
    m = _SIZE.match(str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise BudgetError(
            f"{what}: cannot read {text!r} as a byte size; write a number with an optional unit, "
            "e.g. 20GiB, 512MiB, 1.5GB or 1048576."
        )
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    """A short human-readable size: `1.50 GiB`, `12.0 KiB`, `17 B`."""
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}"
    return f"{n:.2f} TiB"
