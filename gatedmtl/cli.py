"""``gatedmtl`` command line: train, prune, export, profile, evaluate, verify."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _kv(text: str, what: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in item:
            raise SystemExit(f"error: {what} expects key=value pairs, got {item!r}")
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
        raise SystemExit(f"error: expected a size like 96x128 or 1,3,96,128, got {text!r}") from None


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a multi-task network at a FLOP budget")
    p.add_argument("--model", default="resnet18", help="timm model name (features_only backbone)")
    p.add_argument("--tasks", default="seg,depth,normals")
    p.add_argument("--data", default="scenes", help="scenes (embedded), nyuv2, cityscapes, celeba")
    p.add_argument("--data-root", default=None)
    p.add_argument("--image-size", default="96x128", help="HxW of the embedded scenes")
    p.add_argument("--train-length", type=int, default=512, help="samples of the embedded scenes")
    p.add_argument("--arch", default="gated", choices=["gated", "shared"])
    p.add_argument("--budget", default="0.5",
                   help="per-sample encoder FLOPs: a fraction of the full (T+1)-branch encoder, an absolute count "
                        "such as '2.5GF' (fvcore FLOPs: one multiply-add = 1 FLOP, i.e. GMACs), or 'none'")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gate-lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "step", "constant"])
    p.add_argument("--grad-clip", type=float, default=5.0)
    p.add_argument("--lambda-s", type=float, default=1.0, help="weight of the cost hinge")
    p.add_argument("--sparsity-warmup", type=int, default=0, help="epochs before the cost hinge starts")
    p.add_argument("--init-logit", type=float, default=1.0)
    p.add_argument("--budget-mode", choices=("max", "target"), default="target",
                   help="max: penalise only a cost above the budget (hinge); target: penalise any distance "
                        "from it, so that training ends at the budget")
    p.add_argument("--gate-group", type=int, default=1,
                   help="channels decided by one gate (e.g. 8 or 16: lean layers keep multiples of it, "
                        "which vectorised CPU kernels run faster)")
    p.add_argument("--tau", default="", help="per-task targets, e.g. seg=0.3,depth=0.5")
    p.add_argument("--balance", default="ew", help="loss-balancing strategy ('list' prints them)")
    p.add_argument("--balance-opt", default="", help="strategy options, e.g. groups=2,eta=1e-4")
    p.add_argument("--checkpoint", default=None, help="local backbone weights (.safetensors or state dict)")
    p.add_argument("--pretrained", action="store_true", help="timm hub weights (needs internet)")
    p.add_argument("--init-task-weights", default="", help="task=PATH,... single-task backbone weights")
    p.add_argument("--out", default="runs/exp")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")


def _train(args: argparse.Namespace) -> int:
    from . import balancing

    if args.balance == "list":
        for name, desc, opts in balancing.describe():
            print(f"{name:10s} {desc}" + (f"  options: {opts}" if opts else ""))
        return 0
    from .train import TrainConfig, Trainer, evaluate, init_distributed

    rank, world = init_distributed()
    h, w = _size(args.image_size)
    config = TrainConfig(
        model=args.model, tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()), data=args.data,
        data_root=args.data_root, image_size=(h, w), train_length=args.train_length, arch=args.arch,
        budget=None if args.budget.lower() == "none" else args.budget, epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        gate_lr=args.gate_lr, weight_decay=args.weight_decay, schedule=args.schedule,
        grad_clip=args.grad_clip or None, lambda_s=args.lambda_s, sparsity_warmup=args.sparsity_warmup,
        init_logit=args.init_logit, gate_group=args.gate_group, budget_mode=args.budget_mode, tau={k: float(v) for k, v in _kv(args.tau, "--tau").items()},
        balance=args.balance, balance_options={k: _value(v) for k, v in _kv(args.balance_opt, "--balance-opt").items()},
        seed=args.seed, out=args.out, checkpoint=args.checkpoint, pretrained=args.pretrained,
        init_task_weights=_kv(args.init_task_weights, "--init-task-weights"), save_every=args.save_every,
        device=args.device, progress=not args.no_progress)
    trainer = Trainer(config, resume=args.resume)
    summary = trainer.fit()
    if world > 1:
        diff = trainer.replica_difference()
        if rank == 0:
            print(f"replicas agree: largest parameter difference across {world} ranks = {diff:.3g}")
    if rank != 0:
        return 0
    summary["val"] = trainer.evaluate()
    if trainer.gated and trainer.budget_flops is not None:
        lean, report = trainer.finalize()
        summary["budget"] = report
        summary["val_lean"] = evaluate(lean, trainer.val_set, trainer.tasks, config.batch_size, trainer.device)
        print(f"budget: requested {report['requested'] / 1e9:.4f} GF, lean model (fvcore) {report['landed'] / 1e9:.4f} GF "
              f"({report['error']:+.2%}); prune with: gatedmtl prune {trainer.ckpt_path} --out {Path(config.out) / 'lean.safetensors'}")
    (Path(config.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary.get("val_lean", summary["val"]), indent=2))
    return 0


def _prune(args: argparse.Namespace) -> int:
    from .train import prune_checkpoint

    report = prune_checkpoint(args.checkpoint, args.out, budget=args.budget)
    msg = f"lean model: {report['landed'] / 1e9:.4f} GFLOPs (fvcore)"
    if "requested" in report:
        msg += f", budget {report['requested'] / 1e9:.4f} GFLOPs ({report['error']:+.2%})"
    print(f"{msg}; wrote {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_onnx, quantize_int8
    from .surgery import GatedModel
    from .train import load_network

    net, meta = load_network(args.checkpoint)
    if isinstance(net.encoder, GatedModel):
        raise SystemExit(f"error: {args.checkpoint} is a gated training checkpoint; run "
                         f"'gatedmtl prune {args.checkpoint} --out lean.safetensors' first and export that")
    shape = (args.batch, *meta["input_size"])
    report = export_onnx(net, args.out, shape)
    print(report.summary())
    if args.int8:
        import numpy as np

        from .train import TrainConfig, make_datasets

        _, val = make_datasets(TrainConfig.from_json(meta["config"]))
        batches = [np.stack([val[i]["image"].numpy() for i in range(j, min(j + 4, len(val)))])
                   for j in range(0, min(len(val), 32), 4)]
        q = quantize_int8(args.out, Path(args.out).with_suffix(".int8.onnx"), batches)
        print(q.summary())
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .train import TrainConfig, evaluate, load_network, make_datasets
    from .tasks import create_task

    net, meta = load_network(args.checkpoint)
    _, val = make_datasets(TrainConfig.from_json(meta["config"]))
    tasks = {t: create_task(t, **kw) for t, kw in meta["task_spec"].items()}
    print(json.dumps(evaluate(net, val, tasks, progress=True), indent=2))
    return 0


def _verify(args: argparse.Namespace) -> int:
    import timm

    from .verify import verify

    backbone = timm.create_model(args.model, pretrained=False, features_only=args.features_only)
    report = verify(backbone, input_size=_size(args.input) if args.input else None)
    print(json.dumps(report.as_dict(), indent=2))
    for problem in report.problems():
        print(f"MISMATCH: {problem}", file=sys.stderr)
    print("exact" if report.ok else "MISMATCH")
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["profile"]:
        from .profile import main as profile_main

        return profile_main(argv[1:])
    parser = argparse.ArgumentParser(prog="gatedmtl", description="Gated multi-task networks for the edge.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    p = sub.add_parser("prune", help="project a gated checkpoint onto its budget and prune it")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--budget", default=None, help="override the run's budget")
    p = sub.add_parser("export", help="export a lean checkpoint to ONNX (checked with ONNX Runtime)")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--int8", action="store_true", help="also write a static int8 model and its accuracy report")
    p = sub.add_parser("eval", help="metrics of a checkpoint on its validation set")
    p.add_argument("checkpoint")
    p = sub.add_parser("verify", help="check exact convert/prune parity and FLOP prediction on a timm model")
    p.add_argument("--model", required=True)
    p.add_argument("--input", default=None, help="C,H,W")
    p.add_argument("--features-only", action="store_true")
    sub.add_parser("profile", help="FLOPs, params, per-slot/per-layer table and ORT latency (see --help)")
    args = parser.parse_args(argv)
    handler = {"train": _train, "prune": _prune, "export": _export, "eval": _eval, "verify": _verify}[args.command]
    try:
        return handler(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
