"""`build_engine(args)`: the one way from `EngineArgs` to a running engine.

Loads the checkpoint, makes the plan and the tiered runtime (when `plan` or `budget` is set), starts
async planning, and hands back an `EngineParts` whose `engine(slots, length)` allocates an `Engine`
with its speculator. `LLM`, the server, the CLI and the benchmarks all go through here.

parts = build_engine(EngineArgs("ckpt/", dtype="bf16", budget="cpu=4GiB"))
engine = parts.engine(slots=8, length=2048, prefill_chunk=512)
"""

from __future__ import annotations

import atexit
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tilemem.engine.args import EngineArgs
from tilemem.engine.engine import Engine
from tilemem.engine.tokenizer import TextTokenizer
from tilemem.errors import CheckpointError, ConfigError, TileMemError
from tilemem.jsonio import read_json_object
from tilemem.loader.checkpoint import Checkpoint, load_model, require_device


@dataclass
class EngineParts:
    """A loaded model and everything around it, ready to allocate engines (KV caches) from."""

    args: EngineArgs
    """What it was built from."""
    path: Path
    """Checkpoint directory."""
    checkpoint: Checkpoint
    """The opened checkpoint."""
    model: Any
    """The loaded MoECausalLM."""
    device: str
    """Where non-expert weights live and activations flow."""
    max_model_len: int
    """Context length: `args.max_model_len` (default 4096) capped at the model's."""
    plan: Any = None
    """The Plan routed experts follow, or None (all resident)."""
    tiered: Any = None
    """The TieredExperts executor when a plan is set."""
    replanner: Any = None
    """The AsyncReplanner when async planning runs."""
    tokenizer: TextTokenizer | None = None
    """The checkpoint's tokenizer (None without tokenizer.json)."""
    generation_config: dict = field(default_factory=dict)
    """generation_config.json, if any."""
    eos_ids: tuple[int, ...] = ()
    """End-of-sequence token ids."""
    ranks: Any = None
    """Expert parallelism: this process's `parallel.RankGroup`, or None (one process)."""
    followers: list = field(default_factory=list)
    """Expert parallelism: the ranks rank 0 started on this machine (subprocesses)."""
    rank_plans: list | None = None
    """Expert parallelism, rank 0: every rank's plan where rank 0 made them (or was given them all), else None."""

    @property
    def config(self):
        """The checkpoint's ModelConfig."""
        return self.checkpoint.config

    def engine(self, slots: int | None = None, length: int | None = None, prefill_chunk: int | None = None) -> Engine:
        """A new Engine of `slots` batch rows for sequences of up to `length` tokens (defaults: the args'), its paged
        KV cache sized by the args (`kv_memory`, `kv_block_size`, `prefix_caching`), and the
        speculator `args.speculative` asks for (its draft model loaded with `args.dtype`)."""
        args = self.args
        slots = slots or args.max_batch
        length = length or self.max_model_len
        speculator = None
        if args.speculative:
            from tilemem.speculative.drafters import make_drafter
            from tilemem.speculative.speculator import Speculator

            drafter = make_drafter(args.speculative, self.model, slots, length, args.dtype)
            speculator = Speculator(drafter, args.num_draft)
        prefill_chunk = prefill_chunk or args.prefill_chunk
        leader = self.leader
        return Engine(
            self.model, self.tokenizer, self.eos_ids, slots, length, prefill_chunk, self.tiered, speculator, leader,
            args.kv_settings(),
        )  # fmt: skip

    @property
    def leader(self):
        """Expert parallelism on rank 0: the `engine.ranks.Leader` its engines mirror their steps through."""
        if self.ranks is None or self.ranks.rank != 0:
            return None
        from tilemem.engine.ranks import Leader

        return Leader(self.ranks)

    def close(self) -> None:
        """Stop async planning and the tile I/O threads, close the tile store; rank 0 of a distributed run tells
        the other ranks to stop (and waits for those it started)."""
        if self.replanner is not None:
            self.replanner.stop()
            self.replanner = None
        if self.ranks is not None:
            ranks, self.ranks = self.ranks, None
            try:
                if ranks.rank == 0 and not ranks.closed:
                    from tilemem.engine.ranks import Leader, stop_followers

                    Leader(ranks).stop()
                    stop_followers(self.followers)
            except TileMemError:
                pass  # a rank is gone already: nothing to tell it
            finally:
                ranks.close()
        if self.tiered is not None:
            self.tiered.close()
            self.tiered = None


