"""Server metrics: Prometheus series for `/metrics` and live numbers for `/v1/tilemem/stats`.

Both are fed on the engine thread (after each step, and when a sequence ends) and read by HTTP
handlers; prometheus-client and the lock below make that safe. Each server has its own registry.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tilemem.engine.engine import Engine, StepEvent
from tilemem.engine.sequence import Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
WINDOW_S = 5.0
"""Recent tok/s and hit rates are averaged over this many seconds."""


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of `values` by nearest rank; None when empty."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


class ServerMetrics:
    """Prometheus metrics of one server, plus the live window behind the stats page."""

    def __init__(self, queue_depth: Callable[[], tuple[int, int]], runtime=None) -> None:
        self.registry = CollectorRegistry()
        self.runtime = runtime
        r = self.registry
        self.http_requests = Counter(
            "tilemem_http_requests", "HTTP requests by endpoint and status code", ["endpoint", "code"], registry=r
        )
        self.finished = Counter(
            "tilemem_requests_finished", "Sequences ended, by reason", ["finish_reason"], registry=r
        )
        self.prompt_tokens = Counter("tilemem_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("tilemem_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "tilemem_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "tilemem_time_per_output_token_seconds",
            "Mean output token gap",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "tilemem_request_duration_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch = Histogram("tilemem_batch_size", "Sequences per engine step", buckets=BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram("tilemem_step_seconds", "Engine step time", buckets=LATENCY_BUCKETS, registry=r)
        running = Gauge("tilemem_running_sequences", "Sequences holding a KV-cache slot", registry=r)
        running.set_function(lambda: queue_depth()[0])
        waiting = Gauge("tilemem_queue_depth", "Sequences waiting for a KV-cache slot", registry=r)
        waiting.set_function(lambda: queue_depth()[1])
        self.tier_bytes = Counter("tilemem_tier_bytes", "Expert bytes read per tier", ["tier"], registry=r)
        self.cache_hits = Counter("tilemem_cache_hits", "Tile cache hits", registry=r)
        self.cache_misses = Counter("tilemem_cache_misses", "Tile cache misses (disk reads)", registry=r)
        hit_rate = Gauge("tilemem_cache_hit_rate", "Tile cache hit rate since start", registry=r)
        hit_rate.set_function(self._hit_rate)
        self.kv: dict[str, float] = {}
        """The engine's last KV-cache figures (`Engine.kv_stats`), read by the gauges below."""
        for name, key, text in (
            ("tilemem_prefix_cache_hit_rate", "prefix_hit_rate", "Prompt tokens found in the prefix cache, share"),
            ("tilemem_prefix_cache_hit_tokens", "prefix_hit_tokens", "Prompt tokens found in the prefix cache"),
            ("tilemem_prefix_cache_queried_tokens", "prefix_queried_tokens", "Prompt tokens looked up"),
            ("tilemem_kv_blocks_used", "kv_blocks_used", "KV-cache blocks held by sequences"),
            ("tilemem_kv_blocks", "kv_blocks", "KV-cache blocks allocated"),
            ("tilemem_kv_blocks_max", "kv_blocks_max", "Most KV-cache blocks (--kv-memory)"),
            ("tilemem_kv_cache_bytes", "kv_bytes", "Bytes of the KV cache"),
            ("tilemem_preemptions", "preemptions", "Sequences preempted for KV blocks and recomputed"),
        ):
            gauge = Gauge(name, text, registry=r)
            gauge.set_function(lambda key=key: self.kv.get(key, 0.0))
        self.live = LiveStats()
        self._last_rt = copy.copy(runtime.counters) if runtime is not None else None

    def _hit_rate(self) -> float:
        with self.live.lock:
            hits, misses = self.live.totals["hits"], self.live.totals["misses"]
        return hits / (hits + misses) if hits + misses else 0.0

    # -- engine thread ---------------------------------------------------------------------------------
    def on_step(self, engine: Engine, events: list[StepEvent], seconds: float) -> None:
        """After an engine step."""
        stats = engine.counters.steps[-1] if engine.counters.steps else None
        self.kv = engine.kv_stats()
        prompt = stats.prefill_tokens if stats is not None else 0
        generated = sum(1 for e in events if e.token_id is not None)
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(generated)
        if stats is not None:
            self.batch.observe(stats.batch)
        self.step_seconds.observe(seconds)
        rt = None
        if self.runtime is not None:
            now = copy.copy(self.runtime.counters)
            rt = now.minus(self._last_rt)
            self._last_rt = now
            self.tier_bytes.labels("disk").inc(rt.disk_bytes)
            self.tier_bytes.labels("dram").inc(rt.dram_bytes)
            self.cache_hits.inc(rt.hits)
            self.cache_misses.inc(rt.misses)
        self.live.on_step(prompt, generated, stats.batch if stats else 0, rt)

    def on_finish(self, seq: Sequence) -> None:
        """When a sequence ends (finished, cancelled or failed)."""
        self.finished.labels(seq.finish_reason or "abort").inc()
        ttft = tpot = None
        if seq.first_token_time is not None:
            ttft = seq.first_token_time - seq.arrival
            self.ttft.observe(ttft)
            end = seq.finish_time or time.perf_counter()
            self.e2e.observe(end - seq.arrival)
            if len(seq.output_ids) > 1:
                tpot = (end - seq.first_token_time) / (len(seq.output_ids) - 1)
                self.tpot.observe(tpot)
        self.live.on_finish(seq.finish_reason or "abort", ttft, tpot)


