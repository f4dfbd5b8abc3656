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

    def as_dict(self) -> dict[str, float]:
        """Plain numbers, tok/s included."""
        d = {"prefill": self.is_prefill, "batch": self.batch, "tokens": self.tokens, "seconds": self.seconds}
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
        if self.speculator is not None and all(
            len(c) == 1 and s.cached >= len(s.prompt_ids) for s, c in zip(batch.seqs, batch.chunks, strict=True)
        ):
            return self.speculator.step(self, batch.seqs)
        t0 = time.perf_counter()
        before = copy.copy(self.runtime.counters) if self.runtime is not None else None
        try:
            logits = self._forward(batch)  # [B, V]
        except Exception as exc:  # one failing batch must not take the engine down
            log.exception("forward pass failed")
            events = []
            for seq in batch.seqs:
                seq.error = f"{type(exc).__name__}: {exc}"
                self._finish(seq, "error")
                events.append(StepEvent(seq, None, "", True))
            return events
        events = self._postprocess(batch, logits)
        dt = time.perf_counter() - t0
        n = sum(len(c) for c in batch.chunks)
        rt = self.runtime.counters.minus(before).as_dict() if before is not None else None
        self.counters.steps.append(StepStats(batch.is_prefill, len(batch.seqs), n, dt, rt))
        if batch.is_prefill:
            self.counters.prefill_tokens += n
            self.counters.prefill_seconds += dt
        else:
            self.counters.decode_tokens += n
            self.counters.decode_seconds += dt
        return events

    def _forward(self, batch: ScheduledBatch) -> torch.Tensor:
        lengths = [len(c) for c in batch.chunks]
        ids = torch.zeros(len(batch.seqs), max(lengths), dtype=torch.long)
        for i, chunk in enumerate(batch.chunks):
            ids[i, : len(chunk)] = torch.tensor(chunk)
        ctx = ForwardContext.build(self.cache, [s.slot for s in batch.seqs], [s.cached for s in batch.seqs], lengths)
        return self.model(ids, ctx, logits_at=torch.tensor(lengths) - 1)

    def _postprocess(self, batch: ScheduledBatch, logits: torch.Tensor) -> list[StepEvent]:
        events = []
        for i, seq in enumerate(batch.seqs):
            seq.cached += len(batch.chunks[i])
            if seq.cached < len(seq.prompt_ids) or seq.finished:
                continue  # mid-prompt chunk, or aborted meanwhile
            token = sample(logits[i], seq.params, seq.generator)
            text = self.append_token(seq, token, logits[i])
            events.append(StepEvent(seq, token, text, seq.finished))
        return events

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