def build_engine(args: EngineArgs, kv_sequences: int = 1) -> EngineParts:
    """Load `args.model` and wire up placement as `args` says (see EngineParts). A plan made here
    (`--budget auto`, or default = fit) keeps room for the KV cache of `kv_sequences` sequences of
    `max_model_len` tokens: 1 for offline generation (its cache is sized to the prompts), the server's
    `max_batch` (it allocates every slot at full length up front)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    ranks, followers = None, []
    if args.world_size not in (None, 1) or "WORLD_SIZE" in os.environ:
        from tilemem.engine.ranks import start_ranks

        ranks, followers = start_ranks(args)
    try:
        return _build(args, kv_sequences, ranks, followers)
    except BaseException:
        if ranks is not None:  # the other ranks fail at start-up too (they wait on this one): leave the run
            from tilemem.engine.ranks import stop_followers

            ranks.close()
            stop_followers(followers, 0.0)
        raise


def _build(args: EngineArgs, kv_sequences: int, ranks, followers: list) -> EngineParts:
    ckpt = Checkpoint.open(args.model)
    cfg = ckpt.config
    max_model_len = min(args.max_model_len or 4096, cfg.max_position_embeddings)
    rank_plans = None
    kv_context, kv_sequences = kv_reservation(args, ckpt, max_model_len, kv_sequences)
    if ranks is None:
        plan = resolve_plan(args, ckpt, kv_context, kv_sequences)
    else:
        from tilemem.engine.ranks import rank_plan, run_facts

        if args.async_planning:
            raise ConfigError("async planning does not run with expert parallelism yet; drop --async-planning.")
        plan, rank_plans = rank_plan(args, ckpt, ranks, kv_context, kv_sequences)
        ranks.agree(run_facts(ckpt, plan))
    skip = None
    if plan is not None:  # FFN weights come from the tile store, where the plan puts them
        from tilemem.models.topology import is_ffn_weight as skip
    device = device_for(plan, args.device)
    model, _ = load_model(
        ckpt, args.dtype, max_positions=max_model_len, skip=skip, device=device,
        lazy_x12=encodes_x12(args, cfg, plan, device),  # read once, to be encoded: not worth mapping first
        dequantize=args.dequantize,
    )  # fmt: skip
    parts = EngineParts(args, Path(args.model), ckpt, model, device, max_model_len, plan, ranks=ranks)
    parts.followers = followers
    parts.rank_plans = rank_plans
    if ranks is not None:  # the other ranks stop when this process ends, even if nobody closed the parts
        ref = weakref.ref(parts)
        atexit.register(lambda: (p := ref()) is not None and p.close())
    if plan is None:
        model.prepare_weights(args.weight_codec)
    else:
        from tilemem.runtime.setup import attach_tiered, ensure_store, load_profile

        if ranks is not None:  # one process per machine builds a missing tile store, the others wait for it
            if ranks.setup.local_rank == 0:
                ensure_store(ckpt, plan, args.store)
            ranks.barrier()
        prof = load_profile(args.profile, plan.topology) if args.profile is not None else None
        runtime = args.tiered_config(plan_prefetch=plan.settings.get("prefetch", True))
        parts.tiered = attach_tiered(
            model, ckpt, plan, args.store, runtime, prof, progress=ranks is None or ranks.rank == 0
        )
        if ranks is not None:
            for block in model.moe_blocks().values():
                block.reduce = ranks.all_reduce
            model.head_split = ranks
        if args.async_planning:
            from tilemem.runtime.setup import start_async_planning

            parts.replanner = start_async_planning(parts.tiered, plan, args.replan_interval_s)
    path = parts.path
    if path.is_file():  # a GGUF file: tokenizer and eos from its metadata
        has_vocab = ckpt.file.get("tokenizer.ggml.tokens") is not None
        parts.tokenizer = TextTokenizer(path) if has_vocab else None
        parts.generation_config = {}
    else:
        parts.tokenizer = TextTokenizer(path) if (path / "tokenizer.json").exists() else None
        gen_file = path / "generation_config.json"
        parts.generation_config = read_json_object(gen_file, CheckpointError) if gen_file.exists() else {}
    eos = parts.generation_config.get("eos_token_id", list(cfg.eos_token_ids))
    parts.eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    if args.speculative == "mtp" and getattr(model, "mtp", None) is None:
        from tilemem.speculative.drafters import MTPDrafter

        MTPDrafter(model)  # raises the clear "no MTP layers" error now, not at the first request
    return parts


def kv_reservation(args: EngineArgs, ckpt: Checkpoint, max_model_len: int, kv_sequences: int) -> tuple[int, int]:
    """(tokens, sequences) of KV cache a plan keeps memory for: `kv_sequences` sequences of `max_model_len` tokens,
    or with `--kv-memory` the tokens that many bytes hold (one sequence's worth)."""
    if args.kv_memory is None:
        return max_model_len, kv_sequences
    from tilemem.units import parse_bytes

    cfg = ckpt.config
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.is_mla else 2 * cfg.num_kv_heads * cfg.head_dim
    elem = 4 if "32" in str(args.dtype or cfg.torch_dtype) else 2
    return max(1, parse_bytes(args.kv_memory, "kv_memory") // (width * cfg.num_layers * elem)), 1


def resolve_plan(args: EngineArgs, ckpt: Checkpoint, max_model_len: int = 4096, kv_sequences: int = 1):
    """The Plan of `args`: `args.plan` (a Plan or a plan directory), one made from `args.budget`, else
    None when the model fits all resident, or one made automatically when it does not (`engine.fit`)."""
    if args.plan is None and args.budget is None:
        from tilemem.engine.fit import default_plan

        return default_plan(args, ckpt, max_model_len, sequences=kv_sequences)
    from tilemem.artifacts.mir import load_plan
    from tilemem.placement.plan import Plan
    from tilemem.runtime.setup import make_plan

    if args.plan is not None:
        return args.plan if isinstance(args.plan, Plan) else load_plan(args.plan)
    return make_plan(
        ckpt, args.budget, args.policy, args.profile, args.tile, dtype=args.weights_dtype(ckpt.config),
        memory_limit=args.memory_limit,
        context=max_model_len, sequences=kv_sequences, store=args.store,
    )  # fmt: skip


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


def encodes_x12(args: EngineArgs, cfg, plan, device: str) -> bool:
    """Whether loading will encode weights as x12 (`MoECausalLM.prepare_weights`): all resident, bf16
    weights kept in the checkpoint's dtype, on the CPU with the native kernels."""
    from tilemem import kernels
    from tilemem.loader.checkpoint import DTYPE_NAMES, parse_dtype

    target = parse_dtype(args.dtype, cfg.torch_dtype if cfg.torch_dtype in DTYPE_NAMES else "bfloat16")
    on_cpu = plan is None and device == "cpu" and kernels.available()
    stored = DTYPE_NAMES.get(cfg.torch_dtype)  # what config.json declares the shards hold
    return args.weight_codec == "x12" and on_cpu and target == stored == torch.bfloat16
