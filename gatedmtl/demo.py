"""``make demo``: the whole job on the embedded scenes, in a few minutes on a laptop CPU.

convert resnet18 for seg + depth + normals -> train at a FLOP budget -> project + prune ->
profile (plain / gated / lean FLOPs, requested vs landed budget) -> export ONNX (checked with
ONNX Runtime) -> per-task metrics and ΔMTL of the lean model against the dense gated one.

    python -m gatedmtl.demo [--model resnet18] [--budget 0.5] [--epochs 6] [--finetune-epochs 0] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from .cost import count_flops, count_params, flop_bounds
from .export import export_onnx
from .network import MultiTaskNet
from .profile import onnx_kernel_time, onnx_latency
from .slots import SlotModule
from .surgery import GatedModel
from .tasks import delta_mtl
from .train import RUN_FILES, TrainConfig, Trainer, evaluate, finetune_config, save_lean


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
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="also fine-tune the pruned network for this many epochs (gatedmtl finetune) before export")
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
    tuned_metrics = None
    if args.finetune_epochs > 0:
        lean_path = save_lean(out / "lean.safetensors", lean, trainer.net, trainer.meta(), report)
        print(f"[3b/5] fine-tune the lean network {args.finetune_epochs} epoch(s) at a tenth of the lr "
              f"(gatedmtl finetune {lean_path} --out {out / 'finetune'})")
        tuner = Trainer(finetune_config(lean_path, {"epochs": args.finetune_epochs, "out": str(out / "finetune")}),
                        force=True, datasets=(trainer.train_set, trainer.val_set))
        tuner.fit()
        lean = tuner.net.eval()
        tuned_metrics = tuner.evaluate()

    print("[4/5] export the lean network to ONNX and check it with ONNX Runtime")
    onnx_path = out / "lean.onnx"
    exp = export_onnx(lean, onnx_path, (1, *size))
    worst = max(exp.max_rel_error.values())
    # what a lean model competes with: the same heads on one shared plain backbone (hard sharing),
    # and T separate networks (each task's own branch as a plain backbone with its head)
    shared_path, separate_path = out / "hard_sharing.onnx", out / "separate.onnx"
    export_onnx(MultiTaskNet(plain_backbone, trainer.net.heads).eval(), shared_path, (1, *size), check=False)
    export_onnx(SeparateNetworks(trainer.net.encoder, trainer.net.heads).eval(), separate_path, (1, *size), check=False)
    paths = {"lean": onnx_path, "hard_sharing": shared_path, "separate": separate_path}
    kernel = {k: onnx_kernel_time(path, (1, *size)).total_ms for k, path in paths.items()}
    wall = {k: onnx_latency(path, (1, *size)).median_ms for k, path in paths.items()}
    t = len(config.tasks)
    print(f"      {onnx_path} ({exp.file_size_bytes / 1e6:.1f} MB): outputs {list(exp.outputs)}; "
          f"ORT vs torch max rel. error {worst:.1e}")
    print(f"      ONNX Runtime, 1 thread, sum of per-node minimum kernel times (10 runs): lean {kernel['lean']:.1f} ms, "
          f"hard sharing (one backbone + the heads) {kernel['hard_sharing']:.1f} ms, {t} separate networks (each "
          f"task's branch as a plain backbone + its head) {kernel['separate']:.1f} ms")
    print(f"      lean = x{kernel['lean'] / kernel['hard_sharing']:.2f} hard sharing's time and "
          f"x{kernel['lean'] / kernel['separate']:.2f} the separate networks' time, for x{report['landed'] / plain:.2f} "
          f"encoder FLOPs (wall medians: {wall['lean']:.1f} / {wall['hard_sharing']:.1f} / {wall['separate']:.1f} ms)")

    print("[5/5] metrics on the validation scenes (dense gated vs lean)")
    primary = {t: trainer.tasks[t].primary_metric for t in config.tasks}
    hib = {t: trainer.tasks[t].higher_is_better for t in config.tasks}
    rows = [["task", "metric", "dense gated", "lean"] + (["lean fine-tuned"] if tuned_metrics else [])]
    for t in config.tasks:
        for m in (primary[t],):
            rows.append([t, m, f"{dense_metrics[t][m]:.4f}", f"{lean_metrics[t][m]:.4f}"]
                        + ([f"{tuned_metrics[t][m]:.4f}"] if tuned_metrics else []))
    print(_table(rows))
    dm = delta_mtl(lean_metrics, dense_metrics, hib, primary)
    print(f"      ΔMTL of the lean model vs the dense gated model (one metric per task): {dm:+.2f} %")
    if tuned_metrics:
        dm_tuned = delta_mtl(tuned_metrics, dense_metrics, hib, primary)
        print(f"      ΔMTL of the fine-tuned lean model vs the dense gated model: {dm_tuned:+.2f} %")
    summary = {"budget": report, "dense": dense_metrics, "lean": lean_metrics, "delta_mtl_vs_dense": dm,
               "lean_finetuned": tuned_metrics,
               "onnx": {"path": str(onnx_path), "max_rel_error": worst, "ort_median_ms": wall["lean"],
                        "hard_sharing_ort_median_ms": wall["hard_sharing"],
                        "separate_ort_median_ms": wall["separate"],
                        "ort_kernel_ms": kernel["lean"], "hard_sharing_ort_kernel_ms": kernel["hard_sharing"],
                        "separate_ort_kernel_ms": kernel["separate"]},
               "seconds": time.perf_counter() - start}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    print(f"done in {summary['seconds']:.0f} s; results in {out}/ (demo.json, log.jsonl, lean.onnx)")
    return 0


DEMO_FILES = (*RUN_FILES, "demo.json", "lean.onnx", "lean.onnx.data", "hard_sharing.onnx", "hard_sharing.onnx.data",
              "separate.onnx", "separate.onnx.data", "lean.safetensors")
DEMO_FOLDERS = ("finetune",)  # the fine-tuning run (its RUN_FILES)


def _clear_demo_folder(out: Path) -> None:
    """Remove an earlier demo's files from ``out``; refuse a folder that holds anything else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file, not a folder")
    foreign = [p.name for p in out.iterdir() if p.name not in DEMO_FILES + DEMO_FOLDERS and not p.name.startswith(".")]
    for folder in DEMO_FOLDERS:
        if (out / folder).exists():
            foreign += [f"{folder}/{p.name}" for p in (out / folder).iterdir()
                        if p.name not in RUN_FILES and not p.name.startswith(".")]
    if foreign:
        raise SystemExit(f"error: {out} holds files that the demo did not write ({', '.join(sorted(foreign)[:5])}); "
                         "give another --out")
    for name in DEMO_FILES:
        if (out / name).is_file():
            (out / name).unlink()
    for folder in DEMO_FOLDERS:
        for name in RUN_FILES:
            if (out / folder / name).is_file():
                (out / folder / name).unlink()


