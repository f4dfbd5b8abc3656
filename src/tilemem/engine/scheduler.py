"""Iteration-level scheduler: admit waiting sequences into free KV-cache slots, then run one step.

A step carries one decode token for every running sequence that has finished its prompt, plus
prompt chunks of sequences still prefilling, at most `prefill_chunk` prompt tokens in all. A long
prompt is so spread over several steps and never stalls the running decodes; finished sequences
free their slot at once, and waiting ones take it at the next step.

With speculative decoding on, a decoding row's chunk is `[pending token] + drafts` (up to k drafts the
speculator proposes, within the room left in the row's KV-cache slot); `ScheduledBatch.drafts` says
which rows carry them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tilemem.engine.drafts import Draft, Speculation
from tilemem.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class ScheduledBatch:
    """What the model runs this step."""

    seqs: list[Sequence]
    """Rows of the batch."""
    chunks: list[list[int]]
    """New tokens of each row (a prompt chunk, or the last sampled token followed by its drafts)."""
    prefill: list[bool]
    """Per row: whether its chunk is prompt tokens (else a decode row)."""
    drafts: list[Draft | None] = field(default_factory=list)
    """Per row: the drafts its chunk ends with (decode rows of a speculative engine), else None."""

    def draft(self, row: int) -> Draft | None:
        """The drafts row `row` carries (None: a plain row, its logits are wanted at its last token)."""
        return self.drafts[row] if self.drafts else None

    @property
    def speculative(self) -> bool:
        """Whether any row carries drafts (an empty draft list included: it is verified all the same)."""
        return any(d is not None for d in self.drafts)

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
        """Decode tokens in this step (one per decoding row; drafts not counted)."""
        return sum(1 for p in self.prefill if not p)


class Scheduler:
    """Waiting queue + running set over a fixed number of KV-cache slots."""

    def __init__(self, slots: int, prefill_chunk: int = 512, slot_length: int | None = None) -> None:
        self.free_slots = list(range(slots - 1, -1, -1))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefill_chunk = prefill_chunk
        """Most prompt tokens one step processes (over all prefilling rows)."""
        self.slot_length = slot_length
        """Tokens one KV-cache slot holds (bounds a row's drafts); None: unbounded."""
        self.speculation: Speculation | None = None
        """Proposes drafts for decoding rows (speculative decoding), or None."""

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
        seqs, chunks, prefill, drafts = [], [], [], []
        budget = self.prefill_chunk
        for seq in self.running:  # arrival order: the oldest prompt gets the budget first
            left = len(seq.prompt_ids) - seq.cached
            if left <= 0:
                draft = self._draft(seq)
                seqs.append(seq)
                chunks.append(seq.pending + (draft.tokens if draft is not None else []))
                prefill.append(False)
                drafts.append(draft)
            elif budget > 0:
                n = min(left, budget)
                budget -= n
                seqs.append(seq)
                chunks.append(seq.prompt_ids[seq.cached : seq.cached + n])
                prefill.append(True)
                drafts.append(None)
        if not seqs:
            return None
        return ScheduledBatch(seqs, chunks, prefill, drafts)

    def _draft(self, seq: Sequence) -> Draft | None:
        """Drafts for a decoding row, within the room left in its slot and in its max_tokens."""
        if self.speculation is None:
            return None
        room = seq.params.max_tokens - len(seq.output_ids) - 1
        if self.slot_length is not None:
            room = min(room, self.slot_length - seq.cached - 1)
        return self.speculation.propose(seq, max(0, room))

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` and free its slot."""
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
        elif seq in self.waiting:
            self.waiting.remove(seq)
