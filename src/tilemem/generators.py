"""TileRT-style generator API: switch from TileRT by changing an import.

    from tilemem.generators import ShowHandsGenerator
    gen = ShowHandsGenerator(max_new_tokens=200, model_weights_dir=DIR, with_mtp=True)
    gen.from_pretrained()
    text = gen.generate("Tell me three jokes")   # streams, then prints `Accepted length: ...` with MTP

A thin layer over `tilemem.LLM`: `with_mtp=True` decodes speculatively with the checkpoint's MTP
layers. `model_weights_dir` may be a checkpoint or a tile store made by `python -m tilemem.convert`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tilemem.engine.llm import LLM
from tilemem.engine.sampling import SamplingParams


class ShowHandsGenerator:
    """Batch-1 generation with optional multi-token prediction, TileRT's interface."""

    def __init__(
        self,
        max_new_tokens: int = 1000,
        model_weights_dir: str | Path | None = None,
        with_mtp: bool = False,
        temperature: float = 0.0,
        num_draft: int = 3,
        dtype: str | None = None,
        threads: int | None = None,
        stream: bool = True,
    ) -> None:
        self.max_new_tokens = max_new_tokens
        self.model_weights_dir = Path(model_weights_dir) if model_weights_dir else None
        self.with_mtp = with_mtp
        self.temperature = temperature
        self.num_draft = num_draft
        self.dtype = dtype
        self.threads = threads
        self.stream = stream
        self.llm: LLM | None = None

    def checkpoint_dir(self) -> Path:
        """The checkpoint behind `model_weights_dir` (a tile store records where it came from)."""
        if self.model_weights_dir is None:
            raise ValueError("model_weights_dir is not set; pass the checkpoint (or converted store) directory.")
        meta = self.model_weights_dir / "store.json"
        if meta.exists():
            return Path(json.loads(meta.read_text())["checkpoint"])
        return self.model_weights_dir

    def from_pretrained(self) -> ShowHandsGenerator:
        """Load the model (and the MTP drafter when `with_mtp`)."""
        self.llm = LLM(
            self.checkpoint_dir(),
            dtype=self.dtype,
            threads=self.threads,
            max_batch=1,
            speculative="mtp" if self.with_mtp else None,
            num_draft=self.num_draft,
        )
        return self

    def generate(self, prompt: str) -> str:
        """Generate a completion, streaming it to stdout; print acceptance statistics with MTP."""
        if self.llm is None:
            self.from_pretrained()
        params = SamplingParams(max_tokens=self.max_new_tokens, temperature=self.temperature)
        parts = []
        for delta in self.llm.stream(prompt, params):
            parts.append(delta)
            if self.stream:
                sys.stdout.write(delta)
                sys.stdout.flush()
        if self.stream:
            sys.stdout.write("\n")
        if self.with_mtp and self.llm.speculator is not None:
            print(self.llm.speculator.stats.line())
        return "".join(parts)
