"""`tilemem serve`: an OpenAI-compatible HTTP server for one checkpoint.

tilemem serve ckpt/ --port 8000
tilemem serve ckpt/ --budget cpu=4GiB --policy tilepo_fine --api-key sk-local --max-batch 16
"""

from __future__ import annotations

import argparse

from tilemem.cli.engine_flags import add_engine_args, engine_args_from_namespace
from tilemem.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve` to `sub`."""
    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on all but /health (visible in `ps`: prefer --api-key-file "
        "or $TILEMEM_API_KEY, read when neither flag is given)",
    )
    p.add_argument("--api-key-file", default=None, help="read the API key from this file (one line)")
    p.add_argument("--model-name", default=None, help="name clients use as 'model' (default: the directory name)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences that may wait for a slot before 429")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument(
        "--max-body-bytes", type=int, default=4 * 2**20, help="largest request body, larger ones get 413 (4 MiB)"
    )
    # Engine flags, generated from EngineArgs; the server prefills in smaller chunks than offline runs.
    add_engine_args(p, defaults={"prefill_chunk": 512})
    p.add_argument("--log-level", default="info", help="uvicorn log level")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from tilemem.server import ServerConfig, serve
    from tilemem.server.api_key import resolve_api_key

    engine_args = engine_args_from_namespace(args)  # checks every engine flag before anything loads
    from tilemem.engine.ranks import follow_run

    if follow_run(engine_args):  # a rank other than 0: it computes, rank 0 serves
        return 0
    api_key = resolve_api_key(args.api_key, args.api_key_file)
    for name in ("max_queue", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be 1..65535, got {args.port}.")
    config = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=api_key,
        model_name=args.model_name,
        max_batch=engine_args.max_batch,
        max_queue=args.max_queue,
        prefill_chunk=engine_args.prefill_chunk,
        shutdown_grace_s=args.shutdown_grace,
        max_body_bytes=args.max_body_bytes,
        log_level=args.log_level,
    )
    serve(engine_args, config)  # the server builds the engine from engine_args (build_engine)
    return 0
