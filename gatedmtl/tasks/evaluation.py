"""Multi-task summary scores: ΔMTL (relative improvement over a baseline) and Mean Rank."""
from __future__ import annotations

from typing import Mapping

__all__ = ["delta_mtl", "mean_rank"]

Results = Mapping[str, Mapping[str, float]]  # task -> metric -> value
Directions = Mapping[str, Mapping[str, bool]]  # task -> metric -> higher is better


def _metrics_of(task: str, baseline: Results, primary: Mapping[str, str] | None) -> list[str]:
    if primary is not None:
        if task not in primary:
            raise KeyError(f"no primary metric given for task {task!r}")
        return [primary[task]]
    return list(baseline[task])


def _direction(higher_is_better: Directions, task: str, metric: str) -> bool:
    try:
        return bool(higher_is_better[task][metric])
    except KeyError:
        raise KeyError(f"higher_is_better has no entry for {task}/{metric}") from None


def delta_mtl(
    results: Results,
    baseline: Results,
    higher_is_better: Directions,
    primary: Mapping[str, str] | None = None,
) -> float:
    """Average relative improvement of ``results`` over ``baseline`` in percent (positive = better).

    For task t and metric m, d = (−1)^{l} (M − B) / B with l = 1 when lower is better.

    * ``primary`` given (task -> metric): one metric per task, Δ = 100 · mean_t d_t — the
      Vandenhende et al. convention ("Multi-Task Learning for Dense Prediction Tasks: A Survey",
      TPAMI 2021; Maninis et al., CVPR 2019, Eq. 4) used by GatedMTL (mIoU, depth RMSE,
      normals mean angle on NYUD-v2).
    * ``primary=None``: every metric listed in ``baseline[t]``, averaged within each task, then
      over tasks — LibMTL ``count_improvement`` (Lin & Zhang, "LibMTL", JMLR 2023).

    Note: Nash-MTL / FAMO / GO4Align average over all metrics flat and flip the sign (their
    Δm is positive for a *drop*); that is ``-delta_mtl`` only when every task has one metric.
    Tasks are those of ``results``; each must be in ``baseline``.
    """
    if not results:
        raise ValueError("results is empty")
    per_task = []
    for task, res in results.items():
        if task not in baseline:
            raise KeyError(f"task {task!r} missing from baseline (has {sorted(baseline)})")
        metrics = _metrics_of(task, baseline, primary)
        if not metrics:
            raise ValueError(f"baseline has no metrics for task {task!r}")
        ds = []
        for m in metrics:
            if m not in res or m not in baseline[task]:
                raise KeyError(f"metric {task}/{m} missing from results or baseline")
            b, v = float(baseline[task][m]), float(res[m])
            if b == 0:
                raise ValueError(f"baseline {task}/{m} is 0: relative change undefined")
            sign = 1.0 if _direction(higher_is_better, task, m) else -1.0
            ds.append(sign * (v - b) / b)
        per_task.append(sum(ds) / len(ds))
    return 100.0 * sum(per_task) / len(per_task)


def mean_rank(
    table: Mapping[str, Results],
    higher_is_better: Directions,
    primary: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """Mean Rank (MR) of each method across metrics (lower is better).

    ``table``: method -> task -> metric -> value. For every (task, metric) — the primary metric
    per task when ``primary`` is given, else every metric of the first method's row — each
    method gets rank 1 + (number of methods strictly better); ties share the best rank. MR is
    the mean of a method's ranks over all those metrics (Navon et al., Nash-MTL, ICML 2022; the
    MR column of GatedMTL's tables).
    """
    if not table:
        raise ValueError("table is empty")
    methods = list(table)
    first = table[methods[0]]
    columns = [(t, m) for t in first for m in _metrics_of(t, first, primary)]
    ranks: dict[str, list[int]] = {k: [] for k in methods}
    for task, metric in columns:
        hib = _direction(higher_is_better, task, metric)
        try:
            values = {k: float(table[k][task][metric]) for k in methods}
        except KeyError as e:
            raise KeyError(f"a method has no value for {task}/{metric}: {e}") from None
        for k in methods:
            v = values[k]
            better = sum(1 for o in methods if (values[o] > v if hib else values[o] < v))
            ranks[k].append(1 + better)
    return {k: sum(r) / len(r) for k, r in ranks.items()}
