"""`EngineArgs`: everything that builds an engine, in one frozen dataclass.

`LLM(path, **kwargs)`, `tilemem generate/serve/bench` and the server all build from it: the CLI flags are
generated from its fields (`tilemem.cli.engine_flags`), and every range and choice is checked here, once.

args = EngineArgs("ckpt/", dtype="bf16", threads=2, budget="cpu=4GiB")
llm = LLM.from_args(args)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tilemem.errors import ConfigError

WEIGHT_CODECS = ("x12", "none")
"""How the all-resident CPU engine keeps the weights decode streams."""
SPECULATIVE_KINDS = ("ngram", "mtp", "draft:PATH")
"""What `speculative` accepts."""


def _dtype_names() -> tuple[str, ...]:
    from tilemem.loader.checkpoint import DTYPE_NAMES

    return tuple(DTYPE_NAMES)


def _policy_names() -> tuple[str, ...]:
    from tilemem.placement.policies import policy_names

    return (*policy_names(), "auto")


def _cache_policies() -> tuple[str, ...]:
    from tilemem.runtime.tile_cache import POLICIES

    return tuple(POLICIES)


def arg(default: Any, help: str, flag: str | None = None, **extra: Any) -> Any:
    """A field whose metadata drives its CLI flag: `flag` (None: derived from the name, "" for none),
    `help`, and optionally `choices` (a tuple or a callable giving one), `minimum` / `above` (range),
    `unit` (for messages), `action`, `const`, `argparse_choices` (let argparse refuse a bad choice),
    `list_choices` (append the choices to the help)."""
    return field(default=default, metadata={"help": help, "flag": flag, **extra})


@dataclass(frozen=True)
class EngineArgs:
    """How to load a checkpoint and run it: precision, threads, batching, placement, speculation."""

    model: str | Path = arg(None, "checkpoint directory or .gguf file", flag="")
    """Hugging Face checkpoint directory or GGUF file (positional on the command line)."""
    dtype: str | Any | None = arg(
        None, "bf16, fp16 or fp32 (default: the checkpoint's; FP8 checkpoints: the activations')", choices=_dtype_names
    )
    """Compute dtype: a name (bf16, fp16, fp32 and long forms) or a torch.dtype; None: the checkpoint's. On an
    FP8 checkpoint, the activations' dtype (bf16 by default, fp32 for exact comparisons): its weights stay FP8."""
    dequantize: bool = arg(
        False, "FP8 checkpoint: dequantize its weights to --dtype at load (2x the memory)", action="store_true"
    )
    """FP8 checkpoint: dequantize the weights loaded into memory to `dtype` at load instead of computing on FP8
    (a tile store keeps the tiles as the checkpoint has them)."""
    threads: int | None = arg(None, "torch threads (default: torch's)", minimum=1, unit=" thread")
    """Torch intra-op threads; None leaves torch's setting alone."""
    max_batch: int = arg(8, "sequences decoded together (KV-cache slots)", minimum=1, unit=" sequence")
    """Most sequences decoded together (KV-cache slots)."""
    max_model_len: int | None = arg(None, "context length (default: the model's, <= 4096)", minimum=1, unit=" token")
    """Context length in tokens; None: the model's, at most 4096."""
    prefill_chunk: int = arg(4096, "most prompt tokens per engine step", minimum=1, unit=" token")
    """Most prompt tokens one forward pass takes, over all prompts (vLLM's max_num_batched_tokens)."""
    plan: Any = arg(None, "plan directory from `tilemem plan`")
    """A Plan or a plan directory; routed experts then follow it through the tiered runtime."""
    budget: str | None = arg(
        None,
        "tier budgets, e.g. cpu=4GiB (rest on disk) or auto (default: all resident when that fits the memory "
        "limit, else auto)",
    )
    """Tier budgets to plan for (e.g. `cpu=4GiB`, `auto`); exclusive with `plan`. None (and no plan): all
    resident when that fits the memory limit, else as `auto` (`tilemem.engine.fit`)."""
    memory_limit: str | int | None = arg(
        None,
        "the memory the process may use, e.g. 6GiB; --budget auto and the default plan within it (default: "
        "measured: the cgroup's limit, RLIMIT_AS/RLIMIT_DATA or the available memory, the smallest)",
    )
    """The whole process's memory cap (e.g. `6GiB`) that `budget="auto"` (and no budget) plans within,
    overriding the measured one (`tilemem.memlimit`); None: measured."""
    policy: str = arg("tilepo_fine", "placement policy used with --budget", choices=_policy_names, list_choices=True)
    """Placement policy used with `budget` (any registered policy, or `auto`)."""
    profile: Any = arg(None, "profile.json guiding the plan")
    """A Profile or a profile.json guiding the plan (None: uniform routing)."""
    store: str | Path | None = arg(None, "tile store (default: beside the checkpoint, built if missing)")
    """Tile store directory (None: beside the checkpoint, converted when missing)."""
    tile: int | None = arg(
        None,
        "tile size for --budget plans (neurons; default 128, or a GGUF model's down block if larger: 256 for K-quants)",
        flag="--tile-size",
        minimum=1,
        unit=" neuron",
    )
    """Neurons per tile for plans made from `budget`; None: `runtime.setup.make_plan`'s default."""
    cache_policy: str = arg("lfu", "tile cache eviction: lru, lfu or profile", choices=_cache_policies)
    """Tiered runtime: eviction policy of the DRAM tile cache."""
    prefetch: bool | str | None = arg(
        None,
        "disable next-layer prefetch (default: on while it is used)",
        flag="--no-prefetch",
        action="store_const",
        const=False,
        choices=(None, True, False, "auto"),
    )
    """Tiered runtime: next-layer prefetch, True / False / "auto"; None: as the plan says ("auto" unless
    the plan was compiled with prefetch off)."""
    runtime: Any = arg(None, "", flag="")
    """A full TieredConfig (Python API only); overrides `cache_policy` and `prefetch`."""
    async_planning: bool = arg(False, "re-plan from live routing and migrate tiles", action="store_true")
    """Re-solve the plan from live routing in the background and migrate tiles (needs a DRAM budget)."""
    replan_interval_s: float = arg(
        2.0, "seconds between background re-plans", flag="--replan-interval", above=0, unit=" s"
    )
    """Seconds between two re-plans of async planning."""
    speculative: str | None = arg(None, "speculative decoding: ngram, mtp or draft:PATH", flag="--spec")
    """Speculative decoding: `ngram`, `mtp` or `draft:PATH` (a draft checkpoint, loaded with `dtype`)."""
    num_draft: int = arg(4, "draft tokens per speculative step (k)", minimum=1, unit=" token")
    """Draft tokens proposed per speculative step (k)."""
    device: str | None = arg(None, "cpu or cuda (default: cuda when --budget gives cuda a share)")
    """Where non-expert weights live and activations flow: cpu, cuda or cuda:N; None: cuda when the
    plan gives the GPU a budget, else cpu."""
    weight_codec: str = arg(
        "x12",
        "how the all-resident CPU engine keeps the weights decode streams: x12 (12 bits per weight, "
        "lossless, the default) or none (bf16 as loaded)",
        choices=WEIGHT_CODECS,
        argparse_choices=True,
    )
    """All-resident CPU engine: x12 (12 bits per weight, lossless) or none (bf16 as loaded)."""

    kv_memory: str | int | None = arg(
        None,
        "most memory the paged KV cache may hold, e.g. 4GiB; plans keep it free (default: half the available "
        "memory, at most --max-batch sequences of --max-model-len tokens)",
    )
    """Most bytes the paged KV cache may grow to (e.g. `4GiB`); plans made here count it in the DRAM (or VRAM)
    budget. When its blocks run out, the youngest sequence is preempted and recomputed later. None: half the memory
    available at start-up, at most `max_batch` sequences of `max_model_len` tokens."""
    kv_block_size: int = arg(16, "token positions per KV-cache block", minimum=1, unit=" token")
    """Token positions per KV-cache block."""
    prefix_caching: bool = arg(
        True, "do not reuse the KV blocks of a prompt prefix seen before", flag="--no-prefix-caching",
        action="store_false",
    )  # fmt: skip
    """Reuse the cached KV blocks of a prompt's prefix (full blocks, keyed by their tokens and all before them)."""

    world_size: int | None = arg(
        None,
        "expert parallelism: ranks in the run (default: 1, or torchrun's WORLD_SIZE); without --rank, rank 0 starts "
        "the others on this machine",
        minimum=1,
        unit=" rank",
    )
    """Processes sharing the routed experts (torch.distributed); None: 1, or torchrun's `WORLD_SIZE`. Without `rank`
    (and outside torchrun), this process is rank 0 and starts ranks 1..N-1 on this machine."""
    rank: int | None = arg(None, "this process's rank (0 schedules and serves; the others follow it)", minimum=0)
    """This process's rank (rank 0 owns the scheduler, tokenizer and server); None: torchrun's `RANK`, or 0 with
    the other ranks started here."""
    master_addr: str | None = arg(None, "rank 0's host, where the ranks meet (default: 127.0.0.1 or MASTER_ADDR)")
    """Rank 0's host (its TCP store); None: torchrun's `MASTER_ADDR`, else 127.0.0.1."""
    master_port: int | None = arg(
        None, "rank 0's TCP port for the rendezvous (default: 29500 or MASTER_PORT)", minimum=1
    )
    """Rank 0's TCP store port; None: torchrun's `MASTER_PORT`, else 29500 (a free port for ranks started here)."""
    dist_timeout: float = arg(60.0, "seconds a rank waits for a silent rank before the run stops", above=0, unit=" s")
    """Seconds start-up and each all-reduce wait for a silent (dead or hung) rank before the run stops."""
    rank_split: str = arg(
        "tile", "how experts are shared out among ranks: expert (whole), tile (hot ones split too where that balances "
        "the expected load) or even (every expert split evenly: balanced for every token)",
        choices=("expert", "tile", "even"),
    )  # fmt: skip
    """Expert parallelism: `expert` partitions whole routed experts; `tile` also splits hot experts by tiles; `even`
    gives each rank an equal tile range of every expert."""

    def __post_init__(self) -> None:
        self.validate()

    # -- checks --------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every range and choice; raise ConfigError naming the field, its flag, the bad value and
        what is allowed."""
        if self.model is None or str(self.model) == "":
            raise ConfigError("EngineArgs needs a model: the checkpoint directory.")
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            meta = f.metadata
            if "minimum" in meta or "above" in meta:
                _check_number(f.name, value, meta.get("minimum"), meta.get("above"), meta.get("unit", ""))
            if "choices" in meta and not (f.name == "dtype" and not isinstance(value, str)):
                _check_choice(f.name, value, meta["choices"])
        if self.speculative is not None:
            self._check_speculative()
        if self.device is not None:
            d = self.device
            if not isinstance(d, str) or not (d in ("cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
                raise ConfigError(f"unknown device '{d}'; use 'cpu' or 'cuda' (or 'cuda:N') with {flag_of('device')}.")
        if self.memory_limit is not None:
            self._check_memory_limit()
        if self.kv_memory is not None:
            self._check_bytes("kv_memory", "4GiB")
        if self.plan is not None and self.budget is not None:
            raise ConfigError("give either --plan or --budget (a plan, or a budget to plan for), not both.")

    def _check_memory_limit(self) -> None:
        self._check_bytes("memory_limit", "6GiB")

    def _check_bytes(self, name: str, example: str) -> None:
        from tilemem.units import parse_bytes

        value = getattr(self, name)
        try:
            n = parse_bytes(value, name) if isinstance(value, str | int) and not isinstance(value, bool) else None
        except ConfigError:
            n = None
        if n is None or n <= 0:
            raise ConfigError(
                f"{name} ({flag_of(name)}) must be a positive byte size such as {example}, 512MiB or "
                f"8000000000, got {value!r}."
            )

    def _check_speculative(self) -> None:
        spec = self.speculative
        if spec in ("ngram", "mtp") or (isinstance(spec, str) and self.draft_model):
            return
        raise ConfigError(
            f"unknown speculative method {spec!r} ({flag_of('speculative')}); use one of "
            f"{', '.join(SPECULATIVE_KINDS)}."
        )

    # -- derived -------------------------------------------------------------------------------
    @property
    def draft_model(self) -> str | None:
        """The draft checkpoint of `speculative="draft:PATH"`, else None."""
        spec = self.speculative
        return spec[6:] if spec is not None and spec.startswith("draft:") else None

    def weights_dtype(self, cfg) -> str | None:
        """The dtype plans count the weights of a checkpoint with config `cfg` in: None (as stored) for an FP8
        checkpoint, whose weights stay FP8 whatever `dtype` (the activations') says, unless `dequantize`;
        else `dtype`'s name (None: the checkpoint's)."""
        if self.dtype is None or (cfg.weight_format and not self.dequantize):
            return None
        return str(self.dtype).replace("torch.", "")

    def kv_settings(self):
        """The paged KV cache's settings (`engine.kv_blocks.KVSettings`)."""
        from tilemem.engine.kv_blocks import KVSettings
        from tilemem.units import parse_bytes

        memory = None if self.kv_memory is None else parse_bytes(self.kv_memory, "kv_memory")
        return KVSettings(memory, self.kv_block_size, self.prefix_caching, self.memory_limit)

    def tiered_config(self, plan_prefetch: bool = True):
        """The tiered runtime's settings: `runtime` if given, else `cache_policy` and `prefetch`
        (`plan_prefetch`: what the plan says when `prefetch` is None)."""
        from tilemem.runtime.tiered import TieredConfig

        if self.runtime is not None:
            return self.runtime
        prefetch = self.prefetch
        if prefetch is None:
            prefetch = "auto" if plan_prefetch else False
        elif prefetch is True:
            prefetch = "auto"
        return TieredConfig(cache_policy=self.cache_policy, prefetch=prefetch)


