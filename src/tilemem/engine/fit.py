"""Default = fit: with neither `plan` nor `budget`, run the model all resident when that fits the memory
the process may use (`tilemem.memlimit`), else plan automatically (as `--budget auto --policy auto`) and
say so in one line; when even no expert in memory cannot fit, stop with the numbers and what would fit.

plan = default_plan(args, ckpt, max_model_len)  # None: all resident
plan = default_plan(args, ckpt, max_model_len, sequences=8)  # the server: 8 full-length KV slots
"""

from __future__ import annotations

from collections.abc import Callable

from tilemem.engine.args import ENGINE_FIELDS, EngineArgs
from tilemem.errors import BudgetError
from tilemem.loader.checkpoint import Checkpoint
from tilemem.memlimit import memory_limit
from tilemem.models.topology import Topology
from tilemem.tmap.auto import SAFETY_MARGIN, kv_reserve
from tilemem.units import format_bytes


def default_plan(
    args: EngineArgs, ckpt: Checkpoint, max_model_len: int, log: Callable[[str], None] = print, sequences: int = 1
):
    """None when the all-resident model and the KV cache of `sequences` sequences of `max_model_len` tokens
    (as `--budget auto` counts it) fit the memory limit less the safety margin; else a plan made as
    `--budget auto` within that limit, with `--policy auto` unless a policy was given. Raises BudgetError
    when the non-expert weights and that KV cache alone do not fit."""
    from tilemem.runtime.gguf_source import ffn_types, quantized_bytes

    dtype = args.weights_dtype(ckpt.config)
    # a GGUF model's FFNs and other quantized weights: their blocks' bytes
    topo = Topology.from_config(ckpt.config, dtype, ffn_types(ckpt), quantized_bytes(ckpt))
    limit = memory_limit(args.memory_limit)
    kv = kv_reserve(topo, max_model_len, sequences)
    usable = int(limit.available * (1 - SAFETY_MARGIN))
    if topo.total_bytes + kv <= usable:
        return None
    seqs = f" x {sequences} sequences" if sequences > 1 else ""
    kv_text = f"{format_bytes(kv)} KV cache ({max_model_len} tokens{seqs})"
    if topo.non_expert_bytes + kv > usable:
        per_token = kv_reserve(topo, 1, sequences)
        tokens = (usable - topo.non_expert_bytes) // per_token if per_token else 0
        shorter = f"--max-model-len {tokens}, " if tokens >= 1 else ""
        if sequences > 1:
            shorter += "a smaller --max-batch, "
        raise BudgetError(
            f"{ckpt.path.name} cannot run within {limit.describe()}: even with every expert on disk it needs "
            f"{format_bytes(topo.non_expert_bytes)} of non-expert weights + {kv_text}, more than the "
            f"{format_bytes(usable)} left after a {SAFETY_MARGIN:.0%} margin; try {shorter}a smaller format "
            "(e.g. --dtype bf16 for fp32 weights), or a higher --memory-limit."
        )
    policy = "auto" if args.policy == ENGINE_FIELDS["policy"].default else args.policy  # a given policy stays
    log(
        f"{ckpt.path.name} needs {format_bytes(topo.total_bytes)} of weights + {kv_text} all resident, more than "
        f"{limit.describe()} allows with a {SAFETY_MARGIN:.0%} margin: planning automatically "
        f"(--budget auto --policy {policy}); give --budget or --plan to choose"
    )
    from tilemem.runtime.setup import make_plan

    return make_plan(
        ckpt, "auto", policy, args.profile, args.tile, dtype=dtype, memory_limit=args.memory_limit,
        context=max_model_len, sequences=sequences, store=args.store,
    )  # fmt: skip
