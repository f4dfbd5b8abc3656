"""One request's state as it moves through the engine."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from tilemem.engine.sampling import SamplingParams

_ids = itertools.count()


class Status(Enum):
    """Where a sequence is in its lifecycle."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """Prompt, generated tokens, sampling state and timings of one request."""

    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    request_id: str = field(default_factory=lambda: f"seq-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    slot: int = -1
    """Row of the running batch (0..max_batch-1) while running, else -1: per-row state outside the KV cache."""
    cached: int = 0
    """Tokens whose keys/values are in the KV cache."""
    blocks: list[int] = field(default_factory=list)
    """Block table: the KV-cache blocks holding positions 0, bs, 2*bs, ... (`layers.kv_cache`)."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Chain hashes of this sequence's full blocks registered for prefix caching so far."""
    cached_prompt: int = 0
    """Prompt tokens found in the prefix cache at admission (not computed again)."""
    preemptions: int = 0
    """Times its KV blocks were taken back for other sequences (it was recomputed after each)."""
    text: str = ""
    """Detokenized output so far (after stop-string truncation)."""
    error: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def tokens(self) -> list[int]:
        """Prompt followed by output."""
        return self.prompt_ids + self.output_ids

    @property
    def length(self) -> int:
        """Tokens so far."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def pending(self) -> list[int]:
        """Tokens not yet in the KV cache (the whole prompt, or the last sampled token)."""
        return self.tokens[self.cached :]

    @property
    def finished(self) -> bool:
        """Whether generation has ended."""
        return self.status is Status.FINISHED
