"""STL vs hard-sharing MTL vs GatedMTL at three budgets, on real items, for two backbones.

Two sets built from the real Fashion-MNIST images (Debian's ``dataset-fashion-mnist`` or
``--data-root``): MultiFashion (two items on one 28×28 grey canvas; tasks ``left`` / ``right``,
accuracy) and fashion scenes (items composited on a textured background; ``seg`` mIoU, relative
``depth`` RMSE, occlusion ``boundary`` ODS F). Backbones (``--models``): ``resnet18`` and
``mobilenetv3_large_100`` (timm ``features_only``, random init, 1 input channel for
MultiFashion). Rows per set and backbone: STL (one network per task), MTL with EW, DB-MTL,
GO4Align and one other balancing method (``--other``, default ``famo``: the highest ΔMTL in
``benchmarks/results/balancing.md`` among the methods not already in the table), GatedMTL at
three budgets (EW; projected and pruned, the lean network evaluated). Every run trains the same
number of steps from random initialisation. ΔMTL is Vandenhende's one-metric-per-task
convention against the single-task networks of the same backbone; positive is better. Encoder
GFLOPs are fvcore counts (one multiply-add = one FLOP) of what runs at inference: the T
single-task backbones together, the shared backbone, or the pruned lean encoder. Train CPU
seconds: process CPU time of the training (one thread), less sensitive to machine load than
wall time. ``--jobs 2`` runs two (data set, backbone) jobs at once, one process and thread each; the
files are rewritten after every finished job.
Writes ``benchmarks/results/real_data.md`` and ``.csv``. Usage::

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/real_data.py [--steps 100] [--jobs 2] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

from gatedmtl import balancing
from gatedmtl.cost import count_flops
from gatedmtl.data import create_dataset
from gatedmtl.tasks import delta_mtl
from gatedmtl.train import ProjectionWarning, TrainConfig, Trainer, dataset_image_size, evaluate

MODELS = ("resnet18", "mobilenetv3_large_100")
SETS: dict[str, dict[str, Any]] = {
    "multifashion": {"tasks": ("left", "right"), "batch": 16, "label": "MultiFashion (28×28 grey)"},
    "fashion-scenes": {"tasks": ("seg", "depth", "boundary"), "batch": 8, "label": "fashion scenes"},
}
COLUMNS = {"left": ("acc", "left acc %"), "right": ("acc", "right acc %"), "seg": ("miou", "seg mIoU %"),
           "depth": ("rmse", "depth RMSE (layers)"), "boundary": ("odsf", "boundary ODS F %")}
LABELS = {"ew": "EW", "db_mtl": "DB-MTL", "go4align": "GO4Align", "famo": "FAMO", "rlw": "RLW", "mgda": "MGDA",
          "si": "SI", "nash_mtl": "Nash-MTL", "cagrad": "CAGrad", "pcgrad": "PCGrad", "upgrad": "UPGrad",
          "imtl_g": "IMTL-G", "gradnorm": "GradNorm", "dwa": "DWA", "uw": "UW"}
FIXED = ("ew", "db_mtl", "go4align")


def datasets(name: str, a: argparse.Namespace) -> tuple[Any, Any]:
    steps, batch = a.steps, SETS[name]["batch"]
    kw: dict[str, Any] = {"root": a.data_root, "seed": 0}
    if name == "multifashion":
        return (create_dataset(name, split="train", length=steps * batch, **kw),
                create_dataset(name, split="val", length=a.val_multi, **kw))
    size = (a.scene_size, a.scene_size)
    return (create_dataset(name, split="train", length=steps * batch, size=size, cache=True, **kw),
            create_dataset(name, split="val", length=a.val_scenes, size=size, cache=True, **kw))


def train(name: str, model: str, data: tuple[Any, Any], a: argparse.Namespace, out: Path,
          **cfg: Any) -> tuple[Trainer, float]:
    """Train one run; returns the trainer and its process CPU seconds."""
    config = TrainConfig(model=model, data=name, epochs=1, steps_per_epoch=a.steps, batch_size=SETS[name]["batch"],
                         lr=2e-3, progress=False, out=str(out), **cfg)
    start = time.process_time()
    trainer = Trainer(config, datasets=data)
    trainer.fit()
    return trainer, time.process_time() - start


def run_set(name: str, model: str, a: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """All rows of one data set and backbone, as CSV dicts."""
    tasks = SETS[name]["tasks"]
    data = datasets(name, a)
    size = dataset_image_size(data[0])
    hib: dict[str, bool] = {}
    primary = {t: COLUMNS[t][0] for t in tasks}
    runs: list[dict[str, Any]] = []  # method, results, flops, seconds, extra notes
    tag = f"{name}/{model}"
    stl, stl_flops, stl_s = {}, 0.0, 0.0
    for t in tasks:
        tr, s = train(name, model, data, a, tmp / f"{name}_{model}_stl_{t}", tasks=(t,), arch="shared",
                      budget=None, balance="ew")
        stl[t] = tr.evaluate()[t]
        hib[t] = tr.tasks[t].higher_is_better
        stl_flops += count_flops(tr.net.encoder, (1, *size))
        stl_s += s
    runs.append({"method": f"STL ({len(tasks)} networks)", "res": stl, "flops": stl_flops, "s": stl_s})
    print(tag, "STL", stl, flush=True)
    for balance in (*FIXED, a.other):
        label = f"MTL + {LABELS.get(balance, balance)}" + (" (best other)" if balance == a.other else "")
        tr, s = train(name, model, data, a, tmp / f"{name}_{model}_{balance}", tasks=tasks, arch="shared",
                      budget=None, balance=balance)
        runs.append({"method": label, "res": tr.evaluate(), "flops": count_flops(tr.net.encoder, (1, *size)), "s": s})
        print(tag, label, runs[-1]["res"], flush=True)
    for budget in a.budgets.split(","):
        tr, s = train(name, model, data, a, tmp / f"{name}_{model}_gated_{budget}", tasks=tasks, arch="gated",
                      budget=budget, balance="ew", lambda_s=a.lambda_s)
        trained = tr.evaluate()  # the gated network as trained, before projection and pruning
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ProjectionWarning)  # its numbers go into the table instead
            lean, report = tr.finalize()
        label = f"GatedMTL, budget {budget} (lean)"
        runs.append({"method": label, "res": evaluate(lean, tr.val_set, tr.tasks, SETS[name]["batch"]),
                     "flops": report["landed"], "s": s, "trained": trained,
                     "end GFLOPs": report["before_projection"] / 1e9, "budget GFLOPs": report["requested"] / 1e9,
                     "changed gates %": 100 * report["changed_gates"] / report["gates"]})
        print(tag, label, runs[-1]["res"], f"{report['landed'] / 1e9:.4f} GF", flush=True)
    rows = []
    for run in runs:
        row: dict[str, Any] = {"data": name, "model": model, "method": run["method"], "steps": a.steps,
                               "encoder GFLOPs": f"{run['flops'] / 1e9:.4f}"}
        for t in tasks:
            value = run["res"][t][primary[t]]
            row[COLUMNS[t][1]] = f"{value:.3f}" if t == "depth" else f"{value:.2f}"
        row["ΔMTL % vs STL"] = f"{delta_mtl(run['res'], stl, hib, primary):+.2f}"
        row["train CPU s"] = f"{run['s']:.0f}"
        if "trained" in run:
            row["ΔMTL % before projection"] = f"{delta_mtl(run['trained'], stl, hib, primary):+.2f}"
            row["end-of-training GFLOPs"] = f"{run['end GFLOPs']:.4f}"
            row["budget GFLOPs"] = f"{run['budget GFLOPs']:.4f}"
            row["gates changed by projection %"] = f"{run['changed gates %']:.1f}"
        rows.append(row)
    return rows


def run_job(name: str, model: str, a: argparse.Namespace, tmp: Path) -> tuple[list[dict[str, Any]], float]:
    """One data set and backbone (one thread); returns its rows and its process CPU seconds."""
    torch.set_num_threads(1)
    start = time.process_time()
    rows = run_set(name, model, a, tmp)
    return rows, time.process_time() - start


GATED_COLS = ["ΔMTL % before projection", "budget GFLOPs", "end-of-training GFLOPs", "gates changed by projection %"]


def write(rows: list[dict[str, Any]], a: argparse.Namespace, wall_s: float, cpu_s: float) -> Path:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["data", "model", "method", "steps", "encoder GFLOPs", *(c[1] for c in COLUMNS.values()),
            "ΔMTL % vs STL", "train CPU s", *GATED_COLS]
    with open(out / f"{a.name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    cmd = "nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/real_data.py " + " ".join(sys.argv[1:])
    lines = ["# STL vs MTL vs GatedMTL on real Fashion-MNIST items", "",
             f"`{cmd.strip()}`", "",
             f"Backbones {', '.join(a.models.split(','))} (timm features_only, random init, 1 input channel for "
             f"MultiFashion), {a.steps} steps per run (one pass over {a.steps} fresh batches), AdamW lr 2e-3 cosine, "
             f"seed 0, gate groups of {TrainConfig.gate_group} channels, 1 CPU thread per process ({a.jobs} "
             f"process(es) at once); {len({(r['data'], r['model']) for r in rows})} (set, backbone) jobs in "
             f"{wall_s / 60:.1f} min wall, {cpu_s / 60:.1f} min CPU. "
             f"MultiFashion: Sener & Koltun's overlay protocol, batch {SETS['multifashion']['batch']}, "
             f"evaluated on {a.val_multi} composites of the test split. Fashion scenes: {a.scene_size}×{a.scene_size}, "
             f"batch {SETS['fashion-scenes']['batch']}, evaluated on {a.val_scenes} scenes of test-split items. "
             "STL: one shared-arch network per task (EW); MTL: hard sharing with the named balancing "
             f"(best other: `{a.other}`, the highest ΔMTL in balancing.md among the methods not otherwise in the "
             "table); GatedMTL: budgets as fractions of the full (T+1)-branch encoder, EW, projected onto the "
             "budget and pruned before evaluation. ΔMTL: one metric per task (the columns) vs the STL row of the "
             "same backbone, positive = better. Encoder GFLOPs: fvcore, per image, what runs at inference. "
             "Train CPU s: process CPU time of training (STL: the T networks together)."
             + (f" Sparsity weight λ_s = {a.lambda_s:g}." if a.lambda_s != 1.0 else "")
             + (" Quick mode: a smoke run, not a benchmark." if a.quick else ""), ""]
    for name in SETS:
        tcols = [COLUMNS[t][1] for t in SETS[name]["tasks"]]
        for model in a.models.split(","):
            sub = [r for r in rows if r["data"] == name and r["model"] == model]
            if not sub:
                continue
            c = ["method", "encoder GFLOPs", *tcols, "ΔMTL % vs STL", "train CPU s"]
            lines += [f"## {SETS[name]['label']}, {model}", "", "| " + " | ".join(c) + " |", "|" + "---|" * len(c)]
            lines += ["| " + " | ".join(str(r[k]) for k in c) + " |" for r in sub]
            best = max(sub[1:], key=lambda r: float(r["ΔMTL % vs STL"]))
            lines += ["", f"Highest ΔMTL: {best['method']} ({best['ΔMTL % vs STL']} %) at {best['encoder GFLOPs']} "
                          f"GFLOPs, against {sub[0]['encoder GFLOPs']} GFLOPs for STL.", ""]
            gated = [r for r in sub if "ΔMTL % before projection" in r]
            g = ["method", *GATED_COLS, "ΔMTL % vs STL"]
            lines += ["Gated runs before and after projection + pruning:", "",
                      "| " + " | ".join(g) + " |", "|" + "---|" * len(g)]
            lines += ["| " + " | ".join(str(r[k]) for k in g) + " |" for r in gated] + [""]
    path = out / f"{a.name}.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated timm backbones")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--budgets", default="0.35,0.5,0.65")
    p.add_argument("--other", default="famo", help="the extra balancing method (a gatedmtl.balancing name)")
    p.add_argument("--lambda-s", type=float, default=1.0, help="weight of the gated runs' budget penalty")
    p.add_argument("--scene-size", type=int, default=32)
    p.add_argument("--val-multi", type=int, default=1000)
    p.add_argument("--val-scenes", type=int, default=128)
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--jobs", type=int, default=1, help="(data set, backbone) jobs run at once, one process and thread each")
    p.add_argument("--quick", action="store_true", help="10 steps and small validation sets: a smoke run")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default=None, help="file name (default: real_data, or real_data_quick)")
    a = p.parse_args()
    if a.quick:
        a.steps, a.val_multi, a.val_scenes = 10, 64, 16
    a.name = a.name or ("real_data_quick" if a.quick else "real_data")
    unknown = set(a.sets.split(",")) - set(SETS)
    if unknown:
        raise SystemExit(f"error: unknown --sets {sorted(unknown)}; choose from {list(SETS)}")
    if a.other not in balancing.available() or a.other in FIXED:
        raise SystemExit(f"error: --other {a.other!r} must be one of {sorted(set(balancing.available()) - set(FIXED))}")
    if a.jobs < 1:
        raise SystemExit(f"error: --jobs must be >= 1, got {a.jobs}")
    jobs = [(name, model) for name in a.sets.split(",") for model in a.models.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="gatedmtl-real-"))
    start = time.perf_counter()
    done: dict[tuple[str, str], tuple[list[dict[str, Any]], float]] = {}

    def save() -> Path:  # after every finished job, so that an interrupted run keeps what it measured
        rows = [r for job in jobs if job in done for r in done[job][0]]
        return write(rows, a, time.perf_counter() - start, sum(s for _, s in done.values()))

    if a.jobs == 1:
        for job in jobs:
            done[job] = run_job(*job, a, tmp)
            save()
    else:
        with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_job, *job, a, tmp): job for job in jobs}
            for future in as_completed(futures):
                done[futures[future]] = future.result()
                save()
    print(save())
    shutil.rmtree(tmp, ignore_errors=True)  # the runs' checkpoints; the results are in the files above


if __name__ == "__main__":
    main()
