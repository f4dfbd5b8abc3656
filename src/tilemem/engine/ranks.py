"""Expert parallelism in the engine: rank 0 schedules and mirrors every step to the other ranks, which follow.

Rank 0's `Engine` holds a `Leader`: each KV-cache allocation and forward pass is sent to the other ranks before
rank 0 runs it. Every rank runs the same forward on its replica of the non-expert weights and KV cache, computes
its share of each MoE layer's experts (its plan: `placement.ranks`), and one all-reduce per MoE layer sums the
shares (`MoEBlock.reduce`). `follow` is the other ranks' loop. `start_ranks` joins (or, on one machine, starts)
the run; `rank_plan` gives this rank its plan, made by rank 0 from every rank's own budget.

python -m tilemem.engine.ranks ARGS.pickle   # a rank started by rank 0 on this machine (`spawn_followers`)
"""

from __future__ import annotations

import atexit
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tilemem.engine.args import EngineArgs
from tilemem.errors import ConfigError, RankError, TileMemError
from tilemem.layers.kv_cache import ForwardContext
from tilemem.parallel.group import RankGroup, RankSetup, free_port

STOP = ("stop",)
SPAWN_JOIN_S = 60.0
"""Rank 0 waits at least this long for the ranks it starts itself to join (each imports torch and TileMEM first,
slow on a loaded machine), whatever a short --dist-timeout says for the collectives."""
"""Rank 0's last message: the run is over."""


class Leader:
    """Rank 0's side of the run: every cache allocation and forward pass, sent to the other ranks first."""

    def __init__(self, group: RankGroup) -> None:
        self.group = group

    def allocate(self, blocks: int, block_size: int) -> None:
        """The ranks allocate a paged KV cache of `blocks` blocks of `block_size` positions, as rank 0 is about to."""
        self.group.send(("cache", blocks, block_size))

    def grow(self, blocks: int) -> None:
        """The ranks grow their KV cache to `blocks` blocks, as rank 0 is about to."""
        self.group.send(("grow", blocks))

    def forward(
        self,
        ids: torch.Tensor,
        tables: list[list[int]],
        starts: list[int],
        lengths: list[int],
        logits_at: torch.Tensor | None,
        return_hidden: bool,
    ) -> None:
        """The ranks run the forward pass rank 0 is about to run: ids [B, T], rows with block tables `tables`,
        `starts` cached tokens adding `lengths` tokens; `logits_at` and `return_hidden` as rank 0 passes them (they
        decide which tokens the last layer computes)."""
        self.group.send(("forward", ids, tables, starts, lengths, logits_at, return_hidden))

    def stop(self) -> None:
        """Tell the ranks the run is over."""
        self.group.send(STOP)


def follow(model, group: RankGroup) -> None:
    """The loop of a rank other than 0: run every forward pass rank 0 sends, until it says stop."""
    cache = None
    while True:
        message = group.receive()
        kind = message[0]
        if kind == "stop":
            return
        if kind == "cache":
            cache = None  # free the old one first
            cache = model.allocate_paged(*message[1:])
        elif kind in ("forward", "grow") and cache is None:
            raise RankError(f"rank {group.rank}: rank 0 sent {kind!r} before any KV cache; versions differ?")
        elif kind == "grow":
            cache = cache.grown(message[1])
        elif kind == "forward":
            ids, tables, starts, lengths, logits_at, return_hidden = message[1:]
            ctx = ForwardContext.paged(cache, tables, starts, lengths)
            model(ids, ctx, logits_at=logits_at, return_hidden=return_hidden, head=False)
        else:
            raise RankError(
                f"rank {group.rank}: unknown message {kind!r} from rank 0; every rank must run the same TileMEM."
            )


# -- joining the run --------------------------------------------------------------------------------
def rank_setup(args: EngineArgs) -> RankSetup | None:
    """This process's place in the run `args` asks for (flags, else torchrun's environment); None: one process."""
    return RankSetup.resolve(args.world_size, args.rank, args.master_addr, args.master_port, args.dist_timeout)


def start_ranks(args: EngineArgs) -> tuple[RankGroup | None, list[subprocess.Popen]]:
    """Join the run `args` asks for: (group, []) or, for `world_size` N without `rank` outside torchrun, start ranks
    1..N-1 on this machine first: (group, their processes). (None, []) for a single process."""
    local = args.master_addr in (None, "127.0.0.1", "localhost")
    spawn = args.world_size not in (None, 1) and args.rank is None and local and "WORLD_SIZE" not in os.environ
    if spawn:
        port = args.master_port or free_port()
        args = replace(args, rank=0, master_addr=args.master_addr or "127.0.0.1", master_port=port)
    setup = rank_setup(args)
    if setup is None:
        return None, []
    if spawn and not args.threads:  # rank 0 too takes its share of the cores, as spawn_followers gives the others
        torch.set_num_threads(local_threads(args.world_size))
    procs = spawn_followers(args) if spawn else []
    try:
        join = max(setup.timeout_s, SPAWN_JOIN_S) if spawn else None
        group = RankGroup(setup, args.device or "cpu", join)
    except RankError as exc:
        stop_followers(procs)
        failed = [p.args[-1] for p in procs if p.poll() not in (None, 0)]
        hint = " (a rank started here exited early: see its error above)" if failed else ""
        raise RankError(f"{exc}{hint}") from None
    return group, procs


