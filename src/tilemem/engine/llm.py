"""`LLM`: load a checkpoint and generate, batched or streaming.

llm = LLM("ckpt/", dtype="bf16", threads=2)
out = llm.generate(["Hello"], SamplingParams(max_tokens=32))
for delta in llm.stream("Hello", SamplingParams(max_tokens=32)): print(delta, end="")
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tilemem.engine.args import EngineArgs, keyword_signature
from tilemem.engine.build import build_engine
from tilemem.engine.engine import Engine
from tilemem.engine.sampling import SamplingParams, make_generator
from tilemem.engine.sequence import Sequence
from tilemem.errors import GenerationError, RequestError
from tilemem.units import format_bytes

Prompt = str | list[int]


@dataclass
class RequestOutput:
    """The result of one prompt."""

    prompt: Prompt
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    ttft_s: float = 0.0
    """Seconds from submission to the first token."""
    total_s: float = 0.0
    """Seconds from submission to the last token."""
    error: str | None = None
    cached_tokens: int = 0
    """Prompt tokens whose KV blocks came from the prefix cache (not computed again)."""
    preemptions: int = 0
    """Times the sequence was preempted (its KV blocks taken back) and recomputed."""

    @classmethod
    def from_seq(cls, prompt: Prompt, seq: Sequence) -> RequestOutput:
        """Snapshot a finished sequence."""
        return cls(
            prompt=prompt,
            prompt_token_ids=seq.prompt_ids,
            token_ids=list(seq.output_ids),
            text=seq.text,
            finish_reason=seq.finish_reason,
            logprobs=list(seq.logprobs),
            top_logprobs=list(seq.top_logprobs),
            ttft_s=(seq.first_token_time or seq.arrival) - seq.arrival,
            total_s=(seq.finish_time or seq.arrival) - seq.arrival,
            error=seq.error,
            cached_tokens=seq.cached_prompt,
            preemptions=seq.preemptions,
        )


@dataclass
class GenerationStats:
    """Throughput of the last generate()/stream() call."""

    prefill_tokens: int
    prefill_tok_s: float
    decode_tokens: int
    decode_tok_s: float
    peak_rss_bytes: int
    steps: list[dict[str, float]] = field(default_factory=list)
    """Per engine step: tokens, seconds, tok/s and (tiered runtime) bytes per tier, hits, misses,
    fetch stall, prefetch precision/recall."""
    runtime: dict[str, float] | None = None
    """Tiered-runtime totals over the call."""
    speculative: str | None = None
    """`Accepted length: mean=..., min=..., max=...` and timings, when decoding speculatively."""
    kv: dict[str, float] | None = None
    """The KV cache after the call (`Engine.kv_stats`): blocks used and cached, bytes, prefix-cache hit rate (over
    the engine's life), preemptions."""

    def line(self) -> str:
        """One human-readable line."""
        text = (
            f"prefill {self.prefill_tokens} tok @ {self.prefill_tok_s:.1f} tok/s | "
            f"decode {self.decode_tokens} tok @ {self.decode_tok_s:.1f} tok/s | "
            f"peak RSS {self.peak_rss_bytes / 2**30:.2f} GiB"
        )
        if self.runtime:
            r = self.runtime
            text += (
                f"\ntiers: disk read {r['disk_bytes'] / 2**20:.1f} MiB, DRAM {r['dram_bytes'] / 2**20:.1f} MiB | "
                f"cache hit rate {100 * r['hit_rate']:.1f}% ({r['hits']} hits, {r['misses']} misses) | "
                f"fetch stall {r['stall_s'] * 1e3:.0f} ms | prefetch precision {100 * r['prefetch_precision']:.0f}% "
                f"recall {100 * r['prefetch_recall']:.0f}%"
            )
        if self.speculative:
            text += "\n" + self.speculative
        if self.kv:
            k = self.kv
            text += (
                f"\nKV cache: {k['kv_blocks_used']}/{k['kv_blocks']} blocks in use (max {k['kv_blocks_max']}), "
                f"{format_bytes(k['kv_bytes'])} | prefix cache hit rate {100 * k['prefix_hit_rate']:.1f}% | "
                f"{k['preemptions']} preemptions"
            )
        return text


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM; ru_maxrss would inherit a parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class LLM:
    """A loaded model with its tokenizer, ready to generate."""

    def __init__(self, path: str | Path, **kwargs: Any) -> None:
        """Load `path`; `kwargs` are `EngineArgs` fields (dtype, threads, max_batch, plan, budget, policy,
        speculative, weight_codec, ...; see `tilemem.engine.args.EngineArgs`), checked before anything loads.

        With `plan` (a Plan or plan directory) or `budget` (+ `policy`, `profile`), routed experts follow
        the plan through the tiered runtime; else all resident. `prefill_chunk` (default 4096): offline
        generation wants it large, since every pass reads each routed expert's weights once; the server
        keeps its own, smaller one (`--prefill-chunk`), so that prompts do not stall decoding rows."""
        self._setup(EngineArgs(model=path, **kwargs))

    @classmethod
    def from_args(cls, args: EngineArgs, kv_sequences: int = 1) -> LLM:
        """An LLM built from `args`; a plan made on the way keeps room for `kv_sequences` full-length KV
        caches (`build_engine`)."""
        llm = cls.__new__(cls)
        llm._setup(args, kv_sequences)
        return llm

    def _setup(self, args: EngineArgs, kv_sequences: int = 1) -> None:
        self.args = args
        self.parts = parts = build_engine(args, kv_sequences)
        self.path = parts.path
        self.checkpoint = parts.checkpoint
        self.config = parts.config
        self.max_model_len = parts.max_model_len
        self.plan = parts.plan
        self.device = parts.device
        self.model = parts.model
        self.tiered = parts.tiered
        self.tokenizer = parts.tokenizer
        self.generation_config = parts.generation_config
        self.eos_ids = parts.eos_ids
        self.max_batch = args.max_batch
        self.prefill_chunk = args.prefill_chunk
        self.speculative = args.speculative
        self.num_draft = args.num_draft
        self.speculator = None
        self._engine: Engine | None = None
        self._last_stats: GenerationStats | None = None

    @property
    def replanner(self):
        """The AsyncReplanner when async planning runs, else None."""
        return self.parts.replanner

    # -- engine --------------------------------------------------------------------------------
    def engine(self) -> Engine:
        """The engine: one per LLM, kept between calls so that its prefix cache serves the next prompts (its paged
        KV cache grows as sequences need, within `kv_memory`)."""
        if self._engine is None:
            length = self.max_model_len
            if self.speculative:
                length = length + self.num_draft + 1  # room for drafts being verified
            self._engine = self.parts.engine(self.max_batch, length)
            self.speculator = self._engine.speculator
        return self._engine

    def _sequence(self, prompt: Prompt, params: SamplingParams) -> Sequence:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this checkpoint has no tokenizer.json; pass prompts as lists of token ids.")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise RequestError("the prompt is empty; give at least one token.")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1}).")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(ids)} tokens but the context is {self.max_model_len}; shorten it or "
                "raise max_model_len."
            )
        params = params.with_defaults(self.generation_config)
        return Sequence(ids, params, make_generator(params.seed))

    # -- public API ------------------------------------------------------------------------------
    def generate(
        self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Generate for every prompt (batched); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            return []
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise RequestError(
                f"got {len(prompts)} prompts but {len(params_list)} SamplingParams; pass one per prompt, "
                "or a single SamplingParams for all."
            )
        seqs = [self._sequence(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        eng = self.engine()
        self._run(eng, seqs, lambda events: None)
        return [RequestOutput.from_seq(p, s) for p, s in zip(prompts, seqs, strict=True)]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one prompt as tokens are generated."""
        seq = self._sequence(prompt, params or SamplingParams())
        eng = self.engine()
        start = self._start(eng)
        eng.add(seq)
        shown = 0
        try:
            # Follow this sequence's released text rather than step events: another stream may
            # advance the shared engine (and so this sequence) between our steps.
            while True:
                done = seq.finished  # read before the text: both may change while we yield
                text = eng.released_text(seq)
                if len(text) > shown:
                    yield text[shown:]
                    shown = len(text)
                if done:
                    break
                eng.step()
        finally:  # the caller may stop iterating early: free the slot rather than decode on
            eng.abort(seq)
        self._finish_stats(eng, start)
        if seq.error:
            raise GenerationError(seq.error)

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> RequestOutput:
        """Generate a reply to `messages` using the checkpoint's chat template."""
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer; chat needs one.")
        return self.generate([self.tokenizer.apply_chat_template(messages)], params)[0]

    def close(self) -> None:
        """Stop async planning and the tile I/O threads, close the tile store."""
        self.parts.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> GenerationStats | None:
        """Throughput of the last generate()/stream() call."""
        return self._last_stats

    def _start(self, eng: Engine) -> tuple:
        c = eng.counters
        rt = copy.copy(self.tiered.counters) if self.tiered is not None else None
        return (c.prefill_tokens, c.prefill_seconds, c.decode_tokens, c.decode_seconds, len(c.steps), rt)

    def _finish_stats(self, eng: Engine, start: tuple) -> None:
        c = eng.counters
        pt, ps = c.prefill_tokens - start[0], c.prefill_seconds - start[1]
        dt, ds = c.decode_tokens - start[2], c.decode_seconds - start[3]
        steps = [s.as_dict() for s in c.steps[start[4] :]]
        rt = self.tiered.counters.minus(start[5]).as_dict() if self.tiered is not None else None
        self._last_stats = GenerationStats(
            pt,
            pt / ps if ps else 0.0,
            dt,
            dt / ds if ds else 0.0,
            peak_rss_bytes(),
            steps,
            rt,
            self.speculator.stats.line() if self.speculator is not None else None,
            eng.kv_stats(),
        )

    def _run(self, eng: Engine, seqs: list[Sequence], on_events) -> None:
        start = self._start(eng)
        t0 = time.perf_counter()
        for s in seqs:
            s.arrival = t0
            eng.add(s)
        try:
            while eng.has_work():
                on_events(eng.step())
        finally:  # on an exception (or Ctrl-C) do not leave these requests queued for the next call
            for s in seqs:
                eng.abort(s)
        self._finish_stats(eng, start)


LLM.__init__.__signature__ = keyword_signature()  # LLM(path, **kwargs) takes exactly EngineArgs' fields
