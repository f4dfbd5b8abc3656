"""Speculative decode steps inside the engine loop.

One step: every running sequence gets up to k drafts; one forward of the target over
[last token, d1..dk] per row (rows of different lengths in one batch) scores them all; verification
keeps the accepted prefix plus one target token; the KV cache rolls back by simply not counting the
rejected positions (the next step overwrites them). With the tiered runtime, the verification pass
routes all draft positions at once, so a tile needed by several positions is fetched once.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field

import torch

from tilemem.engine.engine import StepEvent, StepStats
from tilemem.engine.sequence import Sequence
from tilemem.layers.kv_cache import ForwardContext
from tilemem.speculative.drafters import Draft, Drafter
from tilemem.speculative.verify import verify


@dataclass
class SpecStats:
    """Acceptance and timing of speculative steps."""

    accepted: list[int] = field(default_factory=list)
    """Tokens produced per verify call and sequence (accepted drafts + 1)."""
    forward_s: list[float] = field(default_factory=list)
    """Seconds of each verification forward."""
    draft_s: float = 0.0
    """Seconds spent drafting."""
    tokens: int = 0
    """Tokens produced by speculative steps."""
    seconds: float = 0.0
    """Wall time of speculative steps."""

    def line(self) -> str:
        """`Accepted length: mean=..., min=..., max=...` plus timings."""
        if not self.accepted:
            return "Accepted length: no speculative steps"
        fwd = statistics.mean(self.forward_s) * 1e3 if self.forward_s else 0.0
        return (
            f"Accepted length: mean={statistics.mean(self.accepted):.2f}, min={min(self.accepted)}, "
            f"max={max(self.accepted)} | forward {fwd:.1f} ms/call | draft {self.draft_s * 1e3:.0f} ms total | "
            f"effective {self.tokens / self.seconds if self.seconds else 0.0:.1f} tok/s"
        )


class Speculator:
    """Drafts with `drafter`, verifies with the engine's model, k drafts per step."""

    def __init__(self, drafter: Drafter, k: int = 4) -> None:
        self.drafter = drafter
        self.k = k
        self.stats = SpecStats()

    def step(self, engine, seqs: list[Sequence]) -> list[StepEvent]:
        """One speculative decode step for `seqs` (all decoding)."""
        t0 = time.perf_counter()
        hidden_wanted = getattr(self.drafter, "needs_hidden", False)
        if hidden_wanted:
            for seq in seqs:
                if seq.request_id not in self.drafter.next:
                    self.drafter.prime(seq, engine.cache, self.k)
        drafts: list[Draft] = []
        for seq in seqs:
            room = engine.cache.length - seq.cached - 1
            k = max(0, min(self.k, seq.params.max_tokens - len(seq.output_ids) - 1, room))
            d = self.drafter.propose(seq, k) if k > 0 else Draft([])
            d.tokens = d.tokens[:k]
            drafts.append(d)
        t1 = time.perf_counter()
        rows = [seq.pending + d.tokens for seq, d in zip(seqs, drafts, strict=True)]
        lengths = [len(r) for r in rows]
        ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        ctx = ForwardContext.build(engine.cache, [s.slot for s in seqs], [s.cached for s in seqs], lengths)
        before = copy.copy(engine.runtime.counters) if engine.runtime is not None else None
        try:
            out = engine.model(ids, ctx, return_hidden=hidden_wanted)
            logits, hidden = out if hidden_wanted else (out, None)  # [B, T, V], [B, T, D]
            logits = logits.cpu()  # sampling and verification run on the CPU
        except Exception as exc:
            events = []
            for seq in seqs:
                seq.error = f"{type(exc).__name__}: {exc}"
                engine._finish(seq, "error")
                events.append(StepEvent(seq, None, "", True))
            return events
        t2 = time.perf_counter()
        events, produced = [], 0
        for i, seq in enumerate(seqs):
            d = drafts[i]
            n, nxt = verify(logits[i, : lengths[i]], d, seq.params, seq.generator)
            self.drafter.accepted(seq, n, len(d.tokens))
            if hidden is not None:  # verified positions: the last token and the n accepted drafts
                self.drafter.observe(seq, hidden[i, : n + 1], d.tokens[:n] + [nxt], seq.cached, engine.cache, self.k)
            seq.cached += 1 + n
            self.stats.accepted.append(n + 1)
            for j, tok in enumerate(d.tokens[:n] + [nxt]):
                text = engine.append_token(seq, tok, logits[i, j])
                produced += 1
                events.append(StepEvent(seq, tok, text, seq.finished))
                if seq.finished:
                    self.drafter.release(seq)
                    break
        dt = time.perf_counter() - t0
        self.stats.forward_s.append(t2 - t1)
        self.stats.draft_s += t1 - t0
        self.stats.tokens += produced
        self.stats.seconds += dt
        rt = engine.runtime.counters.minus(before).as_dict() if before is not None else None
        engine.counters.steps.append(StepStats(False, len(seqs), produced, dt, rt))
        engine.counters.decode_tokens += produced
        engine.counters.decode_seconds += dt
        return events
