"""Deterministic JSON (sorted keys), sha256 checksums and atomic writes for every plan artifact."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from tilemem.errors import ConfigError, TileMemError


def canonical(obj: Any) -> str:
    """Compact JSON with sorted keys: the text checksums are taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_of(obj: Any) -> str:
    """sha256 hex digest of `canonical(obj)`."""
    return hashlib.sha256(canonical(obj).encode()).hexdigest()


def with_checksum(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of `obj` with `checksum` = sha256 of everything else."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return {**body, "checksum": sha256_of(body)}


def checksum_ok(obj: dict[str, Any]) -> bool:
    """Whether `obj['checksum']` matches its other fields."""
    return obj.get("checksum") == sha256_of({k: v for k, v in obj.items() if k != "checksum"})


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to a temp file beside `path`, then rename it over `path` (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are 0600; O_EXCL with a random name keeps the usual umask permissions.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Indented, sorted-key JSON written atomically."""
    return write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: str | Path, what: str, error: type[TileMemError] = ConfigError) -> Any:
    """Parse a JSON file, raising `error` that names `what` and the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} '{path}' does not exist or is not a file.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{what} '{path}' is not valid JSON ({exc}).") from None


def read_json_object(
    path: str | Path, error: type[TileMemError] = ConfigError, fix: str = "fix or re-download it"
) -> dict:
    """A JSON file that must hold an object, as a dict; else `error` naming the file, what is wrong and `fix`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}); {fix}.") from None
    if not isinstance(data, dict):
        raise error(f"{path} is not a JSON object (it holds a {type(data).__name__}); {fix}.")
    return data
