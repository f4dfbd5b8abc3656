"""Drafters: prompt-lookup n-grams (no weights), a separate small draft checkpoint, MTP heads.

A drafter proposes up to k tokens for a sequence and, for sampling, the distribution each was drawn
from (None for deterministic proposals, i.e. a one-hot q). After verification it is told how many
were accepted so it can roll its own state back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from tilemem.engine.drafts import Draft
from tilemem.engine.sampling import token_probs
from tilemem.engine.sequence import Sequence
from tilemem.errors import ConfigError


class Drafter(ABC):
    """Proposes continuation tokens for a sequence."""

    name: str = "drafter"
    needs_hidden: bool = False
    """Whether it reads the target's final hidden states (`observe`)."""

    @abstractmethod
    def propose(self, seq: Sequence, k: int) -> Draft:
        """Up to k draft tokens following seq.tokens."""

    def accepted(self, seq: Sequence, n: int, k: int) -> None:
        """n of the k proposed tokens were accepted (roll back drafter state)."""
        return None

    def observe(self, seq: Sequence, hidden: torch.Tensor, next_ids: list[int], start: int, cache, k: int) -> None:
        """Hidden states [T, D] of verified positions start.., the token following each (`needs_hidden`)."""
        return None

    def release(self, seq: Sequence) -> None:
        """The sequence finished."""
        return None


class NgramDrafter(Drafter):
    """Prompt lookup: find the latest earlier occurrence of the longest suffix n-gram, copy what followed."""

    name = "ngram"

    def __init__(self, n_max: int = 3, n_min: int = 1) -> None:
        self.n_max, self.n_min = n_max, n_min

    def propose(self, seq: Sequence, k: int) -> Draft:
        hist = seq.tokens
        for n in range(min(self.n_max, len(hist) - 1), self.n_min - 1, -1):
            suffix = hist[-n:]
            for start in range(len(hist) - n - 1, -1, -1):  # latest match first
                if hist[start : start + n] == suffix:
                    follow = hist[start + n : start + n + k]
                    if follow:
                        return Draft(follow)
        return Draft([])


class DraftModelDrafter(Drafter):
    """A separate (small) checkpoint with the same tokenizer drafts greedily or by sampling."""

    name = "draft"

    def __init__(self, path: str, slots: int, length: int, dtype=None, vocab_size: int | None = None) -> None:
        from tilemem.loader.checkpoint import load_model

        self.model, ckpt = load_model(path, dtype, max_positions=length)
        if vocab_size is not None and ckpt.config.vocab_size != vocab_size:
            raise ConfigError(
                f"draft checkpoint {path} has vocabulary {ckpt.config.vocab_size}, the target {vocab_size}; "
                "a draft model must share the target's tokenizer."
            )
        self.cache = self.model.allocate_cache(slots, length)
        self.cached: dict[str, int] = {}

    def propose(self, seq: Sequence, k: int) -> Draft:
        from tilemem.layers.kv_cache import ForwardContext

        hist = seq.tokens
        done = self.cached.get(seq.request_id, 0)
        feed = hist[done:]
        tokens, probs = [], []
        for _ in range(k):
            ctx = ForwardContext.build(self.cache, [seq.slot], [done], [len(feed)])
            logits = self.model(torch.tensor([feed]), ctx, logits_at=torch.tensor([len(feed) - 1]))[0]
            done += len(feed)
            if seq.params.temperature:
                p = token_probs(logits, seq.params)
                tok = int(torch.multinomial(p, 1, generator=seq.generator))
                probs.append(p)
            else:
                tok = int(torch.argmax(logits))
            tokens.append(tok)
            feed = [tok]
        self.cached[seq.request_id] = done  # history + tokens[:-1]
        return Draft(tokens, probs if seq.params.temperature else None)

    def accepted(self, seq: Sequence, n: int, k: int) -> None:
        # The cache holds the history and the first k-1 drafts; only accepted drafts stay valid.
        self.cached[seq.request_id] -= (k - 1) - min(n, k - 1)

    def release(self, seq: Sequence) -> None:
        self.cached.pop(seq.request_id, None)


class MTPDrafter(Drafter):
    """The checkpoint's own multi-token-prediction layers, applied recursively (DeepSeek-V3 style).

    The MTP block needs the main model's final hidden states: the engine's forward pass returns them,
    and the speculator hands over those of every prompt chunk and every verified position (`observe`);
    the MTP layer writes its own KV rows for them and drafts k tokens from the last one.
    Greedy drafting; with sampling the drafts count as deterministic proposals.
    """

    name = "mtp"
    needs_hidden = True

    def __init__(self, model) -> None:
        if getattr(model, "mtp", None) is None:
            raise ConfigError(
                "this checkpoint has no MTP layers (num_nextn_predict_layers is 0 or the weights are absent); "
                "use --spec ngram or --spec draft:PATH."
            )
        self.model = model
        self.next: dict[str, list[int]] = {}

    def _draft(self, seq: Sequence, hidden: torch.Tensor, next_ids: list[int], start: int, cache, k: int) -> None:
        from tilemem.layers.kv_cache import ForwardContext

        ctx = ForwardContext.paged(cache, [seq.blocks], [start], [len(next_ids)])
        with torch.inference_mode():
            drafts = self.model.mtp.draft(hidden.unsqueeze(0), torch.tensor([next_ids]), ctx, max(k, 1))
        self.next[seq.request_id] = drafts[0].tolist()

    def observe(self, seq: Sequence, hidden: torch.Tensor, next_ids: list[int], start: int, cache, k: int) -> None:
        """Hidden states [T, D] of positions start.. (prompt or verified) and the token following each."""
        self._draft(seq, hidden, next_ids, start, cache, k)

    def propose(self, seq: Sequence, k: int) -> Draft:
        return Draft(self.next.get(seq.request_id, [])[:k])

    def release(self, seq: Sequence) -> None:
        self.next.pop(seq.request_id, None)


def make_drafter(method: str, model, slots: int, length: int, dtype=None) -> Drafter:
    """The drafter of a speculative method: `ngram`, `mtp` or `draft:PATH`."""
    if method == "ngram":
        return NgramDrafter()
    if method == "mtp":
        return MTPDrafter(model)
    if method.startswith("draft:"):
        return DraftModelDrafter(method[6:], slots, length, dtype, model.cfg.vocab_size)
    raise ConfigError(f"unknown speculative method '{method}'; use ngram, mtp or draft:PATH.")
