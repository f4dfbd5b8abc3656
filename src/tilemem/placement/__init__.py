"""Planning: profiles of what a workload routes to, placement policies, and plans (MIR + manifest)
that put every expert tile in a memory tier within per-tier byte budgets. See docs/placement.md."""
