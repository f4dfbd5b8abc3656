"""Iteration-level scheduler: admit waiting sequences into free KV-cache slots, then decode.

Each step is either a prefill of newly admitted sequences (their prompts, possibly chunked) or one
decode token for every running sequence; finished sequences free their slot at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tilemem.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class ScheduledBatch:
    """What the model runs this step."""

    seqs: list[Sequence]
    """Rows of the batch."""
    chunks: list[list[int]]
    """New tokens of each row (a prompt chunk, or the last sampled token)."""
    is_prefill: bool
    """Whether this step processes prompt tokens."""


class Scheduler:
    """Waiting queue + running set over a fixed number of KV-cache slots."""

    def __init__(self, slots: int, prefill_chunk: int = 512) -> None:
        self.free_slots = list(range(slots - 1, -1, -1))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefill_chunk = prefill_chunk

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        self.waiting.append(seq)

    def has_work(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        """The next batch: prompts still being prefilled first, else one decode step for all."""
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop()
            seq.status = Status.RUNNING
            self.running.append(seq)
        prefilling = [s for s in self.running if s.cached < len(s.prompt_ids)]
        if prefilling:
            chunks = [s.prompt_ids[s.cached : s.cached + self.prefill_chunk] for s in prefilling]
            return ScheduledBatch(prefilling, chunks, True)
        if self.running:
            return ScheduledBatch(list(self.running), [s.pending for s in self.running], False)
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` and free its slot."""
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
        elif seq in self.waiting:
            self.waiting.remove(seq)
