"""Run the server with uvicorn: in the foreground with graceful SIGTERM handling (`tilemem serve`), or
on a background thread (tests, benchmarks).

On SIGTERM or Ctrl-C the server stops accepting connections, lets in-flight requests run on for
`shutdown_grace_s`, then ends the rest, saying so (503 `shutting_down`; streams: an error event, then
`data: [DONE]`).
"""

from __future__ import annotations

import threading
import time

import uvicorn

from tilemem.errors import RankError
from tilemem.parallel.group import free_port
from tilemem.server.app import create_app
from tilemem.server.config import ServerConfig


class DrainingServer(uvicorn.Server):
    """A uvicorn server that starts draining the engine on the first exit signal."""

    def __init__(self, config: uvicorn.Config, drain) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            self.drain()
        super().handle_exit(sig, frame)


def _uvicorn_config(app, config: ServerConfig, sock_port: int | None = None) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port if sock_port is None else sock_port,
        log_level=config.log_level,
        lifespan="on",
        timeout_graceful_shutdown=int(config.shutdown_grace_s) + 5,
    )


def serve(llm, config: ServerConfig) -> None:
    """Serve `llm` (an LLM, or the EngineArgs to build one from) until SIGTERM / Ctrl-C, then shut down
    gracefully."""
    app = create_app(llm, config)
    state = app.state.tilemem
    worker = state.worker
    server = DrainingServer(_uvicorn_config(app, config), lambda: worker.drain(config.shutdown_grace_s))
    worker.on_fatal = lambda message: setattr(server, "should_exit", True)  # a rank is gone: stop serving
    try:
        server.run()
    finally:
        state.llm.close()  # a distributed run's other ranks stop too
    if worker.fatal is not None:
        raise RankError(worker.fatal)  # `tilemem serve` exits non-zero


class BackgroundServer:
    """A server on a daemon thread: `with BackgroundServer(llm, cfg) as srv: srv.url ...`."""

    def __init__(self, llm, config: ServerConfig | None = None) -> None:
        config = config or ServerConfig()
        port = config.port if config.port else free_port(config.host)
        self.config = config
        self.app = create_app(llm, config)
        self.state = self.app.state.tilemem
        self.server = DrainingServer(
            _uvicorn_config(self.app, config, port), lambda: self.state.worker.drain(config.shutdown_grace_s)
        )
        self.url = f"http://{config.host}:{port}"
        self.thread = threading.Thread(target=self.server.run, name="tilemem-uvicorn", daemon=True)

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        """Start and wait until it accepts connections."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful shutdown, as on SIGTERM."""
        self.server.handle_exit(15, None)
        self.thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
