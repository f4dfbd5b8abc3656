"""llama.cpp's own tools for tests: its HF->GGUF converter, `llama-quantize`, `llama-gguf-split`, `llama-tokenize`.

Tests that need them call `llamacpp_dir()`, which skips the test unless TILEMEM_LLAMACPP points at a build
made by `../shared/tools/build_llamacpp.sh DIR`. Outputs go wherever the caller says (a `tmp_path`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
SKIP_REASON = "set TILEMEM_LLAMACPP to a llama.cpp build made by ../shared/tools/build_llamacpp.sh DIR"


def llamacpp_dir() -> Path:
    """The llama.cpp build named by TILEMEM_LLAMACPP; skips the calling test when it is unset or incomplete."""
    value = os.environ.get("TILEMEM_LLAMACPP")
    if not value:
        pytest.skip(SKIP_REASON)
    root = Path(value)
    tools = ("convert_gguf.py", "bin/llama-quantize", "bin/llama-tokenize", "bin/llama-gguf-split")
    missing = [p for p in tools if not (root / p).exists()]
    if missing:
        pytest.skip(f"TILEMEM_LLAMACPP={root} lacks {', '.join(missing)}; {SKIP_REASON}")
    return root


def _run(cmd: list[str], what: str, timeout: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return done


def convert(ckpt_dir: Path, out_gguf: Path, outtype: str = "f32", timeout: float = 300) -> Path:
    """`ckpt_dir` (a Hugging Face checkpoint) converted by llama.cpp's convert_hf_to_gguf.py to `out_gguf`."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: one of {OUTTYPES}")
    script = llamacpp_dir() / "convert_gguf.py"
    cmd = [sys.executable, str(script), str(ckpt_dir), "--outtype", outtype, "--outfile", str(out_gguf)]
    _run(cmd, "llama.cpp's converter", timeout)
    return out_gguf


def quantize(src: Path, dst: Path, qtype: str, threads: int = 2, timeout: float = 300) -> Path:
    """`src` (a GGUF file) quantized by `llama-quantize` to `qtype` (Q8_0, Q4_K_M, Q6_K, ...) as `dst`."""
    cmd = [str(llamacpp_dir() / "bin" / "llama-quantize"), str(src), str(dst), qtype, str(threads)]
    _run(cmd, "llama-quantize", timeout)
    return dst


def split(src: Path, out_prefix: Path, max_tensors: int, timeout: float = 300) -> list[Path]:
    """`src` cut by `llama-gguf-split` into parts of at most `max_tensors` tensors: OUT_PREFIX-0000i-of-0000N.gguf
    (the metadata in the first); returns the parts in order."""
    cmd = [str(llamacpp_dir() / "bin" / "llama-gguf-split"), "--split", "--split-max-tensors", str(max_tensors)]
    _run([*cmd, str(src), str(out_prefix)], "llama-gguf-split", timeout)
    return sorted(out_prefix.parent.glob(f"{out_prefix.name}-*-of-*.gguf"))


def tokenize(gguf_file: Path, text: str, tmp_dir: Path, timeout: float = 60) -> list[int]:
    """llama.cpp's token ids of `text` in `gguf_file` (`llama-tokenize`: no BOS, special tokens parsed)."""
    prompt = tmp_dir / "llama_tokenize_prompt.txt"
    prompt.write_bytes(text.encode("utf-8"))  # -f keeps a trailing newline; --no-escape keeps a literal \\n
    cmd = [str(llamacpp_dir() / "bin" / "llama-tokenize"), "-m", str(gguf_file), "-f", str(prompt)]
    done = _run([*cmd, "--ids", "--no-bos", "--no-escape", "--log-disable"], "llama-tokenize", timeout)
    line = done.stdout.strip().splitlines()[-1]
    return [int(t) for t in line.strip("[]").split(",") if t.strip()]
