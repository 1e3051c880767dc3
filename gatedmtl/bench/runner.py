"""Run the rows of an :class:`~gatedmtl.bench.experiments.Experiment`; one result JSON per row.

Rows of one backbone and seed, in order (later rows need earlier ones):

1. ``stl-<task>``: one hard-sharing network per task (EW);
2. ``mtl-<method>``: one network for every task, each balancing method;
3. ``gated-<balance>-b<budget>``: GatedMTL at each budget, projected onto it and pruned
   (``best`` resolves to the hard-sharing method with the highest ΔMTL vs STL);
4. ``gated-<balance>-b<budget>-ft``: that lean network after ``finetune_steps`` of fine-tuning.

A row whose JSON exists is skipped (a killed run resumes where it stopped; ``force`` redoes it).
Each JSON holds the row's metrics, fvcore GFLOPs and params of its encoder, training CPU time per
step, ONNX Runtime latency of its exported encoder, and for GatedMTL rows the budget fidelity,
the gate map and the training dynamics (see :func:`run_experiment`).
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..cost import count_flops, count_params
from ..files import replace_file, temp_path
from ..profile import measure_timing
from ..tasks import delta_mtl
from ..network import tasks_from_spec
from ..train import (Trainer, TrainConfig, dataset_image_size, dataset_task_spec, finetune_config, make_datasets,
                     save_lean)
from .experiments import Experiment

__all__ = ["run_experiment", "row_ids", "result_dir", "best_method", "stl_metrics"]


def result_dir(results: str | Path, exp: Experiment, model: str, seed: int) -> Path:
    """Where the JSONs of one backbone and seed go: ``results/<experiment>/<model>/seed<seed>``."""
    return Path(results) / exp.name / model / f"seed{seed}"


def _budget_id(budget: float) -> str:
    return f"b{budget:g}"


def row_ids(exp: Experiment, best: str | None = "best") -> list[str]:
    """Every row of one backbone and seed, in running order (``best`` names the resolved method)."""
    rows = [f"stl-{t}" for t in exp.tasks] + [f"mtl-{m}" for m in exp.methods]
    for balance in exp.gated_balances:
        name = best if balance == "best" else balance
        for b in exp.budgets:
            rows.append(f"gated-{name}-{_budget_id(b)}")
            if exp.finetune_steps:
                rows.append(f"gated-{name}-{_budget_id(b)}-ft")
    return rows


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.write_text(json.dumps(data, indent=1))
    replace_file(tmp, path)


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def stl_metrics(folder: Path, tasks: Sequence[str]) -> dict[str, dict[str, float]] | None:
    """Per-task metrics of the single-task rows in ``folder`` (``None`` until all of them exist)."""
    out = {}
    for t in tasks:
        row = _read(folder / f"stl-{t}.json")
        if row is None:
            return None
        out[t] = row["metrics"][t]
    return out


def best_method(folder: Path, exp: Experiment, directions: dict[str, dict[str, bool]],
                primary: dict[str, str]) -> str:
    """The hard-sharing method other than EW with the highest ΔMTL vs STL among the rows in ``folder``."""
    stl = stl_metrics(folder, exp.tasks)
    if stl is None:
        raise RuntimeError(f"{folder}: the single-task rows must run before 'best' can be chosen")
    scores = {}
    for m in exp.methods:
        row = _read(folder / f"mtl-{m}.json")
        if row is not None and m != "ew":
            scores[m] = delta_mtl(row["metrics"], stl, directions, primary)
    if not scores:
        raise RuntimeError(f"{folder}: no hard-sharing row other than EW has run; 'best' needs one")
    return max(scores, key=scores.get)


def _steps(total: int, train_size: int, batch: int) -> tuple[int, int]:
    """(epochs, steps_per_epoch) giving ``total`` steps over a training set of ``train_size``."""
    per_epoch = max(1, min(total, train_size // batch))
    return math.ceil(total / per_epoch), per_epoch


def _dynamics(log: Path) -> dict[str, Any]:
    """Per-step training curves from a run's ``log.jsonl``: task losses, gradient norm, gate density, GFLOPs."""
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    out: dict[str, Any] = {"step": [r["step"] for r in records],
                           "loss": {t: [r["loss"][t] for r in records] for t in (records[0]["loss"] if records else {})},
                           "grad_norm": [r.get("grad_norm") for r in records]}
    if records and "density" in records[0]:
        out["density"] = [r["density"] for r in records]
        out["gflops"] = [r["gflops"] for r in records]
    return out


def _gate_map(trainer: Trainer) -> dict[str, dict[str, float]]:
    """Fraction of task-specific (open) channels per gated layer and task, after projection."""
    tasks = trainer.config.tasks
    return {g.name: {t: float(m) for t, m in zip(tasks, g.open_mask().float().mean(1).tolist())}
            for g in trainer.net.encoder.gates()}


