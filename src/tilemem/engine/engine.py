"""The engine loop: schedule, run the model, post-process (sample, detokenize, stop).

`step()` returns one StepEvent per sequence that produced a token (or failed) this iteration; the
LLM facade and the server both drive it. Speculative decoding runs inside the same step: the
scheduler appends drafts to decoding rows, the one forward path scores them, post-processing verifies
them and appends the accepted tokens (`tilemem.engine.drafts`).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import torch

from tilemem.engine.drafts import Draft, Speculation
from tilemem.engine.kv_blocks import BlockPool, KVSettings
from tilemem.engine.sampling import sample
from tilemem.engine.scheduler import ScheduledBatch, Scheduler
from tilemem.engine.sequence import Sequence
from tilemem.engine.tokenizer import IncrementalDecoder, TextTokenizer
from tilemem.errors import ConfigError, TileMemError
from tilemem.layers.kv_cache import ForwardContext
from tilemem.units import format_bytes

log = logging.getLogger(__name__)


@dataclass
class StepEvent:
    """One new token (and text delta) of one sequence, or its failure."""

    seq: Sequence
    token_id: int | None
    text: str
    finished: bool


@dataclass
class StepStats:
    """Counters of one engine step."""

    is_prefill: bool
    batch: int
    tokens: int
    seconds: float
    runtime: dict[str, float] | None = None
    """Tiered-runtime counters of this step (bytes per tier, hits, misses, stall, prefetch)."""
    prefill_tokens: int = 0
    """Prompt tokens of this step."""
    decode_tokens: int = 0
    """Decode tokens of this step (a step may carry both)."""

    def as_dict(self) -> dict[str, float]:
        """Plain numbers, tok/s included."""
        d = {"prefill": self.is_prefill, "batch": self.batch, "tokens": self.tokens, "seconds": self.seconds}
        d |= {"prefill_tokens": self.prefill_tokens, "decode_tokens": self.decode_tokens}
        d["tok_s"] = self.tokens / self.seconds if self.seconds else 0.0
        return {**d, **(self.runtime or {})}


@dataclass
class RowOutput:
    """What the forward pass gives one row of the batch."""

    logits: torch.Tensor
    """[V] at the row's last token; [T, V] at every token of a row carrying drafts (on the CPU)."""
    hidden: torch.Tensor | None = None
    """Final hidden states [T, D] of every token of the row, when the drafter reads them."""


@dataclass
class StepOutput:
    """The forward pass of one step: per-row outputs, time per phase, failed rows."""

    rows: dict[int, RowOutput] = field(default_factory=dict)
    """Row -> its output (rows whose forward failed are absent)."""
    failed: dict[int, str] = field(default_factory=dict)
    """Row -> error message of its failed forward."""
    prefill_s: float = 0.0
    """Seconds of the prompt-chunk pass."""
    decode_s: float = 0.0
    """Seconds of the decode pass (drafted rows included)."""


