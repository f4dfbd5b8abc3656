"""Plan artifacts: what a plan is written as and shown as.

- `mir`: the MIR (`mir.json`, the plan's tiles, tiers and settings) and manifest (`manifest.json`, each
  tile's store offset), with checksums; building, writing and reading them.
- `heatmap`: the plan's residency heatmap (`heatmap.png`).
- `report`: plain-text tables of a plan and of a profile.
"""