class _Bench:
    def __init__(self, exp: Experiment, model: str, seed: int, results: Path, work: Path, *, data_root: str | None,
                 threads: int, force: bool, progress: bool, log: Callable[[str], None]) -> None:
        self.exp, self.model, self.seed = exp, model, seed
        self.folder = result_dir(results, exp, model, seed)
        self.work = work / exp.name / model / f"seed{seed}"
        self.data_root, self.threads, self.force, self.progress, self.log = data_root, threads, force, progress, log
        self._timing: dict[str, Any] | None = None

    def config(self, row: str, **kw: Any) -> TrainConfig:
        e = self.exp
        base: dict[str, Any] = dict(model=self.model, tasks=e.tasks, data=e.data, data_root=self.data_root,
                                    batch_size=e.batch_size, lr=e.lr, seed=self.seed, out=str(self.work / row),
                                    progress=False, device="cpu" if not torch.cuda.is_available() else "auto")
        for name in ("image_size", "train_length", "val_length"):
            if getattr(e, name) is not None:
                base[name] = getattr(e, name)
        return TrainConfig(**(base | e.train_options | kw))

    def _train(self, config: TrainConfig, steps: int) -> tuple[Trainer, float]:
        config.epochs, config.steps_per_epoch = _steps(steps, len(self.datasets[0]), config.batch_size)
        trainer = Trainer(config, force=True, datasets=self.datasets)
        bar = tqdm(total=config.epochs * config.steps_per_epoch, desc=Path(config.out).name, leave=False,
                   disable=not self.progress, dynamic_ncols=True)
        trainer.on_step = lambda record: bar.update(1)
        cpu = time.thread_time()
        trainer.fit()
        bar.close()
        return trainer, (time.thread_time() - cpu) * 1e3 / max(trainer.step, 1)

    def timing(self, encoder: torch.nn.Module) -> dict[str, float]:
        shape = (1, int(self.input_size[0]), *self.exp.latency_size)
        latency, kernel = measure_timing(encoder.eval(), shape, threads=self.threads)
        return {"latency_ms": kernel.total_ms, "latency_cpu_ms": latency.cpu_median_ms,
                "latency_wall_ms": latency.median_ms}

    def backbone_timing(self, encoder: torch.nn.Module) -> dict[str, float]:
        """Every hard-sharing and single-task row runs the same backbone: time it once."""
        path = self.folder / "_backbone.json"
        cached = None if self.force else _read(path)
        if cached is None:
            cached = self.timing(encoder) | {"gflops": count_flops(encoder, (1, *self.input_size)) / 1e9,
                                             "params_m": count_params(encoder) / 1e6}
            _write_json(path, cached)
        return cached

    def row_record(self, row: str, method: str, family: str, trainer: Trainer, metrics: dict, step_ms: float,
                   **extra: Any) -> dict[str, Any]:
        return {"experiment": self.exp.name, "model": self.model, "seed": self.seed, "row": row, "method": method,
                "family": family, "balance": trainer.config.balance, "steps": trainer.step, "metrics": metrics,
                "primary": self.primary, "higher_is_better": self.directions,
                "step_ms": step_ms, "image_size": list(self.input_size), "latency_size": list(self.exp.latency_size),
                "dynamics": _dynamics(Path(trainer.config.out) / "log.jsonl")} | extra

    def done(self, row: str) -> bool:
        return not self.force and (self.folder / f"{row}.json").is_file()

    def save(self, row: str, record: dict[str, Any]) -> None:
        _write_json(self.folder / f"{row}.json", record)
        shutil.rmtree(self.work / row, ignore_errors=True)
        self.log(f"{self.exp.name}/{self.model}/seed{self.seed}/{row}: "
                 + ", ".join(f"{t} {v:.4g}" for t in record["metrics"] for k, v in record["metrics"][t].items()
                             if k == self.primary[t]) + f", {record['gflops']:.4f} GF")

    def run(self, rows: Sequence[str] | None) -> None:
        e = self.exp
        self.datasets = make_datasets(self.config("_data"))  # every row reads the same samples
        self.input_size = dataset_image_size(self.datasets[0])
        tasks = tasks_from_spec(dataset_task_spec(self.datasets[0], e.tasks))
        self.directions = {t: tasks[t].higher_is_better for t in e.tasks}
        self.primary = {t: tasks[t].primary_metric for t in e.tasks}
        wanted = lambda row: rows is None or any(row == r or row.startswith(r) for r in rows)  # noqa: E731

        for t in e.tasks:
            row = f"stl-{t}"
            if self.done(row) or not wanted(row):
                continue
            trainer, step_ms = self._train(self.config(row, tasks=(t,), arch="shared", budget=None), e.steps)
            timing = self.backbone_timing(trainer.net.encoder)
            self.save(row, self.row_record(row, "STL", "stl", trainer, trainer.evaluate(), step_ms, **timing))
        for m in e.methods:
            row = f"mtl-{m}"
            if self.done(row) or not wanted(row):
                continue
            trainer, step_ms = self._train(self.config(row, arch="shared", budget=None, balance=m), e.steps)
            timing = self.backbone_timing(trainer.net.encoder)
            self.save(row, self.row_record(row, f"MTL + {m}", "mtl", trainer, trainer.evaluate(), step_ms, **timing))
        for balance in e.gated_balances:
            if balance == "best":
                if rows is not None and not any(r.startswith("gated") for r in rows):
                    continue
                balance = best_method(self.folder, e, self.directions, self.primary)
                self.log(f"best hard-sharing method (ΔMTL vs STL, EW aside): {balance}")
            for b in e.budgets:
                self.gated_row(balance, b, wanted)

    def gated_row(self, balance: str, budget: float, wanted: Callable[[str], bool]) -> None:
        e = self.exp
        row = f"gated-{balance}-{_budget_id(budget)}"
        ft_row = f"{row}-ft"
        need_ft = bool(e.finetune_steps) and wanted(ft_row) and not self.done(ft_row)
        if (self.done(row) or not wanted(row)) and not need_ft:
            return
        trainer, step_ms = self._train(self.config(row, arch="gated", budget=str(budget), balance=balance), e.steps)
        with torch.no_grad():
            lean, report = trainer.finalize()
        metrics = trainer.evaluate(lean)
        timing = self.timing(lean.encoder)
        record = self.row_record(
            row, f"GatedMTL + {balance}, budget {budget:g}", "gated", trainer, metrics, step_ms,
            budget=budget, budget_report=report, gflops=report["landed"] / 1e9,
            params_m=count_params(lean.encoder) / 1e6, gate_map=_gate_map(trainer), **timing)
        lean_path = self.work / f"{row}.lean.safetensors"
        save_lean(lean_path, lean, trainer.net, trainer.meta(), report)
        self.save(row, record)
        if not need_ft:
            lean_path.unlink()
            return
        config = finetune_config(lean_path, {"out": str(self.work / ft_row), "progress": False})
        ft, ft_ms = self._train(config, e.finetune_steps)
        ft_record = self.row_record(
            ft_row, f"GatedMTL + {balance}, budget {budget:g}, fine-tuned", "gated-ft", ft, ft.evaluate(), ft_ms,
            budget=budget, budget_report=report, gflops=report["landed"] / 1e9, params_m=record["params_m"],
            latency_ms=record["latency_ms"], latency_cpu_ms=record["latency_cpu_ms"],
            latency_wall_ms=record["latency_wall_ms"], finetune_of=row)
        ft_record["train_steps_before"] = record["steps"]
        self.save(ft_row, ft_record)
        lean_path.unlink()


