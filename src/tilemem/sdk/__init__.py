"""The `import tilemem as TM` SDK: describe a model (`model_spec`, `.tmem`), plan it, get tile handles.

- `api`: the public names `tilemem` re-exports (`TM.model_spec`, `TM.plan`, `TM.recommend`, ...).
- `model_spec`: `ModelSpec`, a model described by its shape and settings (from keywords, JSON, a
  `.tmem` file or a Hugging Face config), and the `Topology` it implies.
- `tmem`: the `.tmem` plan-config parser and formatter.
- `compiler`: a `ModelSpec` (+ profile, budgets) compiled into a `Plan`.
- `backends`: the backend registry and the tile handles a backend gets.
- `checkpoint_names`: which checkpoint tensors hold each tile, and name matching against a checkpoint.
"""

from tilemem.sdk.api import *  # noqa: F403
from tilemem.sdk.api import __all__  # noqa: F401
