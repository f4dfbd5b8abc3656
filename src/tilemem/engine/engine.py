"""The engine loop: schedule, run the model, post-process (sample, detokenize, stop).

`step()` returns one StepEvent per sequence that produced a token (or failed) this iteration; the
LLM facade and the server both drive it.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import torch

from tilemem.engine.sampling import sample
from tilemem.engine.scheduler import ScheduledBatch, Scheduler
from tilemem.engine.sequence import Sequence
from tilemem.engine.tokenizer import IncrementalDecoder, TextTokenizer
from tilemem.layers.kv_cache import ForwardContext

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
class EngineCounters:
    """Totals since the engine (or the last reset) started."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    steps: list[StepStats] = field(default_factory=list)


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
    ) -> None:
        self.model = model
        self.runtime = runtime
        self.speculator = None  # tilemem.spec.Speculator: decode steps verify drafts instead
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.max_model_len = max_model_len
        self.cache = model.allocate_cache(max_batch, max_model_len)
        self.scheduler = Scheduler(max_batch, prefill_chunk)
        self.decoders: dict[str, IncrementalDecoder] = {}
        self.emitted: dict[str, int] = {}
        self.counters = EngineCounters()

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
        """Run one iteration."""
        if self.runtime is not None:
            self.runtime.between_steps()  # async planning migrates tiles here, never mid-step
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        if self.speculator is not None and not batch.is_prefill:
            return self.speculator.step(self, batch.seqs)
        t0 = time.perf_counter()
        before = copy.copy(self.runtime.counters) if self.runtime is not None else None
        logits, seconds, failed = self._forward(batch)  # [B, V], (prefill s, decode s), row -> error
        events = [self._fail(batch.seqs[i], error) for i, error in failed.items()]
        events += self._postprocess(batch, logits, skip=failed.keys())
        dt = time.perf_counter() - t0
        rt = self.runtime.counters.minus(before).as_dict() if before is not None else None
        pt, dtok = batch.prefill_tokens, batch.decode_tokens
        self.counters.steps.append(StepStats(batch.is_prefill, len(batch.seqs), pt + dtok, dt, rt, pt, dtok))
        self.counters.prefill_tokens += pt
        self.counters.prefill_seconds += seconds[0]
        self.counters.decode_tokens += dtok
        self.counters.decode_seconds += seconds[1]
        return events

    def _forward(self, batch: ScheduledBatch) -> tuple[torch.Tensor, tuple[float, float], dict[int, str]]:
        """Logits [B, V] at each row's last new token, seconds spent on (prefill, decode) rows, and the
        rows whose forward failed (row -> error message).

        Prompt chunks and decode rows (one token each) run as separate passes: in one padded pass every
        decode row would cost as much as the longest chunk."""
        logits: torch.Tensor | None = None
        seconds = {True: 0.0, False: 0.0}
        failed: dict[int, str] = {}
        for phase in (True, False):
            rows = [i for i, p in enumerate(batch.prefill) if p is phase]
            if not rows:
                continue
            t0 = time.perf_counter()
            for idx, out in self._run_isolated(batch, rows, failed):
                if logits is None:
                    logits = out.new_zeros(len(batch.seqs), out.shape[-1])
                logits[idx] = out  # [len(idx), V]
            seconds[phase] += time.perf_counter() - t0
        if logits is None:
            logits = torch.zeros(len(batch.seqs), 1)
        return logits, (seconds[True], seconds[False]), failed

    def _run_isolated(self, batch: ScheduledBatch, rows: list[int], failed: dict[int, str]) -> list[tuple]:
        """Run `rows` in one pass; if it fails, row by row, so one bad request fails alone rather than
        taking its batch-mates down (a failed row's error goes to `failed`). Returns (rows, logits) pairs."""
        try:
            return [(rows, self._run_rows(batch, rows))]
        except Exception as exc:  # a failing forward must not take the engine down
            if len(rows) == 1:
                log.exception("forward pass failed")
                failed[rows[0]] = f"{type(exc).__name__}: {exc}"
                return []
            log.warning("forward pass of %d rows failed (%s); retrying row by row", len(rows), exc)
        parts = []
        for i in rows:
            parts += self._run_isolated(batch, [i], failed)
        return parts

    def _run_rows(self, batch: ScheduledBatch, rows: list[int]) -> torch.Tensor:
        """One model pass over the given rows of `batch`: logits [len(rows), V]."""
        seqs = [batch.seqs[i] for i in rows]
        chunks = [batch.chunks[i] for i in rows]
        lengths = [len(c) for c in chunks]
        ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        for i, chunk in enumerate(chunks):
            ids[i, : len(chunk)] = torch.tensor(chunk)
        ctx = ForwardContext.build(self.cache, [s.slot for s in seqs], [s.cached for s in seqs], lengths)
        return self.model(ids, ctx, logits_at=torch.tensor(lengths) - 1).cpu()  # sampling runs on the CPU

    def _fail(self, seq: Sequence, error: str) -> StepEvent:
        """End `seq` with finish reason "error"."""
        seq.error = error
        self._finish(seq, "error")
        return StepEvent(seq, None, "", True)

    def _postprocess(self, batch: ScheduledBatch, logits: torch.Tensor, skip=()) -> list[StepEvent]:
        events = []
        for i, seq in enumerate(batch.seqs):
            if i in skip:
                continue
            seq.cached += len(batch.chunks[i])
            if seq.cached < len(seq.prompt_ids) or seq.finished:
                continue  # mid-prompt chunk, or aborted meanwhile
            try:
                events.append(self._emit_token(seq, logits[i]))
            except Exception as exc:  # e.g. a sampler error: fail this request only
                log.exception("post-processing %s failed", seq.request_id)
                events.append(self._fail(seq, f"{type(exc).__name__}: {exc}"))
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