def local_threads(ranks: int) -> int:
    """Threads of each of `ranks` ranks started on this machine: its cores shared out."""
    return max(1, (os.cpu_count() or 1) // ranks)


def spawn_followers(args: EngineArgs) -> list[subprocess.Popen]:
    """Start ranks 1..N-1 of `args` on this machine, each with its share of the cores unless `threads` says."""
    n = args.world_size
    threads = args.threads or local_threads(n)
    procs = []
    for r in range(1, n):
        rank_args = replace(args, rank=r, threads=threads)
        fd, path = tempfile.mkstemp(prefix=f"tilemem-rank{r}-", suffix=".pickle")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(rank_args, f)
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        procs.append(subprocess.Popen([sys.executable, "-m", "tilemem.engine.ranks", path], env=env))
    atexit.register(stop_followers, procs, 10.0)
    return procs


def stop_followers(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """Wait for ranks started here to finish (they stop when rank 0 says so, or leaves); kill what lingers."""
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()


# -- the plan ---------------------------------------------------------------------------------------
def rank_plan(args: EngineArgs, ckpt, group: RankGroup, max_model_len: int, kv_sequences: int) -> tuple:
    """(this rank's plan, every rank's plans on rank 0 where it has them, else None): from `args.plan` (a directory
    of `tilemem plan --world-size N`, or a list of rank plans), else made by rank 0 for every rank from each rank's
    own budget (`--budget`, default auto: its memory limit)."""
    from tilemem.runtime.setup import make_rank_plans, rank_budget

    plans = None
    if args.plan is not None:
        plan = _given_plan(args.plan, group)
        if group.rank == 0 and isinstance(args.plan, list | tuple):
            plans = list(args.plan)
        elif group.rank == 0 and isinstance(args.plan, str | Path):
            from tilemem.artifacts.mir import load_rank_plan

            plans = [load_rank_plan(args.plan, r) for r in range(group.world_size)]
    else:
        # An automatic budget within the machine's measured memory: split among the ranks that share it.
        share = group.setup.local_world if args.memory_limit is None else 1
        mine = rank_budget(ckpt, args.budget, args.tile, args.weights_dtype(ckpt.config), args.memory_limit,
                           max_model_len, kv_sequences, share)  # fmt: skip
        budgets = group.gather(mine)
        plans = None
        if group.rank == 0:
            try:
                plans = make_rank_plans(
                    ckpt, budgets, args.policy, args.profile, args.tile, args.weights_dtype(ckpt.config),
                    split=args.rank_split,
                )  # fmt: skip
            except TileMemError as exc:
                plans = exc  # every rank raises it, not only rank 0
        plans = group.share(plans)
        if isinstance(plans, Exception):
            raise plans
        plan = plans[group.rank]
    if plan.world_size != group.world_size or plan.rank != group.rank:
        raise ConfigError(
            f"the plan places rank {plan.rank} of {plan.world_size}, but this process is rank {group.rank} of "
            f"{group.world_size}; make one with `tilemem plan MODEL --world-size {group.world_size} ...` and give "
            "every rank the same plan directory."
        )
    return plan, plans if group.rank == 0 else None


def _given_plan(plan: Any, group: RankGroup):
    from tilemem.placement.plan import Plan

    if isinstance(plan, list | tuple):
        return plan[group.rank]
    if isinstance(plan, Plan):
        return plan
    from tilemem.artifacts.mir import load_rank_plan

    return load_rank_plan(plan, group.rank)


def run_facts(ckpt, plan) -> dict[str, str]:
    """What every rank must share, as checksums: TileMEM's version, the checkpoint (its config and tensor table),
    the plan's layout (which tiles, where in the store, on how many ranks)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("tilemem")
    except PackageNotFoundError:  # run from a source tree without installing
        ours = "source"
    tensors = hashlib.sha256(f"{ckpt.config!r}:{ckpt.nbytes()}:".encode())
    for name in sorted(getattr(ckpt, "weight_map", ())):
        tensors.update(f"{name};".encode())
    layout = hashlib.sha256(f"{plan.world_size}:{plan.tile}:{plan.fmt}".encode())
    for t in plan.tiles:
        layout.update(f"{t.key}@{t.offset}+{t.nbytes};".encode())
    return {
        "TileMEM version": ours,
        "checkpoint": tensors.hexdigest()[:16],
        "plan layout": layout.hexdigest()[:16],
    }


def follow_run(args: EngineArgs) -> bool:
    """If `args` make this process a rank other than 0: build its share, follow rank 0 until it stops, return True.
    False (nothing done) for rank 0 or a single process: the caller runs as usual."""
    setup = rank_setup(args)
    if setup is None or setup.rank == 0:
        return False
    from tilemem.engine.build import build_engine

    # An automatic budget keeps room for the KV cache rank 0 may ask for: every slot, if it serves.
    parts = build_engine(args, kv_sequences=args.max_batch)
    try:
        follow(parts.model, parts.ranks)
    finally:
        parts.close()
    return True


def _main(path: str) -> int:
    """A rank started by rank 0 on this machine: build from the pickled EngineArgs, follow, exit."""
    args = pickle.loads(Path(path).read_bytes())
    Path(path).unlink(missing_ok=True)
    try:
        follow_run(args)
    except TileMemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _exit(code: int) -> None:
    """End a follower rank's process with `code` once its Python exit handlers ran, without the interpreter's
    teardown: torch.distributed's C++ threads still held by module globals can abort a finished rank in their static
    destructors ("terminate called without an active exception", seen once in CI on a loaded 2-core machine after a
    clean run), which rank 0 would read as a failed rank."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(_main(sys.argv[1]))
