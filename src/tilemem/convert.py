"""TileRT-compatible weight converter entry point, an alias of `tilemem convert`:

python -m tilemem.convert --model_type deepseek-v32 --model_dir D --save_dir S [--tile_size 128]
"""

from __future__ import annotations

import argparse
import sys

from tilemem.errors import ConfigError, TileMemError

MODEL_TYPES = {
    "deepseek-v2": "deepseek_v2",
    "deepseek-v3": "deepseek_v3",
    "deepseek-v32": "deepseek_v32",
    "glm-5": "glm_moe_dsa",
    "olmoe": "olmoe",
    "mixtral": "mixtral",
    "qwen2-moe": "qwen2_moe",
    "qwen3-moe": "qwen3_moe",
}


def main(argv: list[str] | None = None) -> int:
    """Convert `--model_dir` into a tile store at `--save_dir`, checking `--model_type`."""
    from tilemem.loader.checkpoint import Checkpoint
    from tilemem.runtime.tile_store import convert

    ap = argparse.ArgumentParser(prog="python -m tilemem.convert", description=__doc__.splitlines()[0])
    ap.add_argument("--model_type", required=True, help=", ".join(MODEL_TYPES))
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--save_dir", required=True)
    ap.add_argument("--tile_size", type=int, default=128)
    args = ap.parse_args(argv)
    try:
        family = MODEL_TYPES.get(args.model_type)
        if family is None:
            raise ConfigError(f"unknown --model_type '{args.model_type}'; use one of {', '.join(MODEL_TYPES)}.")
        found = Checkpoint.open(args.model_dir).config.family
        if found != family:
            raise ConfigError(
                f"--model_type {args.model_type} expects a {family} checkpoint, but {args.model_dir} "
                f"is {found}; fix --model_type."
            )
        out = convert(args.model_dir, args.save_dir, args.tile_size)
    except TileMemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote tile store {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