class LiveStats:
    """Totals, a few seconds of per-step history, and recent latencies (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self.window: deque[tuple[float, int, int, int, int, int]] = deque()
        self.ttfts: deque[float] = deque(maxlen=512)
        self.tpots: deque[float] = deque(maxlen=512)
        self.reasons: Tally[str] = Tally()
        self.totals = Tally()

    def on_step(self, prompt: int, generated: int, batch: int, rt) -> None:
        """Record one step (rt: its RuntimeCounters delta, or None)."""
        now = time.monotonic()
        hits, misses = (rt.hits, rt.misses) if rt is not None else (0, 0)
        with self.lock:
            self.window.append((now, prompt, generated, batch, hits, misses))
            while self.window and self.window[0][0] < now - WINDOW_S:
                self.window.popleft()
            t = self.totals
            t["prompt_tokens"] += prompt
            t["generated_tokens"] += generated
            t["steps"] += 1
            if rt is not None:
                t["disk_bytes"] += rt.disk_bytes
                t["dram_bytes"] += rt.dram_bytes
                t["hits"] += rt.hits
                t["misses"] += rt.misses

    def on_finish(self, reason: str, ttft: float | None, tpot: float | None) -> None:
        """Record one ended sequence."""
        with self.lock:
            self.reasons[reason] += 1
            if ttft is not None:
                self.ttfts.append(ttft)
            if tpot is not None:
                self.tpots.append(tpot)

    def snapshot(self) -> dict:
        """Totals, recent rates and latency percentiles."""
        now = time.monotonic()
        with self.lock:
            window = [w for w in self.window if w[0] >= now - WINDOW_S]
            totals = dict(self.totals)
            reasons = dict(self.reasons)
            ttfts, tpots = list(self.ttfts), list(self.tpots)
        span = WINDOW_S if window else 1.0
        hits = sum(w[4] for w in window)
        misses = sum(w[5] for w in window)
        all_hits, all_misses = totals.get("hits", 0), totals.get("misses", 0)
        return {
            "uptime_s": time.time() - self.started,
            "tokens": {"prompt": totals.get("prompt_tokens", 0), "generated": totals.get("generated_tokens", 0)},
            "throughput": {
                "window_s": WINDOW_S,
                "generated_tok_s": sum(w[2] for w in window) / span,
                "prompt_tok_s": sum(w[1] for w in window) / span,
            },
            "batch": {
                "last": window[-1][3] if window else 0,
                "mean": sum(w[3] for w in window) / len(window) if window else 0.0,
            },
            "steps": totals.get("steps", 0),
            "finished": reasons,
            "latency": {
                "ttft_p50_s": percentile(ttfts, 0.5),
                "ttft_p95_s": percentile(ttfts, 0.95),
                "tpot_p50_s": percentile(tpots, 0.5),
                "tpot_p95_s": percentile(tpots, 0.95),
            },
            "cache": {
                "disk_bytes": totals.get("disk_bytes", 0),
                "dram_bytes": totals.get("dram_bytes", 0),
                "hits": all_hits,
                "misses": all_misses,
                "hit_rate": all_hits / (all_hits + all_misses) if all_hits + all_misses else None,
                "recent_hit_rate": hits / (hits + misses) if hits + misses else None,
            },
        }
