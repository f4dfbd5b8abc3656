"""Settings of one server instance."""

from __future__ import annotations

from dataclasses import dataclass

from tilemem.errors import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    """How `tilemem serve` listens, authenticates, batches and shuts down."""

    host: str = "127.0.0.1"
    """Interface to listen on (loopback by default: nothing outside this machine can connect)."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """If set, every endpoint but /health needs `Authorization: Bearer <api_key>` (never empty)."""
    model_name: str | None = None
    """Name clients pass as `model` (default: the checkpoint directory's name)."""
    max_batch: int = 8
    """Sequences decoded together (KV-cache slots)."""
    max_queue: int = 64
    """Sequences that may wait for a slot; beyond that, requests get 429."""
    prefill_chunk: int = 512
    """Most prompt tokens per engine step, so a long prompt never stalls running decodes for long."""
    max_body_bytes: int = 4 * 2**20
    """Largest request body accepted; a larger one gets 413 before it is read in full."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM: how long in-flight requests may run on before they are ended (503 shutting_down)."""
    log_level: str = "info"
    """uvicorn log level."""

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty, which would turn authentication off; give a key or None.")
        if self.max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}.")
        for name, flag in (
            ("max_batch", "--max-batch"),
            ("max_queue", "--max-queue"),
            ("prefill_chunk", "--prefill-chunk"),
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 ({flag}), got {getattr(self, name)}.")
        if not 0 <= self.port < 65536:  # 0: any free port (BackgroundServer)
            raise ConfigError(f"port must be 1..65535 (--port), got {self.port}.")
        if not self.shutdown_grace_s >= 0:
            raise ConfigError(f"shutdown_grace_s must be >= 0 seconds (--shutdown-grace), got {self.shutdown_grace_s}.")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(
                f"log_level must be one of {', '.join(LOG_LEVELS)} (--log-level), got {self.log_level!r}."
            )


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
"""uvicorn's log levels."""