@dataclass
class EngineCounters:
    """Totals since the engine (or the last reset) started."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    steps: list[StepStats] = field(default_factory=list)


PADDING_WASTE = 1.5
"""A prompt pass pads every row to its longest chunk: rows are split into passes whose padded tokens stay within
this factor of their real tokens (a 2,000-token chunk beside twenty short ones would otherwise compute 40,000)."""


def padding_groups(rows: list[int], lengths: list[int]) -> list[list[int]]:
    """`rows` (with chunk `lengths`) in passes, longest chunks first, each padded to at most PADDING_WASTE x its
    real tokens."""
    groups: list[tuple[int, int, list[int]]] = []  # (longest chunk, real tokens, rows)
    for j in sorted(range(len(rows)), key=lambda j: -lengths[j]):
        if groups:
            top, real, group = groups[-1]
            if (len(group) + 1) * top <= PADDING_WASTE * (real + lengths[j]):
                group.append(rows[j])
                groups[-1] = (top, real + lengths[j], group)
                continue
        groups.append((lengths[j], lengths[j], [rows[j]]))
    return [g for _, _, g in groups]


class Engine:
    """Owns the model, its KV cache and the scheduler; advances every request one step at a time."""

    def __init__(
        self,
        model,
        tokenizer: TextTokenizer | None,
        eos_ids: tuple[int, ...],
        max_batch: int = 8,
        max_model_len: int = 2048,
        prefill_chunk: int = 512,
        runtime=None,
        speculator: Speculation | None = None,
        leader=None,
        kv: KVSettings | None = None,
    ) -> None:
        self.model = model
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.max_model_len = max_model_len
        self.max_batch = max_batch
        self.leader = leader
        """Expert parallelism on rank 0 (`engine.ranks.Leader`): the other ranks mirror every cache and forward."""
        kv = kv or KVSettings()
        bs = kv.block_size
        block_bytes = model.kv_block_bytes(bs)
        self.max_blocks = kv.limit_blocks(block_bytes, max_batch, max_model_len)
        """Most KV blocks the cache may grow to (its memory budget)."""
        spare = speculator.k + 2 if speculator is not None else 0  # drafts verified past max_model_len
        if self.max_blocks * bs < max_model_len + spare:
            raise ConfigError(
                f"KV memory for {self.max_blocks * bs} tokens cannot hold one sequence of --max-model-len "
                f"{max_model_len}; raise --kv-memory (a {bs}-token block costs "
                f"{format_bytes(block_bytes)}) or lower --max-model-len."
            )
        blocks = min(self.max_blocks, -(-(max_model_len + spare) // bs))  # one sequence; grows as more need it
        if leader is not None:
            leader.allocate(blocks, bs)
        self.cache = model.allocate_paged(blocks, bs)
        self.pool = BlockPool(blocks, bs, prefix_caching=kv.prefix_caching)
        self.scheduler = Scheduler(max_batch, prefill_chunk, self.pool, max_model_len, self._grow)
        self.scheduler.on_preempt = self._preempted
        self.scheduler.on_error = lambda seq, error: self._refused.append(self._fail(seq, error))
        self._refused: list[StepEvent] = []
        """Sequences the scheduler failed (too long for the whole KV budget): reported with the next step's events."""
        self.speculator = speculator
        self.decoders: dict[str, IncrementalDecoder] = {}
        self.emitted: dict[str, int] = {}
        self.counters = EngineCounters()

    def _grow(self, n: int) -> bool:
        """Grow the KV cache by at least `n` blocks (doubling, within `max_blocks`); False at the limit."""
        have = self.pool.blocks
        if have >= self.max_blocks:
            return False
        blocks = min(self.max_blocks, max(have + n, 2 * have))
        if self.leader is not None:
            self.leader.grow(blocks)
        self.cache = self.cache.grown(blocks)
        self.pool.grow(blocks)
        return True

    def _preempted(self, seq: Sequence) -> None:
        """A preempted sequence starts its drafts over when it resumes."""
        if self.speculator is not None:
            self.speculator.release(seq)

    def kv_stats(self) -> dict[str, float]:
        """KV-cache and prefix-cache figures: blocks in use and held, bytes, hit rate, preemptions."""
        p = self.pool
        return {
            "kv_block_size": p.block_size,
            "kv_blocks": p.blocks,
            "kv_blocks_max": self.max_blocks,
            "kv_blocks_used": p.used,
            "kv_blocks_cached": p.cached,
            "kv_bytes": self.cache.nbytes(),
            "kv_bytes_used": p.used * self.cache.block_bytes(),
            "prefix_queried_tokens": p.stats.queried_tokens,
            "prefix_hit_tokens": p.stats.hit_tokens,
            "prefix_hit_rate": p.stats.hit_rate,
            "prefix_evictions": p.stats.evictions,
            "preemptions": self.scheduler.preemptions,
        }

    @property
    def speculator(self) -> Speculation | None:
        """Speculative decoding policy (`tilemem.speculative.Speculator`), or None: plain decoding."""
        return self.scheduler.speculation

    @speculator.setter
    def speculator(self, speculator: Speculation | None) -> None:
        self.scheduler.speculation = speculator  # the scheduler asks it for drafts

    def add(self, seq: Sequence) -> None:
        """Queue a request."""
        if self.tokenizer is not None:
            self.decoders[seq.request_id] = IncrementalDecoder(self.tokenizer)
        self.emitted[seq.request_id] = 0
        self.scheduler.add(seq)

    def abort(self, seq: Sequence, reason: str = "abort") -> None:
        """Cancel a request and free its KV-cache slot at once."""
        if not seq.finished:
            self._finish(seq, reason)

    def forget(self, seq: Sequence) -> None:
        """Drop the per-request state kept after `seq` finished (a long-running server calls this)."""
        if seq.finished:
            self.emitted.pop(seq.request_id, None)
            self.decoders.pop(seq.request_id, None)

    def released_text(self, seq: Sequence) -> str:
        """The part of `seq.text` given out so far (text that may begin a stop string is held back)."""
        return seq.text[: self.emitted.get(seq.request_id, 0)]

    def has_work(self) -> bool:
        """Whether any request is waiting or running."""
        return self.scheduler.has_work()

    def step(self) -> list[StepEvent]:
        """Run one iteration: schedule (drafts included), one forward path, post-process (verification included)."""
        if self.runtime is not None:
            self.runtime.between_steps()  # async planning migrates tiles here, never mid-step
        t0 = time.perf_counter()
        before = copy.copy(self.runtime.counters) if self.runtime is not None else None
        batch = self.scheduler.schedule()
        refused, self._refused = self._refused, []
        if batch is None:
            return refused
        out = self._forward(batch)
        events = refused + [self._fail(batch.seqs[i], error) for i, error in out.failed.items()]
        post, drafted_tokens = self._postprocess(batch, out)
        events += post
        dt = time.perf_counter() - t0
        rt = self.runtime.counters.minus(before).as_dict() if before is not None else None
        pt = batch.prefill_tokens
        plain_rows = sum(1 for i, p in enumerate(batch.prefill) if not p and batch.draft(i) is None)
        dtok = plain_rows + drafted_tokens
        self.counters.steps.append(StepStats(batch.is_prefill, len(batch.seqs), pt + dtok, dt, rt, pt, dtok))
        self.counters.prefill_tokens += pt
        self.counters.prefill_seconds += out.prefill_s
        self.counters.decode_tokens += dtok
        if batch.speculative:  # drafting and verification are part of the decode time
            self.counters.decode_seconds += dt - out.prefill_s
            self.speculator.record_step(drafted_tokens, out.decode_s, dt - out.prefill_s)
        else:
            self.counters.decode_seconds += out.decode_s
        return events

    def _forward(self, batch: ScheduledBatch) -> StepOutput:
        """Run every row of `batch`: logits at each row's last new token (at every token of a row with drafts),
        seconds spent on prefill and decode rows, and the rows whose forward failed.

        Prompt chunks and decode rows (one token, plus drafts) run as separate passes: in one padded pass
        every decode row would cost as much as the longest chunk."""
        out = StepOutput()
        for phase in (True, False):
            rows = [i for i, p in enumerate(batch.prefill) if p is phase]
            if not rows:
                continue
            t0 = time.perf_counter()
            for group in padding_groups(rows, [len(batch.chunks[i]) for i in rows]) if phase else [rows]:
                for idx, outputs in self._run_isolated(batch, group, out.failed):
                    out.rows.update(zip(idx, outputs, strict=True))
            if phase:
                out.prefill_s += time.perf_counter() - t0
            else:
                out.decode_s += time.perf_counter() - t0
        return out

    def _run_isolated(self, batch: ScheduledBatch, rows: list[int], failed: dict[int, str]) -> list[tuple]:
        """Run `rows` in one pass; if it fails, row by row, so one bad request fails alone rather than
        taking its batch-mates down (a failed row's error goes to `failed`). Returns (rows, outputs) pairs."""
        try:
            return [(rows, self._run_rows(batch, rows))]
        except Exception as exc:  # a failing forward must not take the engine down
            if self.leader is not None:  # the other ranks ran (or wait in) this pass: no retry can line up with them
                raise
            if len(rows) == 1:
                if isinstance(exc, TileMemError):  # bad input or data, said in the row's error: no traceback
                    log.info("forward pass failed: %s", exc)
                    failed[rows[0]] = str(exc)
                    return []
                log.exception("forward pass failed")
                failed[rows[0]] = f"{type(exc).__name__}: {exc}"
                return []
            log.warning("forward pass of %d rows failed (%s); retrying row by row", len(rows), exc)
        parts = []
        for i in rows:
            parts += self._run_isolated(batch, [i], failed)
        return parts

    def _run_rows(self, batch: ScheduledBatch, rows: list[int]) -> list[RowOutput]:
        """One model pass over the given rows of `batch`."""
        seqs = [batch.seqs[i] for i in rows]
        chunks = [batch.chunks[i] for i in rows]
        lengths = [len(c) for c in chunks]
        ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        for i, chunk in enumerate(chunks):
            ids[i, : len(chunk)] = torch.tensor(chunk)
        tables, starts = [s.blocks for s in seqs], [s.cached for s in seqs]
        ctx = ForwardContext.paged(self.cache, tables, starts, lengths)
        last = torch.tensor(lengths) - 1  # [R]
        every = any(batch.draft(i) is not None for i in rows)  # drafts are verified at every position
        kw = {"return_hidden": True} if self.speculator is not None and self.speculator.wants_hidden else {}
        logits_at = None if every else last
        if self.leader is not None:
            self.leader.forward(ids, tables, starts, lengths, logits_at, bool(kw))
        res = self.model(ids, ctx, logits_at=logits_at, **kw)
        logits, hidden = res if kw else (res, None)  # [R, T, V] or [R, V]; [R, T, D]
        logits = logits.cpu()  # sampling and verification run on the CPU
        outputs = []
        for r, i in enumerate(rows):
            n = lengths[r]
            if batch.draft(i) is not None:
                row = logits[r, :n]  # [n, V]: the pending token and every draft
            else:
                row = logits[r, n - 1] if every else logits[r]  # [V]
            outputs.append(RowOutput(row, hidden[r, :n] if hidden is not None else None))  # hidden [n, D]
        return outputs

    def _fail(self, seq: Sequence, error: str) -> StepEvent:
        """End `seq` with finish reason "error"."""
        seq.error = error
        self._finish(seq, "error")
        return StepEvent(seq, None, "", True)

    def _postprocess(self, batch: ScheduledBatch, out: StepOutput) -> tuple[list[StepEvent], int]:
        """Advance each row that ran: sample its next token (a prompt's last chunk, a decode row) or verify its
        drafts. Returns the events and the tokens rows with drafts produced."""
        events, drafted_tokens = [], 0
        for i, seq in enumerate(batch.seqs):
            row = out.rows.get(i)
            if row is None:  # its forward failed
                continue
            try:
                draft = batch.draft(i)
                if draft is not None:
                    produced = self._verify_row(seq, draft, row)
                    drafted_tokens += len(produced)
                    events += produced
                    continue
                start = seq.cached
                seq.cached += len(batch.chunks[i])
                if seq.finished:
                    continue  # aborted meanwhile
                self.scheduler.computed(seq)
                if seq.cached >= len(seq.tokens):
                    events.append(self._emit_token(seq, row.logits))
                if row.hidden is not None and not seq.finished:  # a prompt chunk the drafter reads
                    self.speculator.observe_prompt(seq, row.hidden, start, self.cache)
            except Exception as exc:  # e.g. a sampler error: fail this request only
                log.exception("post-processing %s failed", seq.request_id)
                events.append(self._fail(seq, f"{type(exc).__name__}: {exc}"))
        return events, drafted_tokens

    def _verify_row(self, seq: Sequence, draft: Draft, row: RowOutput) -> list[StepEvent]:
        """Verify a decode row's drafts: append the accepted ones and one target token, and advance
        `seq.cached` past the pending token and the accepted drafts (rejected KV rows are overwritten later)."""
        if seq.finished:
            return []  # aborted meanwhile
        tokens = self.speculator.verify(seq, draft, row.logits, row.hidden, self.cache)
        seq.cached += len(tokens)  # the pending token + the accepted drafts
        self.scheduler.computed(seq)
        events = []
        for j, token in enumerate(tokens):
            text = self.append_token(seq, token, row.logits[j])
            events.append(StepEvent(seq, token, text, seq.finished))
            if seq.finished:
                break
        return events

    def _emit_token(self, seq: Sequence, logits: torch.Tensor) -> StepEvent:
        """Sample from one row's logits [V] and add the token to `seq`."""
        token = sample(logits, seq.params, seq.generator)
        text = self.append_token(seq, token, logits)
        return StepEvent(seq, token, text, seq.finished)

    def append_token(self, seq: Sequence, token: int, logits: torch.Tensor | None = None) -> str:
        """Add a sampled token to `seq`: logprobs, detokenization, stop conditions. Returns the text delta."""
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        seq.output_ids.append(token)
        if seq.params.logprobs is not None and logits is not None:
            self._record_logprobs(seq, logits, token)
        text = self._detokenize(seq, token)
        reason = self._stop_reason(seq, token)
        if reason:
            if seq.finish_reason != "stop":  # not cut at a stop string: nothing more will come, so
                seq.text += self._held_back(seq)  # show bytes held for an unfinished character
            self._finish(seq, reason)
            text += self._flush(seq)
        return text

    def _record_logprobs(self, seq: Sequence, logits: torch.Tensor, token: int) -> None:
        lp = torch.log_softmax(logits, dim=-1)
        seq.logprobs.append(float(lp[token]))
        k = min(seq.params.logprobs or 0, lp.shape[-1])
        if k:
            vals, idx = torch.topk(lp, k)
            seq.top_logprobs.append({int(j): float(v) for v, j in zip(vals, idx, strict=True)})

    def _detokenize(self, seq: Sequence, token: int) -> str:
        """Append the token's text; return what may be shown now (held back near a stop string)."""
        dec = self.decoders.get(seq.request_id)
        if dec is None:
            return ""
        if token in self.eos_ids and not seq.params.ignore_eos:
            return ""
        seq.text += dec.push(token)
        for stop in seq.params.stop:
            at = seq.text.find(stop)
            if at >= 0:
                seq.text = seq.text[:at]
                seq.finish_reason = "stop"
        hold = max((len(s) for s in seq.params.stop), default=1) - 1
        safe = max(len(seq.text) - hold, self.emitted[seq.request_id])
        if seq.finish_reason == "stop":
            safe = len(seq.text)
        return self._emit(seq, safe)

    def _held_back(self, seq: Sequence) -> str:
        dec = self.decoders.get(seq.request_id)
        return dec.flush() if dec is not None else ""

    def _emit(self, seq: Sequence, upto: int) -> str:
        start = self.emitted[seq.request_id]
        self.emitted[seq.request_id] = max(start, upto)
        return seq.text[start:upto]

    def _flush(self, seq: Sequence) -> str:
        return self._emit(seq, len(seq.text))

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        if seq.finish_reason == "stop":
            return "stop"
        if token in self.eos_ids and not seq.params.ignore_eos:
            return "stop"
        if token in seq.params.stop_token_ids:
            return "stop"
        if len(seq.output_ids) >= seq.params.max_tokens or seq.length >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        seq.finish_time = time.perf_counter()
        self.decoders.pop(seq.request_id, None)
        if self.speculator is not None:
            self.speculator.release(seq)
