"""The engine thread: owns the `Engine`, steps it while there is work, hands tokens to asyncio.

HTTP handlers (on the event loop) call `submit` / `abort` / `drain`; those only put commands on a
thread-safe inbox. The engine thread applies them between steps (so a cancelled request's KV-cache
slot is free before the next step), runs `Engine.step()`, and pushes each request's new tokens into
its own `asyncio.Queue` with `loop.call_soon_threadsafe`. New requests join the running batch at the
next step; finished ones leave it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tilemem.engine.engine import Engine, StepEvent
from tilemem.engine.sequence import Sequence
from tilemem.errors import RankError

log = logging.getLogger(__name__)

_handle_ids = itertools.count()

STEP_HISTORY = 8192
"""Engine steps whose StepStats the engine keeps (older ones are dropped)."""


class QueueFullError(Exception):
    """The bounded request queue has no room."""


class ShuttingDownError(Exception):
    """The server is draining for shutdown and takes no new requests."""


class RequestTooLargeError(Exception):
    """One request has more sequences than the server can ever hold at once (slots + queue)."""


@dataclass(frozen=True)
class TokenDelta:
    """One new token of one choice (or that choice's end)."""

    index: int
    """Choice index within its request."""
    token_id: int | None
    """The sampled token (None when the choice failed or was cancelled)."""
    text: str
    """Text released with this token (text that may start a stop string is held back)."""
    logprob: float | None = None
    """Log-probability of the token, when asked for."""
    top_logprobs: dict[int, float] | None = None
    """Most likely alternatives, when asked for."""
    finish_reason: str | None = None
    """Set on a choice's last delta: stop, length, abort or error."""
    error: str | None = None
    """What went wrong, when finish_reason is error; for abort, set when the server ended the choice
    because it shut down (unset when the request was cancelled by its client)."""


@dataclass
class RequestHandle:
    """One HTTP request's sequences (its choices) and the queue its deltas arrive on."""

    seqs: list[Sequence]
    loop: asyncio.AbstractEventLoop
    deltas: asyncio.Queue[list[TokenDelta]] = field(default_factory=asyncio.Queue)
    id: int = field(default_factory=lambda: next(_handle_ids))

    def push(self, deltas: list[TokenDelta]) -> None:
        """Engine thread: hand deltas to the request's event loop (ignored once that loop closed)."""
        try:
            self.loop.call_soon_threadsafe(self.deltas.put_nowait, deltas)
        except RuntimeError:  # the loop is gone (server stopped): nobody is listening
            pass


StepObserver = Callable[[Engine, list[StepEvent], float], None]
"""Called on the engine thread after every step with (engine, events, seconds)."""
FinishObserver = Callable[[Sequence], None]
"""Called on the engine thread when a sequence ends."""


class EngineWorker:
    """Runs an Engine on its own thread; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        max_queue: int = 64,
        on_step: StepObserver | None = None,
        on_finish: FinishObserver | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.slots = engine.max_batch
        self.max_queue = max_queue
        self.on_step = on_step
        self.on_finish = on_finish
        self.on_idle = on_idle
        self.inbox: queue.Queue[tuple[str, object]] = queue.Queue()
        self.lock = threading.Lock()
        self.outstanding = 0  # sequences submitted and not yet finished (guarded by lock)
        self.handles: dict[str, tuple[RequestHandle, int]] = {}  # engine thread only
        self.draining = False
        self.drain_deadline: float | None = None
        self.drain_grace_s: float | None = None
        self.stopped = threading.Event()
        self.failed: str | None = None
        self.fatal: str | None = None
        """Why the engine can never step again (a rank of a distributed run is gone), once it happened."""
        self.on_fatal: Callable[[str], None] | None = None
        """Called on the engine thread with `fatal`'s message (the server then exits non-zero)."""
        self.thread = threading.Thread(target=self._run, name="tilemem-engine", daemon=True)

    # -- any thread ---------------------------------------------------------------------------------
    def start(self) -> EngineWorker:
        """Start the engine thread."""
        self.thread.start()
        return self

    @property
    def capacity(self) -> int:
        """Most sequences the server holds at once: KV-cache slots plus the queue."""
        return self.slots + self.max_queue

    def check_fits(self, count: int) -> None:
        """Raise RequestTooLargeError when one request of `count` sequences could never be queued."""
        if count > self.capacity:
            raise RequestTooLargeError(
                f"this request needs {count} sequences (one per prompt and choice: prompts x n), but the server "
                f"holds at most {self.capacity} at once ({self.slots} KV-cache slots + {self.max_queue} waiting), "
                "so it can never be served; send fewer prompts or a smaller n per request, or start the server "
                "with a larger --max-queue."
            )

    def submit(self, seqs: list[Sequence], loop: asyncio.AbstractEventLoop) -> RequestHandle:
        """Queue a request's sequences; raises RequestTooLargeError, QueueFullError or ShuttingDownError."""
        self.check_fits(len(seqs))
        with self.lock:
            if self.draining or self.stopped.is_set():
                raise ShuttingDownError("the server is shutting down and takes no new requests.")
            waiting = max(0, self.outstanding - self.slots)
            if self.outstanding + len(seqs) > self.slots + self.max_queue:
                raise QueueFullError(
                    f"the request queue is full ({waiting} sequences waiting for {self.slots} KV-cache slots, "
                    f"at most {self.max_queue} may wait); retry later, or start the server with a larger "
                    "--max-queue or --max-batch."
                )
            self.outstanding += len(seqs)
            handle = RequestHandle(seqs, loop)
            self.inbox.put(("add", handle))  # under the lock: the engine thread's exit sees it or we see `draining`
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Cancel a request (client went away): its sequences end and free their slots before the next step."""
        self.inbox.put(("abort", handle))

    def drain(self, grace_s: float) -> None:
        """Take no new requests; let running ones finish for `grace_s` seconds, then end them ("abort")."""
        with self.lock:
            self.draining = True
            self.drain_grace_s = grace_s
        self.inbox.put(("drain", time.monotonic() + grace_s))

    def stop(self, timeout: float = 10.0) -> None:
        """End every request and stop the engine thread."""
        self.inbox.put(("stop", None))
        self.thread.join(timeout)

    def queue_depth(self) -> tuple[int, int]:
        """(running, waiting) sequences, as far as this thread can tell."""
        with self.lock:
            n = self.outstanding
        return min(n, self.slots), max(0, n - self.slots)

    # -- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._apply_commands(block=not self.engine.has_work()):
                if self.drain_deadline is not None and time.monotonic() >= self.drain_deadline:
                    self._end_all("abort", self._shutdown_message())
                if self.engine.has_work():
                    try:
                        self._step()
                    except RankError:
                        raise  # a rank is gone: no step can run again
                    except Exception as exc:  # a bug outside the forward pass: fail what is in flight, go on
                        log.exception("engine step failed")
                        self._end_all("error", f"the engine step failed: {type(exc).__name__}: {exc}")
                elif self.on_idle is not None:
                    self.on_idle()
        except RankError as exc:
            log.error("%s", exc)
            self.failed = self.fatal = str(exc)
            if self.on_fatal is not None:
                self.on_fatal(self.fatal)
        except Exception as exc:
            log.exception("engine thread crashed")
            self.failed = f"{type(exc).__name__}: {exc}"
        finally:
            with self.lock:
                self.draining = True
            self._end_all("abort", self._shutdown_message())
            self._reject_queued()
            self.stopped.set()

    def _shutdown_message(self) -> str:
        """Why a request in flight is ended at shutdown."""
        if self.fatal is not None:
            return (
                f"the server lost a rank of its distributed run and is stopping ({self.fatal}); retry once it is back."
            )
        waited = f" (in-flight requests got --shutdown-grace {self.drain_grace_s:g} s)" if self.drain_grace_s else ""
        return f"the server shut down before this request finished{waited}; retry it once the server is back."

    def _reject_queued(self) -> None:
        """On exit: end requests still in the inbox, so that no handler waits forever."""
        while True:
            try:
                cmd, arg = self.inbox.get_nowait()
            except queue.Empty:
                return
            if cmd == "add":
                with self.lock:
                    self.outstanding -= len(arg.seqs)
                error = self._shutdown_message()
                arg.push([TokenDelta(i, None, "", finish_reason="abort", error=error) for i in range(len(arg.seqs))])

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when idle); False once told to stop."""
        try:
            cmd, arg = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if cmd == "stop":
                return False
            if cmd == "add":
                self._add(arg)
            elif cmd == "abort":
                self._abort(arg)
            elif cmd == "drain":
                self.drain_deadline = arg
            try:
                cmd, arg = self.inbox.get_nowait()
            except queue.Empty:
                return True

    def _add(self, handle: RequestHandle) -> None:
        for i, seq in enumerate(handle.seqs):
            self.handles[seq.request_id] = (handle, i)
            self.engine.add(seq)

    def _abort(self, handle: RequestHandle) -> None:
        for seq in handle.seqs:
            if seq.request_id in self.handles:
                self.engine.abort(seq)
                self._close(seq)

    def _step(self) -> None:
        t0 = time.perf_counter()
        events = self.engine.step()
        dt = time.perf_counter() - t0
        per_handle: dict[int, tuple[RequestHandle, list[TokenDelta]]] = {}
        for ev in events:
            entry = self.handles.get(ev.seq.request_id)
            if entry is None:
                continue
            handle, index = entry
            delta = self._delta(ev, index)
            per_handle.setdefault(handle.id, (handle, []))[1].append(delta)
            if ev.finished:
                self._close(ev.seq, notify=False)
        for handle, deltas in per_handle.values():
            handle.push(deltas)
        if self.on_step is not None:
            self.on_step(self.engine, events, dt)
        steps = self.engine.counters.steps
        if len(steps) > STEP_HISTORY:  # a server runs for days: keep the per-step log bounded
            del steps[: len(steps) - STEP_HISTORY // 2]

    @staticmethod
    def _delta(ev: StepEvent, index: int) -> TokenDelta:
        seq = ev.seq
        logprob = top = None
        if ev.token_id is not None and seq.params.logprobs is not None and seq.logprobs:
            logprob = seq.logprobs[-1]
            top = seq.top_logprobs[-1] if seq.top_logprobs else None
        reason = seq.finish_reason if ev.finished else None
        return TokenDelta(index, ev.token_id, ev.text, logprob, top, reason, seq.error if ev.finished else None)

    def _close(self, seq: Sequence, notify: bool = True) -> None:
        """Forget a finished sequence; with `notify`, tell its request it ended."""
        entry = self.handles.pop(seq.request_id, None)
        if entry is None:
            return
        handle, index = entry
        self.engine.forget(seq)
        if self.on_finish is not None:  # metrics first: once `outstanding` drops, the request is fully accounted
            self.on_finish(seq)
        with self.lock:
            self.outstanding -= 1
        if notify:
            handle.push([TokenDelta(index, None, "", finish_reason=seq.finish_reason or "abort", error=seq.error)])

    def _end_all(self, reason: str, error: str | None) -> None:
        """End every request in flight with `reason`."""
        for handle, index in list(self.handles.values()):
            seq = handle.seqs[index]
            if error is not None:
                seq.error = error
            try:
                self.engine.abort(seq, reason)
            except Exception:  # the engine may be what broke: still answer the request
                log.exception("aborting %s failed", seq.request_id)
                seq.finish_reason = reason
            self._close(seq)
