"""Soft, hard and annealed shared mix: accuracy of the lean gated model after the same short training.

Trains the gated model once per mix and seed on the embedded scenes (seg + depth + normals):
``mix="soft"`` (softmax of the mixing logits), ``mix="hard"`` (their one-hot argmax,
straight-through) and ``mix="anneal"`` (soft, its temperature lowered from 1 to 0.01 between
``--mix-anneal`` START and END of the training, then hard), with the same seed, data, steps and
budget, projects each onto the budget, prunes it and evaluates the lean model. ΔMTL (mIoU, depth RMSE, normals mean angle) is given
against single-task networks (trained here with ``--train-stl``, or read from ``--stl-json``: a
JSON file with ``{"results": {"single-task (3 networks)": {task: metrics}}}`` from runs with the
same settings) and every mix against soft (where the seed has a soft run). A mix may carry gate tying, e.g. ``anneal+tie-residual``
(``convert(..., tie_residual=True)``) or ``anneal+tie-residual+tie-depthwise``, and ``+prefix`` the prefix gate
structure (``convert(..., gate_structure="prefix")``). Writes
``mix_comparison.md/.csv`` (``mix_comparison_<model>`` for a model other than resnet18) under ``--out``. Usage::

    python benchmarks/mix_comparison.py (--train-stl | --stl-json FILE) [--model resnet18] [--steps 240]
        [--budget 0.5] [--seeds 0] [--mixes soft,hard,anneal,anneal+tie-residual] [--mix-anneal 0.5,0.9]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from _report import write_table
from gatedmtl.tasks import delta_mtl
from gatedmtl.train import TrainConfig, Trainer, evaluate

TASKS = ("seg", "depth", "normals")
TIES = {"tie-residual": ("tie_residual", True), "tie-depthwise": ("tie_depthwise", True),
        "skip-dw-mix": ("skip_depthwise_mix", True), "prefix": ("gate_structure", "prefix")}


def parse_variant(spec: str) -> tuple[str, dict[str, bool | str]]:
    """``"anneal+tie-residual+prefix"`` -> ``("anneal", {"tie_residual": True, "gate_structure": "prefix"})``."""
    mix, *ties = spec.split("+")
    unknown = [t for t in ties if t not in TIES]
    if unknown:
        raise SystemExit(f"unknown option {unknown} in {spec!r}; choose from {sorted(TIES)}")
    return mix, dict(TIES[t] for t in ties)


STL_KEY = "single-task (3 networks)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--steps", type=int, default=240, help="steps per run (the STL reference in results/mix_comparison_stl.json used 240)")
    p.add_argument("--budget", default="0.5")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", default="64x96")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each trains one run per mix")
    p.add_argument("--mixes", default="soft,hard,anneal", help="mixes to train per seed (the table needs soft for "
                                                                "the 'vs soft' column)")
    p.add_argument("--mix-anneal", default="0.5,0.9", help="START,END of mix=anneal, fractions of the steps")
    p.add_argument("--cache", default=None, help="folder of finished runs (<seed>_<mix>.json, stl.json): runs found "
                                                  "there are not trained again, new ones are added (lets runs go in "
                                                  "parallel)")
    p.add_argument("--train-stl", action="store_true", help="train the single-task networks here (seed 0)")
    p.add_argument("--stl-json", default=None, help="single-task metrics of runs with the same settings (see above)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default=None, help="file name of the table (default: mix_comparison, "
                                                "mix_comparison_<model> for a model other than resnet18)")
    a = p.parse_args()
    if a.train_stl == (a.stl_json is not None):
        p.error("give one of --train-stl or --stl-json FILE (the single-task reference of the ΔMTL column)")
    torch.set_num_threads(1)
    h, w = (int(v) for v in a.size.split("x"))
    epochs = max(1, a.steps // 48)
    base = dict(model=a.model, image_size=(h, w), train_length=48 * a.batch, val_length=128, batch_size=a.batch,
                epochs=epochs, steps_per_epoch=a.steps // epochs, lr=2e-3, progress=False, device="cpu")
    steps = epochs * (a.steps // epochs)
    anneal = tuple(float(v) for v in a.mix_anneal.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="gatedmtl-mix-"))
    cache = Path(a.cache) if a.cache else None
    if a.train_stl:
        stl_cached = cache / "stl.json" if cache else None
        if stl_cached is not None and stl_cached.is_file():
            stl = json.loads(stl_cached.read_text())
        else:
            stl = {}
            for t in TASKS:
                tr = Trainer(TrainConfig(**base, tasks=(t,), arch="shared", budget=None, out=str(tmp / f"stl_{t}")))
                tr.fit()
                stl[t] = tr.evaluate()[t]
            if stl_cached is not None:
                stl_cached.parent.mkdir(parents=True, exist_ok=True)
                stl_cached.write_text(json.dumps(stl, indent=2))
        stl_note = f"single-task networks trained here ({steps} steps, seed 0)"
    else:
        stl = json.loads(Path(a.stl_json).read_text())["results"][STL_KEY]
        stl_note = f"single-task metrics read from {Path(a.stl_json).name}"
    rows, results = [], {}
    tasks = None
    for seed in (int(s) for s in a.seeds.split(",")):
        for spec in [m.strip() for m in a.mixes.split(",") if m.strip()]:
            mix, ties = parse_variant(spec)
            cached = cache / f"{seed}_{spec}.json" if cache else None
            if cached is not None and cached.is_file():
                entry = json.loads(cached.read_text())
                results[(seed, spec)], row = entry["results"], entry["row"]
                rows.append(row)
                if tasks is None:  # the task objects (metrics' directions) of a run read from the cache
                    tasks = Trainer(TrainConfig(**base, tasks=TASKS, arch="gated", budget=a.budget,
                                                out=str(tmp / "tasks"))).tasks
                continue
            start = time.perf_counter()
            tr = Trainer(TrainConfig(**base, tasks=TASKS, arch="gated", budget=a.budget, mix=mix, seed=seed,
                                     mix_anneal=anneal, out=str(tmp / f"gated_{spec}_{seed}"), **ties))
            tr.fit()
            trained = tr.evaluate()
            lean, report = tr.finalize()
            res = evaluate(lean, tr.val_set, tr.tasks, a.batch)
            tasks = tr.tasks
            results[(seed, spec)] = res
            enc = tr.net.encoder
            masks = [g.open_mask() for g in enc.unique_gates()]
            layers = [m for _, m in lean.encoder.lean_layers()]
            rows.append({"seed": seed, "mix": spec, "steps": steps, "train s": f"{time.perf_counter() - start:.0f}",
                         "cost before projection / budget": f"{report['before_projection'] / report['requested']:.3f}",
                         "gates changed by projection": f"{report['changed_gates']} of {report['gates']}",
                         "open": f"{sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks):.2f}",
                         "lean GFLOPs": f"{report['landed'] / 1e9:.4f}",
                         "lean shared mixes": ", ".join(f"{k} {v}" for k, v in sorted(
                             {x: sum(m.mix == x for m in layers) for x in {m.mix for m in layers}}.items())),
                         "seg mIoU": f"{res['seg']['miou']:.2f}", "depth RMSE": f"{res['depth']['rmse']:.4f}",
                         "normals mean°": f"{res['normals']['mean_angle']:.2f}",
                         "trained (before projection) seg / depth / normals":
                             f"{trained['seg']['miou']:.2f} / {trained['depth']['rmse']:.4f} / "
                             f"{trained['normals']['mean_angle']:.2f}"})
            print(rows[-1], flush=True)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps({"results": res, "row": rows[-1]}, indent=2))
    rows.insert(0, {"seed": 0, "mix": "single-task (3 networks)", "steps": steps, "seg mIoU": f"{stl['seg']['miou']:.2f}",
                    "depth RMSE": f"{stl['depth']['rmse']:.4f}", "normals mean°": f"{stl['normals']['mean_angle']:.2f}"})
    primary = {t: tasks[t].primary_metric for t in TASKS}
    hib = {t: tasks[t].higher_is_better for t in TASKS}
    for row in rows[1:]:
        res = results[(row["seed"], row["mix"])]
        row["ΔMTL % vs STL"] = f"{delta_mtl(res, stl, hib, primary):+.2f}"
        soft = results.get((row["seed"], "soft"))
        row["ΔMTL % vs soft (same seed)"] = f"{delta_mtl(res, soft, hib, primary):+.2f}" if soft else "-"
    notes = (f"{a.model} (features_only, random init), {h}x{w} scenes, batch {a.batch}, {steps} steps per run, "
             f"AdamW lr 2e-3 cosine, balance ew, budget {a.budget} of the full 4-branch encoder; each model is "
             "projected onto the budget and pruned before evaluation (the lean model's metrics). ΔMTL: one metric "
             f"per task (mIoU, depth RMSE, normals mean angle), positive = better; STL: {stl_note}. "
             f"Command: python benchmarks/mix_comparison.py --model {a.model} --steps {a.steps} --budget {a.budget} "
             f"--seeds {a.seeds} --mixes {a.mixes} --mix-anneal {a.mix_anneal}"
             + (" --train-stl" if a.train_stl else f" --stl-json {Path(a.stl_json).name}")
             + (f" --name {a.name}" if a.name else "")
             + " (the runs of a seed may run as separate processes, one --mixes each, with a shared --cache).")
    cols = ["seed", "mix", "steps", "seg mIoU", "depth RMSE", "normals mean°", "ΔMTL % vs STL",
            "ΔMTL % vs soft (same seed)", "lean GFLOPs", "open", "cost before projection / budget",
            "gates changed by projection", "lean shared mixes", "trained (before projection) seg / depth / normals",
            "train s"]
    name = a.name or ("mix_comparison" if a.model == "resnet18" else f"mix_comparison_{a.model}")
    write_table(name, "Soft, hard and annealed shared mix on the embedded scenes", notes, rows, cols,
                out=a.out)


if __name__ == "__main__":
    main()
