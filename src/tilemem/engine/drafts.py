"""Draft tokens in a scheduled chunk: the `Draft` record and what the engine asks of speculative decoding.

With speculative decoding on, the scheduler asks for up to k drafts per decoding row, and the row's
chunk becomes `[pending token] + drafts`: the engine runs it like any other row (logits at every
position) and verifies the drafts in post-processing. The engine depends on this interface only;
`tilemem.speculative.Speculator` implements it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from tilemem.engine.sequence import Sequence


@dataclass
class Draft:
    """Proposed tokens and, when sampled, the draft distribution [V] of each."""

    tokens: list[int]
    """Draft tokens following the sequence's last token."""
    probs: list[torch.Tensor] | None = None
    """Distribution each token was drawn from (None: deterministic proposals, a one-hot q)."""


class Speculation(Protocol):
    """The drafting and verification policy the scheduler and the engine call."""

    @property
    def wants_hidden(self) -> bool:
        """Whether the drafter reads the target's final hidden states (MTP)."""

    def propose(self, seq: Sequence, limit: int) -> Draft:
        """Drafts for a decoding row: at most `limit` (room in its KV-cache slot and in max_tokens)."""

    def verify(
        self, seq: Sequence, draft: Draft, logits: torch.Tensor, hidden: torch.Tensor | None, cache
    ) -> list[int]:
        """Check `draft` against the target's logits [1 + len(draft), V] at [pending token, drafts]:
        the tokens to append (the accepted drafts, then one target token); tells the drafter."""

    def observe_prompt(self, seq: Sequence, hidden: torch.Tensor, start: int, cache) -> None:
        """Hidden states [T, D] of a prompt chunk at positions start.. (only when `wants_hidden`)."""

    def release(self, seq: Sequence) -> None:
        """`seq` finished: drop its drafter state."""

    def record_step(self, tokens: int, forward_s: float, seconds: float) -> None:
        """A step with drafted rows: tokens they produced, seconds of their forward pass, of the step."""
