"""`LLM`: load a checkpoint and generate, batched or streaming.

llm = LLM("ckpt/", dtype="bf16", threads=2)
out = llm.generate(["Hello"], SamplingParams(max_tokens=32))
for delta in llm.stream("Hello", SamplingParams(max_tokens=32)): print(delta, end="")
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tilemem.engine.engine import Engine
from tilemem.engine.sampling import SamplingParams, make_generator
from tilemem.engine.sequence import Sequence
from tilemem.engine.tokenizer import TextTokenizer
from tilemem.errors import ConfigError, RequestError
from tilemem.loader.checkpoint import Checkpoint, load_model, require_device

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
        return text


WEIGHT_CODECS = ("x12", "none")


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


def device_for(plan, device: str | None) -> str:
    """The compute device: `device` if given (checked), else `cuda` when `plan` has a GPU tier."""
    gpu_tier = plan is not None and any(u.tier == "cuda" and (u.capacity or 0) > 0 for u in plan.tiers)
    if device is None:
        device = "cuda" if gpu_tier else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device '{device}'; use 'cpu' or 'cuda'.")
    require_device(device)  # before loading anything
    if gpu_tier and not device.startswith("cuda"):
        raise ConfigError("the plan computes tiles on 'cuda', so the model must run there; drop device='cpu'.")
    return device


class LLM:
    """A loaded model with its tokenizer, ready to generate."""

    def __init__(
        self,
        path: str | Path,
        dtype: str | torch.dtype | None = None,
        threads: int | None = None,
        max_batch: int = 8,
        max_model_len: int | None = None,
        prefill_chunk: int = 4096,
        plan=None,
        budget: str | None = None,
        policy: str = "tilepo_fine",
        profile=None,
        store: str | Path | None = None,
        tile: int = 128,
        runtime=None,
        async_planning: bool = False,
        replan_interval_s: float = 2.0,
        speculative: str | None = None,
        num_draft: int = 4,
        device: str | None = None,
        weight_codec: str = "x12",
    ) -> None:
        """Load `path`. With `plan` (a Plan or plan directory) or `budget` (+ `policy`, `profile`), routed
        experts follow the plan through the tiered runtime (`runtime`: a TieredConfig); else all resident.

        `device`: where the non-expert weights live and activations flow, `cpu` or `cuda`. None means
        `cuda` when the plan gives the GPU a budget (`--budget cuda=20GiB,cpu=32GiB`), else `cpu`.

        `weight_codec`: how the all-resident CPU engine keeps the weights a decode step streams (routed
        experts, attention projections, LM head): "x12" (12 bits per weight, losslessly: every weight
        decodes to its bf16 bits, and decode reads 25% fewer bytes) or "none" (bf16, as loaded). x12
        applies to bf16 weights mapped from the checkpoint (`MoECausalLM.prepare_weights`).

        `prefill_chunk`: most prompt tokens one forward pass takes, over all prompts (vLLM's
        max_num_batched_tokens). Offline generation wants it large: every pass reads each routed
        expert's weights once, and more tokens per expert run its GEMM closer to peak (4 prompts of 256
        tokens in one pass prefill ~4% faster than in two of 512 on the olmoe-1b-7b shape). The server
        keeps its own, smaller one (`--prefill-chunk`), so that prompts do not stall decoding rows."""
        if weight_codec not in WEIGHT_CODECS:
            raise ConfigError(f"weight_codec must be one of {', '.join(WEIGHT_CODECS)} (got {weight_codec!r}).")
        if prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be at least 1 token (got {prefill_chunk}).")
        if threads:
            torch.set_num_threads(threads)
        self.path = Path(path)
        self.checkpoint = Checkpoint.open(self.path)
        self.config = self.checkpoint.config
        self.max_model_len = min(max_model_len or 4096, self.config.max_position_embeddings)
        self.plan = self._resolve_plan(plan, budget, policy, profile, tile, dtype)
        skip = None
        if self.plan is not None:  # FFN weights come from the tile store, where the plan puts them
            from tilemem.models.topology import is_ffn_weight as skip
        self.device = device_for(self.plan, device)
        self.model, _ = load_model(
            self.checkpoint, dtype, max_positions=self.max_model_len, skip=skip, device=self.device,
            lazy_x12=self._encodes_x12(weight_codec, dtype),  # read once, to be encoded: not worth mapping first
        )  # fmt: skip
        self.tiered = None
        if self.plan is None:
            self.model.prepare_weights(weight_codec)
        if self.plan is not None:
            from tilemem.runtime.setup import attach_tiered, load_profile

            prof = load_profile(profile, self.plan.topology) if profile is not None else None
            self.tiered = attach_tiered(self.model, self.checkpoint, self.plan, store, runtime, prof)
        self.replanner = None
        if async_planning and self.tiered is not None:
            from tilemem.runtime.setup import start_async_planning

            self.replanner = start_async_planning(self.tiered, self.plan, replan_interval_s)
        self.tokenizer = TextTokenizer(self.path) if (self.path / "tokenizer.json").exists() else None
        gen_file = self.path / "generation_config.json"
        self.generation_config = json.loads(gen_file.read_text()) if gen_file.exists() else {}
        eos = self.generation_config.get("eos_token_id", list(self.config.eos_token_ids))
        self.eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.speculative = speculative
        self.num_draft = num_draft
        if speculative == "mtp" and getattr(self.model, "mtp", None) is None:
            from tilemem.speculative.drafters import MTPDrafter

            MTPDrafter(self.model)  # raises the clear "no MTP layers" error now, not at the first request
        self.speculator = None
        self._dtype = dtype
        self._engine: Engine | None = None
        self._last_stats: GenerationStats | None = None

    def _encodes_x12(self, codec: str, dtype) -> bool:
        """Whether loading will encode weights as x12 (`MoECausalLM.prepare_weights`): all resident, bf16
        weights kept in the checkpoint's dtype, on the CPU with the native kernels."""
        from tilemem import kernels
        from tilemem.loader.checkpoint import DTYPE_NAMES, parse_dtype

        cfg = self.config
        target = parse_dtype(dtype, cfg.torch_dtype if cfg.torch_dtype in DTYPE_NAMES else "bfloat16")
        on_cpu = self.plan is None and self.device == "cpu" and kernels.available()
        stored = DTYPE_NAMES.get(cfg.torch_dtype)  # what config.json declares the shards hold
        return codec == "x12" and on_cpu and target == stored == torch.bfloat16

    def _resolve_plan(self, plan, budget, policy, profile, tile, dtype):
        if plan is None and budget is None:
            return None
        from tilemem.placement.plan import Plan
        from tilemem.runtime.setup import make_plan

        if plan is not None:
            return plan if isinstance(plan, Plan) else Plan.load(plan)
        dtype_name = None if dtype is None else str(dtype).replace("torch.", "")
        return make_plan(self.checkpoint, budget, policy, profile, tile, dtype=dtype_name)

    # -- engine --------------------------------------------------------------------------------
    def engine(self, slots: int | None = None, length: int | None = None) -> Engine:
        """The engine, (re)allocating its KV cache when it is smaller than asked."""
        slots = slots or self.max_batch
        length = length or self.max_model_len
        if self.speculative:
            length = min(length + self.num_draft + 1, self.max_model_len)  # room for drafts being verified
        eng = self._engine
        if eng is None or eng.cache.slots < slots or eng.cache.length < length:
            self._engine = None  # free the old cache first
            eng = self._engine = Engine(
                self.model, self.tokenizer, self.eos_ids, slots, length, self.prefill_chunk, runtime=self.tiered
            )
            if self.speculative:
                from tilemem.speculative.drafters import make_drafter
                from tilemem.speculative.speculator import Speculator

                drafter = make_drafter(self.speculative, self.model, slots, length, self._dtype)
                self.speculator = eng.speculator = Speculator(drafter, self.num_draft)
        return eng

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
        need = max(min(s.length + s.params.max_tokens, self.max_model_len) for s in seqs)
        eng = self.engine(min(len(seqs), self.max_batch), need)
        self._run(eng, seqs, lambda events: None)
        return [RequestOutput.from_seq(p, s) for p, s in zip(prompts, seqs, strict=True)]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one prompt as tokens are generated."""
        seq = self._sequence(prompt, params or SamplingParams())
        eng = self.engine(1, min(seq.length + seq.params.max_tokens, self.max_model_len))
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
            raise RuntimeError(seq.error)

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> RequestOutput:
        """Generate a reply to `messages` using the checkpoint's chat template."""
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer; chat needs one.")
        return self.generate([self.tokenizer.apply_chat_template(messages)], params)[0]

    def close(self) -> None:
        """Stop async planning and the tile I/O threads, close the tile store."""
        if self.replanner is not None:
            self.replanner.stop()
            self.replanner = None
        if self.tiered is not None:
            self.tiered.close()

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
