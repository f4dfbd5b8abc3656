"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, per-request seeds)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from tilemem.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. `None` fields take the checkpoint's generation_config.json default."""

    max_tokens: int = 16
    """Most new tokens to generate."""
    temperature: float | None = None
    """0 = greedy; higher = more random. Default: generation config, else 1.0 if do_sample else 0."""
    top_k: int | None = None
    """Keep the k most likely tokens (0 or -1 = all)."""
    top_p: float | None = None
    """Keep the smallest set of tokens whose probability reaches p."""
    seed: int | None = None
    """Seed of this request's random generator (reproducible sampling)."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; they are not included in the text."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end generation."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens."""
    logprobs: int | None = None
    """Return the log-probability of each sampled token and this many top alternatives."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Free-form options passed through (e.g. speculative decoding settings)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}.")
        if self.temperature is not None and self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k is not None and self.top_k < -1:
            raise RequestError(f"top_k must be -1, 0 or positive, got {self.top_k}.")
        if self.logprobs is not None and self.logprobs < 0:
            raise RequestError(f"logprobs must be >= 0 (alternatives per token), got {self.logprobs}.")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must be non-empty; an empty one would end generation at once.")

    def with_defaults(self, generation_config: dict[str, Any]) -> SamplingParams:
        """Fill unset fields from a generation_config.json dict."""
        gc = generation_config
        do_sample = bool(gc.get("do_sample", False))
        temperature = self.temperature
        if temperature is None:
            temperature = float(gc.get("temperature", 1.0)) if do_sample else 0.0
        top_k = self.top_k if self.top_k is not None else (int(gc.get("top_k", 0)) if do_sample else 0)
        top_p = self.top_p if self.top_p is not None else (float(gc.get("top_p", 1.0)) if do_sample else 1.0)
        return replace(self, temperature=temperature, top_k=top_k, top_p=top_p)

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the constructor fields."""
        return [f.name for f in fields(cls)]


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded by `seed` (or from the global RNG when None)."""
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return gen


def token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution [V] `params` samples from (temperature, top-k, top-p applied); temperature > 0."""
    logits = logits / params.temperature
    if params.top_k and params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p is not None and params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        drop = cum - sorted_probs >= params.top_p  # keep tokens until the mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """One token id from logits [V] (fp32) under `params` (defaults already applied)."""
    if not params.temperature:
        return int(torch.argmax(logits))
    return int(torch.multinomial(token_probs(logits, params), 1, generator=gen))