class SeparateNetworks(torch.nn.Module):
    """One plain network per task: slot ``t + 1`` of ``encoder`` as a plain backbone, then task ``t``'s head.

    ``forward(x[B, C, H, W]) -> {task: prediction}``, the networks run one after the other
    (what a user deploys without sharing). Weights are copied from the gated encoder.
    """

    def __init__(self, encoder: GatedModel, heads: torch.nn.ModuleDict) -> None:
        super().__init__()
        self.backbones = torch.nn.ModuleDict({t: slot_backbone(encoder, i + 1) for i, t in enumerate(encoder.tasks)})
        self.heads = torch.nn.ModuleDict({t: heads[t] for t in encoder.tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: self.heads[t](net(x)) for t, net in self.backbones.items()}


def slot_backbone(encoder: GatedModel, slot: int) -> torch.nn.Module:
    """A copy of ``encoder``'s backbone with every slotted module replaced by its slot ``slot`` (no gates)."""
    plain = copy.deepcopy(encoder.backbone)
    for name, module in list(plain.named_modules()):
        if isinstance(module, SlotModule):
            parent, _, attr = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, attr, module.slots[slot])
    return plain.eval()


def _plain_backbone(trainer: Trainer) -> torch.nn.Module:
    from .cost import shared_branch

    return shared_branch(trainer.net.encoder)


if __name__ == "__main__":
    sys.exit(main())
