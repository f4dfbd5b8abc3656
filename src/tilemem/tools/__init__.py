"""Tools above the engine: they run models to measure or check (never imported by the engine or planner).

- `doctor`: environment checks (`tilemem doctor`).
- `probe`: measures this machine's hardware profile (`tilemem doctor --probe`).
- `validate`: checks the cost model's predictions against measured runs (`tilemem tmap validate`).
- `profiler`: records a workload's routing profile by running the model (`tilemem profile`).
"""