def keyword_signature() -> inspect.Signature:
    """`(self, path, *, dtype=None, threads=None, ...)`: EngineArgs' fields as keywords, for callers such
    as `LLM(path, **kwargs)` that take them (so `help(LLM)` and IDEs show every argument)."""
    params = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("path", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="str | Path"),
    ]
    for f in fields(EngineArgs):
        if f.name != "model":
            params.append(
                inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
            )
    return inspect.Signature(params, return_annotation="None")


def flag_of(name: str) -> str:
    """The command-line flag of EngineArgs field `name` (`--tile-size` for `tile`)."""
    f = ENGINE_FIELDS[name]
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def allowed(choices: tuple | Callable[[], tuple]) -> tuple:
    """A field's allowed values (its `choices` metadata, called when it is a callable)."""
    return choices() if callable(choices) else choices


def _check_number(name: str, value: Any, minimum: float | None, above: float | None, unit: str) -> None:
    flag = flag_of(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} ({flag}) must be a number, got {value!r}.")
    if minimum is not None and not value >= minimum:  # `not >=`: NaN fails too
        raise ConfigError(f"{name} must be at least {minimum}{unit} ({flag}), got {value}.")
    if above is not None and not value > above:
        raise ConfigError(f"{name} must be greater than {above}{unit} ({flag}), got {value}.")


def _check_choice(name: str, value: Any, choices: tuple | Callable[[], tuple]) -> None:
    options = allowed(choices)
    key = value.lower() if name == "dtype" and isinstance(value, str) else value
    if key not in options:
        shown = ", ".join(str(o) for o in options if o is not None)
        raise ConfigError(f"{name} must be one of {shown} ({flag_of(name)}), got {value!r}.")


ENGINE_FIELDS = {f.name: f for f in fields(EngineArgs)}
"""EngineArgs fields by name."""
