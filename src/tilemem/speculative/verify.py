"""Verification of drafts against the target's logits: greedy match, or rejection sampling that keeps
the target distribution exactly (Leviathan et al. / Chen et al.)."""

from __future__ import annotations

import torch

from tilemem.engine.drafts import Draft
from tilemem.engine.sampling import SamplingParams, token_probs


def verify(logits: torch.Tensor, draft: Draft, params: SamplingParams, gen: torch.Generator) -> tuple[int, int]:
    """logits [k+1, V] at [last token, d1..dk] -> (accepted drafts n, the token that follows them)."""
    k = len(draft.tokens)
    if not params.temperature:
        for j, tok in enumerate(draft.tokens):
            best = int(torch.argmax(logits[j]))
            if best != tok:
                return j, best
        return k, int(torch.argmax(logits[k]))
    for j, tok in enumerate(draft.tokens):
        p = token_probs(logits[j], params)
        q = draft.probs[j] if draft.probs is not None else None
        q_tok = float(q[tok]) if q is not None else 1.0
        if float(torch.rand(1, generator=gen)) * q_tok < float(p[tok]):  # accept with prob min(1, p/q)
            continue
        residual = (p - q).clamp_min(0) if q is not None else p.clone()
        if q is None:
            residual[tok] = 0.0
        if float(residual.sum()) <= 0:
            residual = p
        return j, int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
    return k, int(torch.multinomial(token_probs(logits[k], params), 1, generator=gen))
