"""Planning core: tiles and their keys, tile formats, tiers and budgets, profiles of what a workload routes
to, placement policies, the planner and the Plan (every tile's tier within per-tier byte budgets), and the
tile-store layout. Pure Python, no tensors. Its files (MIR, manifest) are `tilemem.artifacts`; the SDK
(`.tmem`, model specs) is `tilemem.sdk`. See docs/placement.md."""
