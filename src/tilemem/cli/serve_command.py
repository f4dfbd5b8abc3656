"""`tilemem serve`: an OpenAI-compatible HTTP server for one checkpoint.

tilemem serve ckpt/ --port 8000
tilemem serve ckpt/ --budget cpu=4GiB --policy tilepo_fine --api-key sk-local --max-batch 16
"""

from __future__ import annotations

import argparse

from tilemem.cli.model_commands import add_weight_codec_arg
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
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences that may wait for a slot before 429")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, <= 4096)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="most prompt tokens per engine step")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument(
        "--max-body-bytes", type=int, default=4 * 2**20, help="largest request body, larger ones get 413 (4 MiB)"
    )
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when --budget gives cuda a share)")
    add_weight_codec_arg(p)
    p.add_argument("--plan", default=None, help="plan directory from `tilemem plan`")
    p.add_argument("--budget", default=None, help="tier budgets, e.g. cpu=4GiB (rest on disk)")
    p.add_argument("--policy", default="tilepo_fine", help="placement policy used with --budget")
    p.add_argument("--profile", default=None, help="profile.json guiding the plan")
    p.add_argument("--store", default=None, help="tile store (default: beside the checkpoint, built if missing)")
    p.add_argument("--tile-size", type=int, default=128, help="tile size for --budget plans")
    p.add_argument("--async-planning", action="store_true", help="re-plan from live routing and migrate tiles")
    p.add_argument("--spec", default=None, help="speculative decoding: ngram, mtp or draft:PATH")
    p.add_argument("--num-draft", type=int, default=4, help="draft tokens per speculative step")
    p.add_argument("--log-level", default="info", help="uvicorn log level")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from tilemem.cli.model_commands import llm_from_args
    from tilemem.server import ServerConfig, serve
    from tilemem.server.api_key import resolve_api_key

    if args.plan and args.budget:
        raise ConfigError("give either --plan or --budget, not both.")
    api_key = resolve_api_key(args.api_key, args.api_key_file)
    for name in ("max_batch", "max_queue", "prefill_chunk", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be 1..65535, got {args.port}.")
    llm = llm_from_args(args, max_batch=args.max_batch, max_model_len=args.max_model_len)
    config = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=api_key,
        model_name=args.model_name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        shutdown_grace_s=args.shutdown_grace,
        max_body_bytes=args.max_body_bytes,
        log_level=args.log_level,
    )
    serve(llm, config)
    return 0
