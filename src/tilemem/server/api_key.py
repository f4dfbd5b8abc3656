"""Where `tilemem serve` takes its API key from: a file, the environment, or the command line.

A key on the command line is visible to every user of the machine (`ps`), so a file
(`--api-key-file`) or the `TILEMEM_API_KEY` variable is the better place. An empty key is always an
error (an unset shell variable in `--api-key "$KEY"` must not turn authentication off).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from tilemem.errors import ConfigError

API_KEY_ENV = "TILEMEM_API_KEY"
"""Environment variable read when neither --api-key nor --api-key-file is given."""


def resolve_api_key(flag: str | None, file: str | Path | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The API key from `--api-key`, `--api-key-file` or `$TILEMEM_API_KEY` (in that order; giving both
    flags is an error); None when none of them is given. Raises ConfigError for an empty key."""
    environ = os.environ if environ is None else environ
    if flag is not None and file is not None:
        raise ConfigError("give either --api-key or --api-key-file, not both.")
    if flag is not None:
        key, where = flag, "--api-key"
    elif file is not None:
        key, where = _read_key_file(Path(file)), f"--api-key-file {file}"
    elif API_KEY_ENV in environ:
        key, where = environ[API_KEY_ENV], f"${API_KEY_ENV}"
    else:
        return None
    if not key.strip():
        raise ConfigError(
            f"the API key from {where} is empty, which would turn authentication off; give a non-empty key, "
            f"or give no key at all (no --api-key, no --api-key-file, {API_KEY_ENV} unset) to serve without one."
        )
    if key != key.strip() or any(c in key for c in "\r\n"):
        raise ConfigError(f"the API key from {where} has leading/trailing whitespace or a line break; remove it.")
    return key


def _read_key_file(path: Path) -> str:
    """The key in `path`: its text without the final line break."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--api-key-file {path}: no such file.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--api-key-file {path}: cannot read it ({exc}).") from None
    return text.removesuffix("\n").removesuffix("\r")
