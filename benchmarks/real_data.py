"""STL vs hard-sharing MTL (EW, DB-MTL, GO4Align) vs GatedMTL at three budgets, on real items.

Two sets built from the real Fashion-MNIST images (Debian's ``dataset-fashion-mnist`` or
``--data-root``): MultiFashion (two items on one 28×28 grey canvas; tasks ``left`` / ``right``,
accuracy) and fashion scenes (items composited on a textured background; ``seg`` mIoU, relative
``depth`` RMSE, occlusion ``boundary`` ODS F). Every run trains the same number of steps from
random initialisation. Writes ``benchmarks/results/real_data.md`` and ``.csv``. ΔMTL is
Vandenhende's one-metric-per-task convention against the single-task networks; positive is
better. Encoder GFLOPs are fvcore counts (one multiply-add = one FLOP) of what runs at
inference: the T single-task backbones together, the shared backbone, or the pruned lean
encoder of a gated run. Usage::

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/real_data.py [--steps 200] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gatedmtl.cost import count_flops
from gatedmtl.data import create_dataset
from gatedmtl.tasks import delta_mtl
from gatedmtl.train import TrainConfig, Trainer, evaluate

SETS: dict[str, dict[str, Any]] = {
    "multifashion": {"tasks": ("left", "right"), "batch": 16, "label": "MultiFashion (28×28 grey)"},
    "fashion-scenes": {"tasks": ("seg", "depth", "boundary"), "batch": 8, "label": "fashion scenes"},
}
COLUMNS = {"left": ("acc", "left acc %"), "right": ("acc", "right acc %"), "seg": ("miou", "seg mIoU %"),
           "depth": ("rmse", "depth RMSE (layers)"), "boundary": ("odsf", "boundary ODS F %")}


def datasets(name: str, a: argparse.Namespace) -> tuple[Any, Any]:
    steps, batch = a.steps, SETS[name]["batch"]
    kw: dict[str, Any] = {"root": a.data_root, "seed": 0}
    if name == "multifashion":
        return (create_dataset(name, split="train", length=steps * batch, **kw),
                create_dataset(name, split="val", length=a.val_multi, **kw))
    size = (a.scene_size, a.scene_size)
    return (create_dataset(name, split="train", length=steps * batch, size=size, cache=True, **kw),
            create_dataset(name, split="val", length=a.val_scenes, size=size, cache=True, **kw))


def train(name: str, data: tuple[Any, Any], a: argparse.Namespace, out: Path, **cfg: Any) -> tuple[Trainer, float]:
    config = TrainConfig(model=a.model, data=name, epochs=1, steps_per_epoch=a.steps, batch_size=SETS[name]["batch"],
                         lr=2e-3, progress=False, out=str(out), **cfg)
    start = time.perf_counter()
    trainer = Trainer(config, datasets=data)
    trainer.fit()
    return trainer, time.perf_counter() - start


def run_set(name: str, a: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    tasks = SETS[name]["tasks"]
    data = datasets(name, a)
    size = tuple(data[0][0]["image"].shape)
    results: dict[str, dict] = {}
    flops: dict[str, float] = {}
    seconds: dict[str, float] = {}
    stl, stl_flops, stl_s = {}, 0.0, 0.0
    for t in tasks:
        tr, s = train(name, data, a, tmp / f"{name}_stl_{t}", tasks=(t,), arch="shared", budget=None, balance="ew")
        stl[t] = tr.evaluate()[t]
        stl_flops += count_flops(tr.net.encoder, (1, *size))
        stl_s += s
    results[f"STL ({len(tasks)} networks)"], flops[f"STL ({len(tasks)} networks)"] = stl, stl_flops
    seconds[f"STL ({len(tasks)} networks)"] = stl_s
    print(name, "STL", stl, flush=True)
    for balance, label in (("ew", "MTL + EW"), ("db_mtl", "MTL + DB-MTL"), ("go4align", "MTL + GO4Align")):
        tr, s = train(name, data, a, tmp / f"{name}_{balance}", tasks=tasks, arch="shared", budget=None, balance=balance)
        results[label], flops[label], seconds[label] = tr.evaluate(), count_flops(tr.net.encoder, (1, *size)), s
        print(name, label, results[label], flush=True)
    for budget in a.budgets.split(","):
        tr, s = train(name, data, a, tmp / f"{name}_gated_{budget}", tasks=tasks, arch="gated", budget=budget,
                      balance="ew", lambda_s=a.lambda_s)
        lean, report = tr.finalize()
        label = f"GatedMTL, budget {budget} (lean)"
        results[label] = evaluate(lean, tr.val_set, tr.tasks, SETS[name]["batch"])
        flops[label], seconds[label] = report["landed"], s
        print(name, label, results[label], f"{report['landed'] / 1e9:.4f} GF", flush=True)
    hib = {t: tr.tasks[t].higher_is_better for t in tasks}
    primary = {t: COLUMNS[t][0] for t in tasks}
    rows = []
    for method, res in results.items():
        row: dict[str, Any] = {"data": name, "method": method, "steps": a.steps,
                               "encoder GFLOPs": f"{flops[method] / 1e9:.4f}"}
        for t in tasks:
            row[COLUMNS[t][1]] = f"{res[t][primary[t]]:.2f}" if t != "depth" else f"{res[t]['rmse']:.3f}"
        row["ΔMTL % vs STL"] = f"{delta_mtl(res, stl, hib, primary):+.2f}"
        row["train s"] = f"{seconds[method]:.0f}"
        rows.append(row)
    return rows


def write(rows: list[dict[str, Any]], a: argparse.Namespace, total_s: float) -> Path:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["data", "method", "steps", "encoder GFLOPs", *(c[1] for c in COLUMNS.values()), "ΔMTL % vs STL", "train s"]
    with open(out / f"{a.name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# STL vs MTL vs GatedMTL on real Fashion-MNIST items", "",
             f"{a.model} (timm features_only, random init, 1 input channel for MultiFashion), {a.steps} steps "
             f"per run (one pass over {a.steps} fresh batches), AdamW lr 2e-3 cosine, seed 0, "
             f"{torch.get_num_threads()} CPU thread(s); total wall time {total_s / 60:.1f} min. "
             f"MultiFashion: Sener & Koltun's overlay protocol, batch {SETS['multifashion']['batch']}, "
             f"evaluated on {a.val_multi} composites of the test split. Fashion scenes: {a.scene_size}×{a.scene_size}, "
             f"batch {SETS['fashion-scenes']['batch']}, evaluated on {a.val_scenes} scenes of test-split items. "
             "STL: one shared-arch network per task (EW); MTL: hard sharing with the named balancing; GatedMTL: "
             f"budgets as fractions of the full (T+1)-branch encoder, EW, projected and pruned before evaluation. "
             "ΔMTL: one metric per task (the columns) vs STL, positive = better. Encoder GFLOPs: fvcore, "
             "per image, what runs at inference."
             + (f" Sparsity weight λ_s = {a.lambda_s:g}." if a.lambda_s != 1.0 else "")
             + (" Quick mode: a smoke run, not a benchmark." if a.quick else ""), ""]
    for name in SETS:
        sub = [r for r in rows if r["data"] == name]
        if not sub:
            continue
        tcols = [COLUMNS[t][1] for t in SETS[name]["tasks"]]
        c = ["method", "encoder GFLOPs", *tcols, "ΔMTL % vs STL", "train s"]
        lines += [f"## {SETS[name]['label']}", "", "| " + " | ".join(c) + " |", "|" + "---|" * len(c)]
        lines += ["| " + " | ".join(str(r[k]) for k in c) + " |" for r in sub]
        best = max(sub[1:], key=lambda r: float(r["ΔMTL % vs STL"]))
        lines += ["", f"Highest ΔMTL: {best['method']} ({best['ΔMTL % vs STL']} %) at {best['encoder GFLOPs']} "
                      f"GFLOPs, against {sub[0]['encoder GFLOPs']} GFLOPs for STL.", ""]
    path = out / f"{a.name}.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--budgets", default="0.35,0.5,0.65")
    p.add_argument("--lambda-s", type=float, default=1.0, help="weight of the gated runs' budget penalty")
    p.add_argument("--scene-size", type=int, default=32)
    p.add_argument("--val-multi", type=int, default=1000)
    p.add_argument("--val-scenes", type=int, default=128)
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--quick", action="store_true", help="20 steps and small validation sets: a smoke run")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default=None, help="file name (default: real_data, or real_data_quick)")
    a = p.parse_args()
    if a.quick:
        a.steps, a.val_multi, a.val_scenes = 20, 200, 32
    a.name = a.name or ("real_data_quick" if a.quick else "real_data")
    unknown = set(a.sets.split(",")) - set(SETS)
    if unknown:
        raise SystemExit(f"error: unknown --sets {sorted(unknown)}; choose from {list(SETS)}")
    tmp = Path(tempfile.mkdtemp(prefix="gatedmtl-real-"))
    start = time.perf_counter()
    rows = []
    for name in a.sets.split(","):
        rows += run_set(name, a, tmp)
    print(write(rows, a, time.perf_counter() - start))


if __name__ == "__main__":
    main()