def run_experiment(exp: Experiment, results: str | Path, *, models: Sequence[str] | None = None,
                   seeds: Sequence[int] | None = None, rows: Sequence[str] | None = None, work: str | Path = "runs/bench",
                   data_root: str | None = None, threads: int = 1, force: bool = False, progress: bool = True,
                   log: Callable[[str], None] | None = None) -> Path:
    """Run (or complete) every row of ``exp`` for ``models`` x ``seeds``; returns ``results/<exp.name>``.

    ``rows``: only rows whose id equals or starts with one of these (e.g. ``["stl", "mtl-ew"]``).
    ``work``: training runs go there and are removed once their row is saved. ``threads``: torch
    and ONNX Runtime threads (1 gives comparable step and latency times on a shared machine).
    """
    if exp.needs_root and data_root is None:
        raise ValueError(f"experiment {exp.name!r} reads {exp.data} from disk: give --data-root DIR")
    log = log or (lambda text: tqdm.write(text, file=sys.stderr))
    out = Path(results) / exp.name
    out.mkdir(parents=True, exist_ok=True)
    meta = {"experiment": exp.to_json(), "torch": torch.__version__, "threads": threads,
            "machine": f"{platform.machine()}, {platform.python_version()}"}
    _write_json(out / "experiment.json", meta)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # for the run only: the caller's setting comes back afterwards
    try:
        for model in models or exp.models:
            for seed in seeds if seeds is not None else exp.seeds:
                _Bench(exp, model, seed, Path(results), Path(work), data_root=data_root, threads=threads, force=force,
                       progress=progress, log=log).run(rows)
    finally:
        torch.set_num_threads(previous)
    return out
