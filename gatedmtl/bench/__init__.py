"""Benchmarks of whole methods: STL vs hard-sharing MTL with every balancing method vs GatedMTL at
several budgets (before and after fine-tuning), with ΔMTL, Mean Rank, GFLOPs, params, training time
and ONNX Runtime latency. ``gatedmtl bench NAME`` runs an experiment and writes its report."""

from .experiments import EXPERIMENTS, HARD_SHARING_METHODS, Experiment, get_experiment
from .report import build_tables, load_rows, update_readme, write_report
from .runner import row_ids, run_experiment

__all__ = ["EXPERIMENTS", "HARD_SHARING_METHODS", "Experiment", "get_experiment", "run_experiment", "row_ids",
           "load_rows", "build_tables", "write_report", "update_readme"]
