"""TileMEM: run and serve Mixture-of-Experts models across memory tiers, tile by tile."""

__version__ = "0.1.0"

from tilemem.sdk import *  # noqa: E402,F403
from tilemem.sdk import __all__ as _sdk_all  # noqa: E402

__all__ = list(_sdk_all)

from tilemem.engine.llm import LLM, RequestOutput  # noqa: E402
from tilemem.engine.sampling import SamplingParams  # noqa: E402

__all__ += ["LLM", "RequestOutput", "SamplingParams"]
