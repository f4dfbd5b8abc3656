"""Iteration-level scheduler: admit waiting sequences, give every row the KV-cache blocks its step needs, run one step.

A step carries one decode token for every running sequence that has finished its prompt, plus
prompt chunks of sequences still prefilling, at most `prefill_chunk` prompt tokens in all. A long
prompt is so spread over several steps and never stalls the running decodes.

KV memory is paged (`engine.kv_blocks.BlockPool`): a sequence holds blocks for the positions it has
computed, and gets more as it grows. At admission its prompt is looked up in the prefix cache; the blocks
found are shared, and only the rest is computed. When no block is left for a row, the youngest running
sequence is preempted: its blocks go back to the pool, and it waits at the head of the queue to be
recomputed (prompt and output so far, with the prefix cache's help) when blocks free up. Finished
sequences free their blocks at once.

With speculative decoding on, a decoding row's chunk is `[pending token] + drafts` (up to k drafts the
speculator proposes, within the room left before `max_len` and in max_tokens); `ScheduledBatch.drafts`
says which rows carry them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tilemem.engine.drafts import Draft, Speculation
from tilemem.engine.kv_blocks import DEFAULT_BLOCK_SIZE, ROOT, BlockPool, block_hash
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


class KVMemoryError(RuntimeError):
    """A sequence needs more KV blocks than the whole pool can ever hold."""


class Scheduler:
    """Waiting queue + running set over `slots` batch rows and a pool of KV-cache blocks."""

    def __init__(
        self,
        slots: int,
        prefill_chunk: int = 512,
        pool: BlockPool | None = None,
        max_len: int | None = None,
        grow: Callable[[int], bool] | None = None,
    ) -> None:
        self.free_slots = list(range(slots - 1, -1, -1))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefill_chunk = prefill_chunk
        """Most prompt tokens one step processes (over all prefilling rows)."""
        if pool is None:
            pool = BlockPool(slots * -(-(max_len or 4096) // DEFAULT_BLOCK_SIZE), DEFAULT_BLOCK_SIZE, False)
        self.pool = pool
        """The KV-cache blocks (default: `max_len` (4096) positions per row, no prefix caching)."""
        self.max_len = max_len
        """Positions one sequence may reach (bounds a row's drafts); None: unbounded."""
        self.grow = grow
        """Asked for `n` more blocks when the pool runs out; True if it grew the pool (and the cache)."""
        self.speculation: Speculation | None = None
        """Proposes drafts for decoding rows (speculative decoding), or None."""
        self.preemptions = 0
        """Sequences preempted (their blocks taken back) so far."""
        self.on_preempt: Callable[[Sequence], None] | None = None
        """Told about each preempted sequence (the engine drops its drafter state)."""
        self.on_error: Callable[[Sequence, str], None] | None = None
        """Told about a sequence that can never fit the pool (the engine fails it)."""

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        self.waiting.append(seq)

    def has_work(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    @property
    def lookahead(self) -> int:
        """Positions past a row's chunk the drafter writes (MTP drafts its k tokens into the cache)."""
        spec = self.speculation
        return spec.k + 1 if spec is not None and getattr(spec, "wants_hidden", False) else 0

    def schedule(self) -> ScheduledBatch | None:
        """The next batch: a decode token for every decoding row plus prompt chunks within the budget, each row
        with the blocks its new tokens need. Running sequences come first, oldest first (preempting the youngest
        when no block is left); waiting ones are admitted after them, in order, while blocks and budget last."""
        rows: list[tuple[Sequence, list[int], bool, Draft | None]] = []
        budget = self.prefill_chunk
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted for an older row of this step
            row = self._row(seq, budget)
            if row is not None and self._reserve(seq, seq.cached + len(row[1]) + self.lookahead):
                rows.append(row)
                budget -= len(row[1]) if row[2] else 0
        while self.waiting and self.free_slots and budget > 0 and (row := self._admit(budget, not rows)) is not None:
            rows.append(row)
            budget -= len(row[1]) if row[2] else 0
        if not rows:
            return None
        seqs, chunks, prefill, drafts = (list(x) for x in zip(*rows, strict=True))
        return ScheduledBatch(seqs, chunks, prefill, drafts)

    def _row(self, seq: Sequence, budget: int) -> tuple[Sequence, list[int], bool, Draft | None] | None:
        """`seq`'s row this step: (seq, new tokens, whether they are prompt tokens, drafts); None when it is
        prefilling and no prompt budget is left. Prompt tokens are everything not yet in the cache (a preempted
        sequence's output included), a decode row the last sampled token and its drafts."""
        left = len(seq.tokens) - seq.cached
        if left == 1 and seq.output_ids:
            draft = self._draft(seq)
            return seq, seq.tokens[seq.cached :] + (draft.tokens if draft is not None else []), False, draft
        if budget <= 0:
            return None
        return seq, seq.tokens[seq.cached : seq.cached + min(left, budget)], True, None

    def _admit(self, budget: int, alone: bool) -> tuple[Sequence, list[int], bool, Draft | None] | None:
        """Admit the first waiting sequence if the pool has blocks for its first chunk (after the cached blocks of
        its prefix, which it shares): its row, else None (it waits; when nothing else runs and even the whole
        budget cannot hold that chunk, it fails)."""
        seq = self.waiting[0]
        hits, hashes = self.pool.match(seq.tokens)
        cached = len(hits) * self.pool.block_size
        first = min(len(seq.tokens) - cached, budget)
        need = self.pool.blocks_for(cached + first + self.lookahead) - len(hits)
        held = sum(1 for b in hits if self.pool.refs[b] == 0)  # holding them takes them off the evictable list
        self._make_room(need + held)
        if need + held > self.pool.available:
            if alone and not self._grow(need + held - self.pool.available):
                self.waiting.popleft()
                self._fail(seq, cached + first + self.lookahead)
            return None
        self.waiting.popleft()
        self.pool.hold(hits)
        seq.blocks = list(hits) + self.pool.allocate(need)
        seq.block_hashes, seq.cached = list(hashes), cached
        if seq.preemptions == 0:
            seq.cached_prompt = min(cached, len(seq.prompt_ids))
            self.pool.stats.queried_tokens += len(seq.prompt_ids)
            self.pool.stats.hit_tokens += seq.cached_prompt
        seq.slot = self.free_slots.pop()
        seq.status = Status.RUNNING
        self.running.append(seq)
        row = self._row(seq, budget)  # a resumed sequence whose tokens were all cached but one decodes (drafts too)
        if row is None or not self._reserve(seq, seq.cached + len(row[1]) + self.lookahead):
            return None
        return row

    def _grow(self, n: int) -> bool:
        return self.grow is not None and self.grow(n)

    def _make_room(self, n: int) -> None:
        """Before `n` blocks are taken: grow the cache into its budget for what the free list lacks, so that cached
        prefix blocks are evicted only once the budget is reached."""
        if n > len(self.pool.free):
            self._grow(n - len(self.pool.free))

    def _fail(self, seq: Sequence, positions: int) -> None:
        """`seq` needs more positions than the whole KV budget holds: it fails (or, without a handler, raises)."""
        error = (
            f"the KV cache holds at most {self.pool.blocks * self.pool.block_size} positions here, and this "
            f"sequence needs {positions}; raise --kv-memory or lower --max-model-len."
        )
        if self.on_error is None:
            raise KVMemoryError(error)
        self.on_error(seq, error)

    def _reserve(self, seq: Sequence, positions: int) -> bool:
        """Give the running `seq` blocks for `positions` positions, preempting younger sequences (or `seq` itself,
        when it is the youngest) until the pool has them; False if `seq` was preempted or failed."""
        need = self.pool.blocks_for(positions) - len(seq.blocks)
        if need <= 0:
            return True
        while True:
            self._make_room(need)
            got = self.pool.allocate(need)
            if got is not None:
                seq.blocks += got
                return True
            victim = self.running[-1]
            if victim is seq and len(self.running) == 1:  # alone and still too big: it can never run
                self._fail(seq, positions)
                return False
            self.preempt(victim)
            if victim is seq:
                return False

    def preempt(self, seq: Sequence) -> None:
        """Take `seq`'s blocks back and queue it first, to be recomputed from its tokens so far."""
        self.pool.release(seq.blocks)
        seq.blocks, seq.block_hashes, seq.cached = [], [], 0
        seq.preemptions += 1
        self.preemptions += 1
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.free_slots.append(seq.slot)
        seq.slot = -1
        self.waiting.appendleft(seq)
        if self.on_preempt is not None:
            self.on_preempt(seq)

    def computed(self, seq: Sequence) -> None:
        """`seq.cached` advanced: register its newly full blocks for prefix caching."""
        bs = self.pool.block_size
        tokens = seq.tokens
        for i in range(len(seq.block_hashes), min(seq.cached // bs, len(seq.blocks))):
            parent = seq.block_hashes[-1] if seq.block_hashes else ROOT
            h = block_hash(parent, tokens[i * bs : (i + 1) * bs])
            self.pool.register(seq.blocks[i], h)
            seq.block_hashes.append(h)

    def _draft(self, seq: Sequence) -> Draft | None:
        """Drafts for a decoding row, within the room left before `max_len` and in its max_tokens."""
        if self.speculation is None:
            return None
        room = seq.params.max_tokens - len(seq.output_ids) - 1
        if self.max_len is not None:
            room = min(room, self.max_len - seq.cached - 1)
        return self.speculation.propose(seq, max(0, room))

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` and free its row and blocks."""
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []
