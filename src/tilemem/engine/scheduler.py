"""Iteration-level scheduler: admit waiting sequences into free KV-cache slots, then run one step.

A step carries one decode token for every running sequence that has finished its prompt, plus
prompt chunks of sequences still prefilling, at most `prefill_chunk` prompt tokens in all. A long
prompt is so spread over several steps and never stalls the running decodes; finished sequences
free their slot at once, and waiting ones take it at the next step.
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
    prefill: list[bool]
    """Per row: whether its chunk is prompt tokens (else one decode token)."""

    @property
    def is_prefill(self) -> bool:
        """Whether this step processes any prompt tokens."""
        return any(self.prefill)

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens in this step."""
        return sum(len(c) for c, p in zip(self.chunks, self.prefill, strict=True) if p)

    @property
    def decode_tokens(self) -> int:
        """Decode tokens in this step (one per decoding row)."""
        return sum(len(c) for c, p in zip(self.chunks, self.prefill, strict=True) if not p)


class Scheduler:
    """Waiting queue + running set over a fixed number of KV-cache slots."""

    def __init__(self, slots: int, prefill_chunk: int = 512) -> None:
        self.free_slots = list(range(slots - 1, -1, -1))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefill_chunk = prefill_chunk
        """Most prompt tokens one step processes (over all prefilling rows)."""

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        self.waiting.append(seq)

    def has_work(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        """The next batch: a decode token for every decoding row plus prompt chunks within the budget."""
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop()
            seq.status = Status.RUNNING
            self.running.append(seq)
        seqs, chunks, prefill = [], [], []
        budget = self.prefill_chunk
        for seq in self.running:  # arrival order: the oldest prompt gets the budget first
            left = len(seq.prompt_ids) - seq.cached
            if left <= 0:
                seqs.append(seq)
                chunks.append(seq.pending)
                prefill.append(False)
            elif budget > 0:
                n = min(left, budget)
                budget -= n
                seqs.append(seq)
                chunks.append(seq.prompt_ids[seq.cached : seq.cached + n])
                prefill.append(True)
        return ScheduledBatch(seqs, chunks, prefill) if seqs else None

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` and free its slot."""
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
        elif seq in self.waiting:
            self.waiting.remove(seq)
