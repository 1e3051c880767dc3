"""Single-task vs hard-sharing MTL vs gated (at a FLOP budget) after the same number of steps.

On the embedded scenes (seg + depth + normals). Writes ``benchmarks/results/mtl_comparison.md``
and ``.csv``. ΔMTL is Vandenhende's one-metric-per-task convention (mIoU, depth RMSE, normals
mean angle) against the single-task models; positive is better. Usage::

    python benchmarks/mtl_comparison.py [--model resnet18] [--steps 300] [--budget 0.5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from _report import write_table
from gatedmtl.cost import count_flops
from gatedmtl.tasks import delta_mtl, mean_rank
from gatedmtl.train import TrainConfig, Trainer, evaluate

TASKS = ("seg", "depth", "normals")


def run(cfg: TrainConfig) -> tuple[Trainer, dict, float]:
    start = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer, trainer.evaluate(), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--budget", default="0.5")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", default="64x96")
    p.add_argument("--balance", default="ew")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = p.parse_args()
    h, w = (int(v) for v in a.size.split("x"))
    epochs = max(1, a.steps // 48)
    base = dict(model=a.model, image_size=(h, w), train_length=48 * a.batch, val_length=128, batch_size=a.batch,
                epochs=epochs, steps_per_epoch=a.steps // epochs, lr=2e-3, progress=False, balance=a.balance)
    tmp = Path(tempfile.mkdtemp(prefix="gatedmtl-cmp-"))
    size = (3, h, w)
    results, flops, seconds = {}, {}, {}
    stl = {}
    for t in TASKS:
        tr, m, s = run(TrainConfig(**(base | {"balance": "ew"}), tasks=(t,), arch="shared", budget=None, out=str(tmp / f"stl_{t}")))
        stl[t] = m[t]
        seconds[f"stl_{t}"] = s
        flops_stl = count_flops(tr.net.encoder, (1, *size))
    results["single-task (3 networks)"] = stl
    flops["single-task (3 networks)"] = len(TASKS) * flops_stl
    tr, m, s = run(TrainConfig(**base, tasks=TASKS, arch="shared", budget=None, out=str(tmp / "mtl")))
    results["hard-sharing MTL"] = m
    flops["hard-sharing MTL"] = count_flops(tr.net.encoder, (1, *size))
    tr, m, s = run(TrainConfig(**base, tasks=TASKS, arch="gated", budget=a.budget, out=str(tmp / "gated")))
    lean, report = tr.finalize()
    results[f"gated, budget {a.budget} (lean)"] = evaluate(lean, tr.val_set, tr.tasks, a.batch)
    flops[f"gated, budget {a.budget} (lean)"] = report["landed"]
    tasks = tr.tasks
    primary = {t: tasks[t].primary_metric for t in TASKS}
    hib = {t: tasks[t].higher_is_better for t in TASKS}
    ranks = mean_rank(results, hib, primary)
    rows = []
    for name, res in results.items():
        rows.append({"method": name, "steps": base["epochs"] * base["steps_per_epoch"],
                     "encoder GFLOPs": f"{flops[name] / 1e9:.4f}",
                     "seg mIoU": f"{res['seg']['miou']:.2f}", "depth RMSE": f"{res['depth']['rmse']:.4f}",
                     "normals mean°": f"{res['normals']['mean_angle']:.2f}",
                     "ΔMTL % vs STL": f"{delta_mtl(res, stl, hib, primary):+.2f}", "mean rank": f"{ranks[name]:.2f}"})
        print(rows[-1], flush=True)
    notes = (f"{a.model} (features_only, random init), {h}x{w} scenes, batch {a.batch}, "
             f"{base['epochs'] * base['steps_per_epoch']} steps each, AdamW lr 2e-3 cosine, balance {a.balance}. "
             f"Gated: budget {a.budget} of the full 4-branch encoder, projected and pruned before evaluation "
             f"(requested {report['requested'] / 1e9:.4f} GF, landed {report['landed'] / 1e9:.4f} GF). "
             "ΔMTL: one metric per task vs the single-task networks, positive = better.")
    md = write_table("mtl_comparison", "Single-task vs hard sharing vs gated on the embedded scenes", notes, rows, out=a.out)
    out = md.parent
    (out / "mtl_comparison.json").write_text(json.dumps({"results": results, "flops": flops, "budget": report}, indent=2))


if __name__ == "__main__":
    main()
