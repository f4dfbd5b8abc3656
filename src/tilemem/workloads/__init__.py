"""Profiling workloads: built-in ones drawn from text every machine has, or a JSONL file."""

from tilemem.workloads.workload import Request, Workload, builtin_workloads, load_workload

__all__ = ["Request", "Workload", "builtin_workloads", "load_workload"]
