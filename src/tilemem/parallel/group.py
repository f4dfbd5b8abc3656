"""The ranks of a distributed run, on torch.distributed: who we are, how to reach the others, the collectives.

Rank 0 owns the scheduler; every step it sends the other ranks the batch (`send` / `receive` on a control group
that waits as long as a server may idle), and every MoE layer sums the ranks' partial outputs with one
`all_reduce` on the default group (gloo on CPU, NCCL on CUDA), which gives up after `timeout_s`. A collective
that fails (a rank died: its sockets closed) or times out (a rank hangs) raises `RankError` naming the rank.

setup = RankSetup.resolve(world_size=2, rank=0, master_addr="10.0.0.1", master_port=29500)
group = RankGroup(setup)
group.all_reduce(partial)  # [T, D] fp32, summed over ranks in place
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tilemem.errors import ConfigError, RankError

DEFAULT_PORT = 29500
"""torchrun's default master port."""
DEFAULT_TIMEOUT_S = 60.0
"""Seconds a collective (and start-up) waits for a silent rank before the run stops."""
IDLE_TIMEOUT = timedelta(days=30)
"""How long a following rank waits for rank 0's next step: a server may idle for days."""
TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")
"""The environment torchrun gives each process."""


@dataclass(frozen=True)
class RankSetup:
    """One process's place in a distributed run."""

    world_size: int
    """Processes in the run."""
    rank: int
    """This process's rank: 0 owns the scheduler, the tokenizer and the HTTP server."""
    master_addr: str = "127.0.0.1"
    """Rank 0's host (its TCP store: rendezvous)."""
    master_port: int = DEFAULT_PORT
    """Rank 0's TCP store port."""
    local_rank: int = 0
    """Rank among the processes of this machine (the one that builds a shared tile store)."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    """Seconds start-up and every collective wait for a silent rank."""
    local_world: int = 1
    """Ranks on this machine, sharing its memory (torchrun's LOCAL_WORLD_SIZE; every rank where rank 0 is local)."""

    @classmethod
    def resolve(
        cls,
        world_size: int | None = None,
        rank: int | None = None,
        master_addr: str | None = None,
        master_port: int | None = None,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> RankSetup | None:
        """The setup from flags, else from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR,
        MASTER_PORT); None for a single process. Flags win over the environment."""
        env = os.environ if env is None else env
        from_env = world_size is None and "WORLD_SIZE" in env
        if from_env:
            world_size = _env_int(env, "WORLD_SIZE")
            rank = _env_int(env, "RANK") if rank is None else rank
        if world_size is None or world_size == 1:
            return None
        if world_size < 1:
            raise ConfigError(f"world size must be at least 1 (--world-size), got {world_size}.")
        if rank is None:
            raise ConfigError(
                f"a run of {world_size} ranks needs this process's rank: pass --rank R (0 to {world_size - 1}), or "
                "launch with torchrun, which sets RANK."
            )
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be between 0 and {world_size - 1} (--rank), got {rank}.")
        addr = master_addr or env.get("MASTER_ADDR") or "127.0.0.1"
        port = (
            master_port
            if master_port is not None
            else (_env_int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT)
        )
        if not 0 < port < 65536:
            raise ConfigError(f"master port must be between 1 and 65535 (--master-port), got {port}.")
        here = addr in ("127.0.0.1", "localhost")  # every rank on this machine, else (unless torchrun says) one per
        local = _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else (rank if here else 0)
        local_world = _env_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else (world_size if here else 1)
        timeout = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
        return cls(world_size, rank, addr, port, local, timeout, max(1, local_world))

    @property
    def leader(self) -> bool:
        """Rank 0: the one that schedules."""
        return self.rank == 0


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"environment variable {name}={env[name]!r} is not an integer (torchrun sets it).") from None


@dataclass
class ReduceStats:
    """What the per-layer all-reduces cost this process."""

    calls: int = 0
    seconds: float = 0.0
    bytes: int = 0


class RankGroup:
    """This process's membership in the run: the default group (the all-reduces, `timeout_s`), a control group
    (rank 0's step messages: `timeout_s` on rank 0, no practical timeout on the others: a server idles) and a
    start-up group (plans, checksums, waiting for a tile store: no practical timeout)."""

    def __init__(self, setup: RankSetup, device: str = "cpu", join_timeout_s: float | None = None) -> None:
        """Join the run: wait up to `join_timeout_s` (default `setup.timeout_s`) for every rank to arrive."""
        self.setup = setup
        self.rank, self.world_size = setup.rank, setup.world_size
        self.device = torch.device(device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":  # NCCL: one GPU per rank; `cuda` means this machine's local_rank-th
            torch.cuda.set_device(self.device.index if self.device.index is not None else setup.local_rank)
        timeout = timedelta(seconds=setup.timeout_s)
        join = setup.timeout_s if join_timeout_s is None else join_timeout_s
        try:  # the rendezvous waits `join`; the collectives, `timeout`
            store = dist.TCPStore(
                setup.master_addr, setup.master_port, self.world_size, setup.leader, timedelta(seconds=join)
            )
            dist.init_process_group(backend, store=store, world_size=self.world_size, rank=self.rank, timeout=timeout)
        except (RuntimeError, ValueError, OSError) as exc:  # torch raises DistStoreError (a RuntimeError) on timeout
            raise RankError(
                f"rank {self.rank} of {self.world_size} could not join the run at "
                f"{setup.master_addr}:{setup.master_port} "
                f"within {join:g} s ({_first_line(exc)}); start every rank with the same --world-size, "
                "--master-addr and --master-port (rank 0 listens there), check the firewall, or raise --dist-timeout."
            ) from None
        # Step messages: rank 0 gives up on a rank that does not take one within the timeout (each process enforces
        # its own timeout), the other ranks wait as long as rank 0 idles. Start-up (which may wait for a tile store
        # being built) waits long on every rank.
        self.control = dist.new_group(backend="gloo", timeout=timeout if setup.leader else IDLE_TIMEOUT)
        self.startup = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.stats = ReduceStats()
        self.closed = False

    # -- collectives -----------------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place (the same result on every rank)."""
        t0 = time.perf_counter()
        try:
            dist.all_reduce(t)
        except Exception as exc:  # noqa: BLE001 - gloo/NCCL raise RuntimeError subclasses of their own
            raise self._lost("an all-reduce", exc) from None
        self.stats.calls += 1
        self.stats.bytes += t.numel() * t.element_size()
        self.stats.seconds += time.perf_counter() - t0
        return t

    def span(self, n: int) -> tuple[int, int]:
        """This rank's [a, b) of n columns cut into world_size equal parts (the last may be shorter or empty)."""
        per = -(-n // self.world_size)
        a = min(n, self.rank * per)
        return a, min(n, a + per)

    def gather_columns(self, part: torch.Tensor, n: int) -> torch.Tensor | None:
        """Rank 0: every rank's `part` [..., b - a] (its `span(n)` of the last dimension) side by side, [..., n];
        the other ranks send theirs and get None."""
        per = -(-n // self.world_size)
        padded = torch.zeros(*part.shape[:-1], per, dtype=part.dtype, device=part.device)
        padded[..., : part.shape[-1]] = part
        parts = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == 0 else None
        t0 = time.perf_counter()
        try:
            dist.gather(padded, parts, dst=0)
        except Exception as exc:  # noqa: BLE001
            raise self._lost("gathering the logits", exc) from None
        self.stats.seconds += time.perf_counter() - t0
        return torch.cat(parts, dim=-1)[..., :n] if parts is not None else None

    def send(self, message: Any) -> None:
        """Rank 0: give every rank `message` (any picklable object)."""
        try:
            dist.broadcast_object_list([message], src=0, group=self.control)
        except Exception as exc:  # noqa: BLE001
            raise self._lost("sending the next step", exc) from None

    def receive(self) -> Any:
        """Other ranks: the next message of rank 0 (waits while rank 0 idles)."""
        box: list[Any] = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=self.control)
        except Exception as exc:  # noqa: BLE001
            raise RankError(
                f"rank {self.rank}: rank 0 is gone ({_first_line(exc)}); this rank stops too. Restart every rank."
            ) from None
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, value, group=self.startup)
        except Exception as exc:  # noqa: BLE001
            raise self._lost("start-up", exc) from None
        return out

    def share(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        box = [value if self.rank == 0 else None]
        try:
            dist.broadcast_object_list(box, src=0, group=self.startup)
        except Exception as exc:  # noqa: BLE001
            raise self._lost("start-up", exc) from None
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank gets here (no timeout: a rank may be building a tile store)."""
        self.gather(None)

    def agree(self, facts: dict[str, str]) -> None:
        """Refuse to run unless every rank has the same `facts` (name -> checksum): version, checkpoint, plan."""
        everyone = self.gather(facts)
        for r, theirs in enumerate(everyone):
            for name in facts:
                if theirs.get(name) != everyone[0].get(name):
                    raise RankError(
                        f"rank {r} has a different {name} than rank 0 ({theirs.get(name)} vs {everyone[0].get(name)}); "
                        "every rank must run the same TileMEM version on the same checkpoint (and plan): copy them "
                        "to every machine and restart."
                    )

    def _lost(self, what: str, exc: BaseException) -> RankError:
        """The error for a collective that failed: which rank went silent, as far as this rank can tell."""
        message = _first_line(exc)
        timed_out = "timeout" in message.lower() or "timed out" in message.lower()
        others = [r for r in range(self.world_size) if r != self.rank]
        named = [r for r in _ranks_named(message) if r != self.rank and r < self.world_size]
        suspects = named or others
        who = f"rank {suspects[0]}" if len(suspects) == 1 else "one of ranks " + ", ".join(map(str, suspects))
        how = f"did not answer within {self.setup.timeout_s:g} s" if timed_out else "is gone (its connection closed)"
        return RankError(
            f"rank {self.rank}: {who} {how} during {what} ({message}); the run stops. Restart every rank "
            "(a slow rank needs a longer --dist-timeout)."
        )

    def close(self) -> None:
        """Leave the run (after the last step)."""
        if not self.closed and dist.is_initialized():
            self.closed = True
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group cannot be torn down cleanly; the process ends anyway
                pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (a rendezvous for ranks on this machine, a test server)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _ranks_named(message: str) -> list[int]:
    """Ranks a gloo / c10d error message names (`[Rank 1]`, `rank 1`, `Ranks 1, 2`), if any."""
    m = re.search(r"[Rr]anks? ((?:\d+(?:,\s*)?)+)", message)
    return [int(x) for x in re.findall(r"\d+", m.group(1))] if m else []
