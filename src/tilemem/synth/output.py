"""Where `tilemem synth` may write, and how it replaces an earlier checkpoint without touching anything else.

A checkpoint synth wrote carries `tilemem_synth.json` (the marker) listing its files. An existing
output directory is replaced only if it is empty or holds nothing but a synth checkpoint's files;
otherwise synth refuses, unless told to overwrite, and even then it removes only its own files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from tilemem.errors import OutputExistsError

MARKER = "tilemem_synth.json"
"""The file every synthetic checkpoint carries: what made it and which files are its own."""

_OLD_SYNTH_FILES = re.compile(
    r"config\.json|generation_config\.json|tokenizer(_config)?\.json|special_tokens_map\.json"
    r"|model\.safetensors\.index\.json|model-\d{5}-of-\d{5}\.safetensors"
)
"""The files a synth checkpoint held before its marker listed them."""


def resolve_out(out: str | Path) -> Path:
    """`out` as an absolute path with a name (so `.` means the current directory, by name)."""
    path = Path(out).expanduser().resolve()
    if path.parent == path:
        raise OutputExistsError(f"cannot write a checkpoint to {path}: choose a directory below it with --out")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"--out {out}: {path} exists and is not a directory; choose another --out")
    return path


def own_files(out: Path) -> set[str]:
    """Names of the files in `out` that an earlier synth wrote (empty when `out` has no marker)."""
    marker = out / MARKER
    if not marker.is_file():
        return set()
    try:
        listed = json.loads(marker.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    if isinstance(listed, list) and all(isinstance(n, str) and "/" not in n for n in listed):
        return {*listed, MARKER}
    present = {p.name for p in out.iterdir() if p.is_file()}
    return {n for n in present if _OLD_SYNTH_FILES.fullmatch(n)} | {MARKER}


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an `out` that holds anything but a synth checkpoint's own files, unless `overwrite`."""
    if not out.is_dir() or overwrite:
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in own_files(out) or not p.is_file())
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputExistsError(
            f"--out {out} is not empty and is not a checkpoint tilemem synth wrote (it holds {shown}); "
            "choose a new or empty directory, or pass --overwrite to replace only the files synth writes"
        )


def staging_dir(out: Path) -> Path:
    """A fresh, uniquely named folder beside `out` to write the checkpoint into."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))


def install(tmp: Path, out: Path) -> None:
    """Move the finished checkpoint in `tmp` to `out`, removing only files an earlier synth wrote there."""
    if not out.exists():
        os.replace(tmp, out)
        return
    new = {p.name for p in tmp.iterdir()}
    for name in own_files(out) - new:  # an earlier synth's shards this one does not write
        (out / name).unlink(missing_ok=True)
    for name in sorted(new - {MARKER}) + [MARKER]:  # the marker last: it vouches for the rest
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)
