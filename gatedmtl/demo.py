"""``make demo``: the whole job on the embedded scenes, in a few minutes on a laptop CPU.

convert resnet18 for seg + depth + normals -> train at a FLOP budget -> project + prune ->
profile (plain / gated / lean FLOPs, requested vs landed budget) -> export ONNX (checked with
ONNX Runtime) -> per-task metrics and ΔMTL of the lean model against the dense gated one.

    python -m gatedmtl.demo [--model resnet18] [--budget 0.5] [--epochs 6] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .cost import count_flops, count_params, flop_bounds
from .export import export_onnx
from .network import MultiTaskNet
from .profile import onnx_latency
from .tasks import delta_mtl
from .train import RUN_FILES, TrainConfig, Trainer, evaluate


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--budget", default="0.5")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--image-size", default="64x96")
    p.add_argument("--train-length", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="runs/demo", help="output folder (an earlier demo's files in it are replaced)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    _clear_demo_folder(out)
    h, w = (int(v) for v in args.image_size.split("x"))
    config = TrainConfig(model=args.model, tasks=("seg", "depth", "normals"), image_size=(h, w),
                         train_length=args.train_length, val_length=96, budget=args.budget, epochs=args.epochs,
                         batch_size=args.batch_size, lr=2e-3, gate_lr=0.05, out=str(out))
    start = time.perf_counter()
    print(f"[1/5] convert {args.model} into a shared + 3-task gated network (embedded scenes, {h}x{w})")
    trainer = Trainer(config)
    enc = trainer.net.encoder
    size = trainer.input_size
    low, high = flop_bounds(enc, (1, *size))
    print(f"      {len(enc.gates())} gated layers; lean encoder between {low / 1e9:.3f} (all shared) and "
          f"{high / 1e9:.3f} GFLOPs (all task-specific); budget {args.budget} -> {trainer.budget_flops / 1e9:.3f} GFLOPs")

    print(f"[2/5] train {config.epochs} epochs x {trainer.steps_per_epoch} steps at the budget")
    trainer.fit()
    dense_metrics = trainer.evaluate()

    print("[3/5] project the gates onto the budget and prune")
    lean, report = trainer.finalize()
    lean_metrics = evaluate(lean, trainer.val_set, trainer.tasks, config.batch_size)
    plain_backbone = _plain_backbone(trainer)
    plain = count_flops(plain_backbone, (1, *size))
    gated_full = count_flops(trainer.net.encoder, (1, *size))
    rows = [["encoder", "GFLOPs (fvcore: multiply-adds)", "params (M)"],
            ["plain backbone (one task)", f"{plain / 1e9:.4f}", f"{count_params(plain_backbone) / 1e6:.2f}"],
            ["gated, every branch (training)", f"{gated_full / 1e9:.4f}", f"{count_params(trainer.net.encoder) / 1e6:.2f}"],
            ["lean (pruned)", f"{report['landed'] / 1e9:.4f}", f"{count_params(lean.encoder) / 1e6:.2f}"],
            ["budget requested", f"{report['requested'] / 1e9:.4f}", ""]]
    print(_table(rows))
    print(f"      landed {report['error']:+.3%} from the requested budget")

    print("[4/5] export the lean network to ONNX and check it with ONNX Runtime")
    onnx_path = out / "lean.onnx"
    exp = export_onnx(lean, onnx_path, (1, *size))
    worst = max(exp.max_rel_error.values())
    # the same heads on one shared plain backbone (hard sharing): the latency a lean model competes with
    shared_path = out / "hard_sharing.onnx"
    export_onnx(MultiTaskNet(plain_backbone, trainer.net.heads).eval(), shared_path, (1, *size), check=False)
    lean_ms, shared_ms = onnx_latency(onnx_path, (1, *size)).median_ms, onnx_latency(shared_path, (1, *size)).median_ms
    print(f"      {onnx_path} ({exp.file_size_bytes / 1e6:.1f} MB): outputs {list(exp.outputs)}; "
          f"ORT vs torch max rel. error {worst:.1e}")
    print(f"      ONNX Runtime, 1 thread, median: lean {lean_ms:.1f} ms vs {shared_ms:.1f} ms for the same heads on one "
          f"shared backbone (x{lean_ms / shared_ms:.2f} time for x{report['landed'] / plain:.2f} encoder FLOPs)")

    print("[5/5] metrics on the validation scenes (dense gated vs lean)")
    primary = {t: trainer.tasks[t].primary_metric for t in config.tasks}
    hib = {t: trainer.tasks[t].higher_is_better for t in config.tasks}
    rows = [["task", "metric", "dense gated", "lean"]]
    for t in config.tasks:
        for m in (primary[t],):
            rows.append([t, m, f"{dense_metrics[t][m]:.4f}", f"{lean_metrics[t][m]:.4f}"])
    print(_table(rows))
    dm = delta_mtl(lean_metrics, dense_metrics, hib, primary)
    print(f"      ΔMTL of the lean model vs the dense gated model (one metric per task): {dm:+.2f} %")
    summary = {"budget": report, "dense": dense_metrics, "lean": lean_metrics, "delta_mtl_vs_dense": dm,
               "onnx": {"path": str(onnx_path), "max_rel_error": worst, "ort_median_ms": lean_ms,
                        "hard_sharing_ort_median_ms": shared_ms},
               "seconds": time.perf_counter() - start}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    print(f"done in {summary['seconds']:.0f} s; results in {out}/ (demo.json, log.jsonl, lean.onnx)")
    return 0


DEMO_FILES = (*RUN_FILES, "demo.json", "lean.onnx", "lean.onnx.data", "hard_sharing.onnx", "hard_sharing.onnx.data")


def _clear_demo_folder(out: Path) -> None:
    """Remove an earlier demo's files from ``out``; refuse a folder that holds anything else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file, not a folder")
    foreign = [p.name for p in out.iterdir() if p.name not in DEMO_FILES and not p.name.startswith(".")]
    if foreign:
        raise SystemExit(f"error: {out} holds files that the demo did not write ({', '.join(sorted(foreign)[:5])}); "
                         "give another --out")
    for name in DEMO_FILES:
        if (out / name).is_file():
            (out / name).unlink()


def _plain_backbone(trainer: Trainer) -> torch.nn.Module:
    from .cost import shared_branch

    return shared_branch(trainer.net.encoder)


if __name__ == "__main__":
    sys.exit(main())
