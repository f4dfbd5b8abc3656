"""The speculative decoding policy the engine calls: draft up to k tokens per decoding row, verify them.

The scheduler asks `propose` for each decoding row's drafts, so the row's chunk is [last token, d1..dk];
the engine's one forward path scores them all (rows of different lengths in one batch) and, in
post-processing, `verify` keeps the accepted prefix plus one target token. The KV cache rolls back by
simply not counting the rejected positions (the next step overwrites them). With the tiered runtime,
the pass routes all draft positions at once, so a tile needed by several positions is fetched once.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from tilemem.engine.drafts import Draft
from tilemem.engine.sequence import Sequence
from tilemem.speculative.drafters import Drafter
from tilemem.speculative.verify import verify


@dataclass
class SpeculativeStats:
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
    """Drafts with `drafter`, at most k drafts per row, and verifies them (`tilemem.engine.drafts.Speculation`)."""

    def __init__(self, drafter: Drafter, k: int = 4) -> None:
        self.drafter = drafter
        self.k = k
        self.stats = SpeculativeStats()

    @property
    def wants_hidden(self) -> bool:
        """Whether the drafter reads the target's final hidden states (MTP)."""
        return self.drafter.needs_hidden

    def propose(self, seq: Sequence, limit: int) -> Draft:
        """Up to min(k, limit) drafts following `seq.tokens`."""
        t0 = time.perf_counter()
        k = min(self.k, limit)
        draft = self.drafter.propose(seq, k) if k > 0 else Draft([])
        draft.tokens = draft.tokens[:k]
        self.stats.draft_s += time.perf_counter() - t0
        return draft

    def verify(
        self, seq: Sequence, draft: Draft, logits: torch.Tensor, hidden: torch.Tensor | None, cache
    ) -> list[int]:
        """logits [1 + len(draft), V] at [pending token, drafts], hidden [T, D] of the row (when the drafter
        reads them) -> the tokens to append: the accepted drafts, then one target token.

        Call before `seq.cached` advances; the drafter is told how many drafts were accepted and, when it
        reads hidden states, gets those of the verified positions (the pending token and the accepted drafts)."""
        n, nxt = verify(logits, draft, seq.params, seq.generator)
        self.stats.accepted.append(n + 1)
        t0 = time.perf_counter()
        self.drafter.accepted(seq, n, len(draft.tokens))
        if hidden is not None:
            self.drafter.observe(seq, hidden[: n + 1], draft.tokens[:n] + [nxt], seq.cached, cache, self.k)
        self.stats.draft_s += time.perf_counter() - t0
        return draft.tokens[:n] + [nxt]

    def observe_prompt(self, seq: Sequence, hidden: torch.Tensor, start: int, cache) -> None:
        """Hidden states [T, D] of the prompt chunk at positions start..start+T-1, after `seq.cached` advanced
        past it (and, for the last chunk, the first token was sampled): the token following each position
        is known, so an MTP drafter writes its own KV rows and, after the last chunk, its first drafts."""
        t0 = time.perf_counter()
        following = seq.tokens[start + 1 : start + hidden.shape[0] + 1]
        last_chunk = seq.cached >= len(seq.prompt_ids)
        self.drafter.observe(seq, hidden[: len(following)], following, start, cache, self.k if last_chunk else 1)
        self.stats.draft_s += time.perf_counter() - t0

    def release(self, seq: Sequence) -> None:
        """`seq` finished: drop its drafter state."""
        self.drafter.release(seq)

    def record_step(self, tokens: int, forward_s: float, seconds: float) -> None:
        """A step with drafted rows: tokens they produced, seconds of their forward pass, of the step."""
        self.stats.forward_s.append(forward_s)
        self.stats.tokens += tokens
        self.stats.seconds += seconds
