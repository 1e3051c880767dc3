"""Loss-balancing strategies: step time relative to EW, ΔMTL after a short training, dynamics.

For every strategy in ``gatedmtl.balancing.available()``, on one model and one batch of the
embedded scenes (seg + depth + normals):

1. **Step time** of ``Trainer.train_step`` (forward, strategy backward, optimizer step, FAMO's
   recomputation) relative to EW: median over several timed steps after warm-up. Hard-shared
   arch: one live trainer per strategy (same seed), rounds of one step of each in alternating
   order. Gated arch (gradient-level strategies work on all ``T + 1`` encoder copies): each
   strategy's trainer alternates steps with a live EW trainer. Both the process CPU time (with one thread: the work
   done, less affected by other processes on a shared machine) and wall time are reported.
2. **ΔMTL** after the same number of training steps from the same initialisation and data order
   (hard-shared arch): ``gatedmtl.tasks.delta_mtl`` with each task's primary metric (mIoU, depth
   RMSE, normals mean angle) against EW, and the Mean Rank across strategies
   (``gatedmtl.tasks.mean_rank``, primary metrics). EW trained from another seed gives the
   noise floor of this short run.
3. **Dynamics**: per-task training loss and the norm of the shared-parameter gradient written
   by the strategy (before clipping) at every step, plotted to a PNG.

Writes ``benchmarks/results/balancing.md``, ``balancing.csv`` and ``balancing.png``. Usage::

    OMP_NUM_THREADS=1 python benchmarks/balancing.py [--steps 12] [--rounds 6] [--gated-steps 2]

The defaults finish in about 10 minutes on 2 CPU cores; ``--quick`` is a 1-minute smoke run.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from gatedmtl import balancing
from gatedmtl.tasks import delta_mtl, mean_rank
from gatedmtl.train import TrainConfig, Trainer, make_datasets

TASKS = ("seg", "depth", "normals")
RESULTS = Path(__file__).parent / "results"
GOAL = 1.05  # loss-level strategies: step time at most 5 % above EW


def _level(name: str) -> str:
    cls = type(balancing.create(name, list(TASKS)))
    return "gradient" if cls.needs_grads else "loss"


def _recomputes(name: str) -> bool:
    """The strategy re-evaluates the losses after the optimizer step (one more forward pass)."""
    cls = type(balancing.create(name, list(TASKS)))
    return cls.after_optimizer_step is not balancing.Strategy.after_optimizer_step


def _usable(names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    ok, skipped = [], {}
    for n in names:
        try:
            balancing.create(n, list(TASKS))
            ok.append(n)
        except ImportError as e:  # optional solver missing
            skipped[n] = str(e).split(";")[0]
    return ok, skipped


def _config(args: argparse.Namespace, name: str, arch: str, model: str, out: str, *, seed: int = 0,
            epochs: int = 1, steps_per_epoch: int | None = None, batch: int | None = None) -> TrainConfig:
    return TrainConfig(model=model, tasks=TASKS, arch=arch, image_size=args.size, batch_size=batch or args.batch,
                       train_length=args.train_length, val_length=args.val_length, epochs=epochs,
                       steps_per_epoch=steps_per_epoch, balance=name, seed=seed, out=out, progress=False,
                       device="cpu")


# ------------------------------------------------------------------------------------- timing
def _timed_step(trainer: Trainer, batch, name: str) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    rec = trainer.train_step(batch, epoch=0)
    c1, w1 = time.process_time(), time.perf_counter()
    if not all(math.isfinite(v) for v in rec["loss"].values()):
        raise FloatingPointError(f"{name}: non-finite loss while timing")
    return c1 - c0, w1 - w0


def _summary(cpu: dict[str, list[float]], wall: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    out = {}
    for n in cpu:
        q = statistics.quantiles(cpu[n], n=4) if len(cpu[n]) >= 2 else [cpu[n][0]] * 3
        out[n] = {"cpu": statistics.median(cpu[n]), "wall": statistics.median(wall[n]),
                  "cpu_iqr": q[2] - q[0], "n": len(cpu[n])}
    return out


def time_interleaved(args: argparse.Namespace, names: list[str], arch: str, model: str, datasets,
                     warmup: int, rounds: int) -> dict[str, dict[str, float]]:
    """One live trainer per strategy (same init, same batch); every round runs one step of each,
    in alternating order, so that load changes on a shared machine hit all strategies alike."""
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {n: Trainer(_config(args, n, arch, model, f"{tmp}/{n}"), datasets=datasets) for n in names}
        batch = next(iter(DataLoader(datasets[0], batch_size=args.batch)))
        for r in range(warmup + rounds):
            for n in names if r % 2 == 0 else names[::-1]:
                c, w = _timed_step(trainers[n], batch, n)
                if r >= warmup:
                    cpu[n].append(c)
                    wall[n].append(w)
            if r >= warmup:
                print(f"  [{arch} round {r - warmup + 1}/{rounds}] "
                      + " ".join(f"{n}={cpu[n][-1] / cpu['ew'][-1]:.2f}" for n in names), flush=True)
        del trainers
    return _summary(cpu, wall)


def time_paired(args: argparse.Namespace, names: list[str], arch: str, model: str, datasets,
                warmup: int, timed: int) -> dict[str, dict[str, float]]:
    """The gated model is too large to keep 15 trainers alive: an EW trainer stays alive and each
    other strategy's trainer, built in turn, alternates steps with it; a strategy's ratio is the
    median of its steps over the median of the EW steps taken alongside."""
    out: dict[str, dict[str, float]] = {}
    batch = next(iter(DataLoader(datasets[0], batch_size=args.batch)))
    with tempfile.TemporaryDirectory() as tmp:
        ew = Trainer(_config(args, "ew", arch, model, f"{tmp}/ew"), datasets=datasets)
        ew_all: list[float] = []
        for n in names:
            if n == "ew":
                continue
            trainer = Trainer(_config(args, n, arch, model, f"{tmp}/{n}"), datasets=datasets)
            cpu: dict[str, list[float]] = {"ew": [], n: []}
            wall: dict[str, list[float]] = {"ew": [], n: []}
            for i in range(warmup + timed):
                pair = [("ew", ew), (n, trainer)]
                for key, tr in pair if i % 2 == 0 else pair[::-1]:
                    c, w = _timed_step(tr, batch, key)
                    if i >= warmup:
                        cpu[key].append(c)
                        wall[key].append(w)
            del trainer
            summary = _summary(cpu, wall)
            ew_all += cpu["ew"]
            out[n] = summary[n] | {"ratio_cpu": summary[n]["cpu"] / summary["ew"]["cpu"],
                                   "ratio_wall": summary[n]["wall"] / summary["ew"]["wall"]}
            print(f"  [{arch}] {n:9s} cpu {summary[n]['cpu'] * 1e3:8.1f} ms  ratio to EW alongside "
                  f"{out[n]['ratio_cpu']:.2f} (cpu) {out[n]['ratio_wall']:.2f} (wall)", flush=True)
        del ew
    ew_cpu = statistics.median(ew_all)
    out["ew"] = {"cpu": ew_cpu, "wall": float("nan"), "cpu_iqr": 0.0, "n": len(ew_all),
                 "ratio_cpu": 1.0, "ratio_wall": 1.0}
    return out


def own_overhead(names: list[str], reps: int) -> dict[str, float]:
    """Median seconds of a strategy's own work per step, beyond EW's: ``backward`` (and
    ``after_optimizer_step``) on a 3-scalar problem whose backward pass costs next to nothing."""
    out: dict[str, list[float]] = {n: [] for n in names}
    theta = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.1]))
    heads = [torch.nn.Parameter(torch.tensor(0.5)) for _ in TASKS]

    def losses() -> dict[str, torch.Tensor]:
        return {t: (theta[i] + h * (i + 1) + 2.0) ** 2 for i, (t, h) in enumerate(zip(TASKS, heads))}

    strategies = {n: balancing.create(n, list(TASKS)) for n in names}
    for r in range(reps + 2):
        for n in names:
            for p in [theta, *heads]:
                p.grad = None
            ls = losses()
            c0 = time.perf_counter()
            strategies[n].backward(ls, [theta], heads, step=r, epoch=0)
            strategies[n].after_optimizer_step(lambda: {t: v.detach() for t, v in ls.items()})
            if r >= 2:
                out[n].append(time.perf_counter() - c0)
    ew = statistics.median(out["ew"])
    return {n: statistics.median(v) - ew for n, v in out.items()}


# ------------------------------------------------------------------------------------- training
def _grad_norm(params: Sequence[torch.nn.Parameter]) -> float:
    sq = [p.grad.detach().double().pow(2).sum() for p in params if p.grad is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


def train_one(args: argparse.Namespace, name: str, model: str, datasets, seed: int = 0) -> dict[str, Any]:
    """Train ``args.steps`` steps (``fit``: epochs of ``args.steps_per_epoch``), evaluate on val."""
    epochs = max(1, math.ceil(args.steps / args.steps_per_epoch))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(_config(args, name, "shared", model, tmp, seed=seed, epochs=epochs,
                                  steps_per_epoch=args.steps_per_epoch), datasets=datasets)
        shared = trainer.net.encoder_parameters()
        norms: list[float] = []
        real_backward: Callable[..., dict[str, float]] = trainer.strategy.backward

        def backward(losses, shared_params, task_params=(), **kw):
            weights = real_backward(losses, shared_params, task_params, **kw)
            norms.append(_grad_norm(shared))  # grads were zeroed before: exactly the strategy's update
            return weights

        trainer.strategy.backward = backward  # type: ignore[method-assign]
        records: list[dict[str, Any]] = []
        trainer.on_step = records.append
        start = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - start
        metrics = trainer.evaluate()
        tasks = trainer.tasks
    return {"records": records, "grad_norm": norms, "metrics": metrics, "seconds": seconds,
            "primary": {t: tasks[t].primary_metric for t in TASKS},
            "hib": {t: tasks[t].higher_is_better for t in TASKS}}


# ------------------------------------------------------------------------------------- output
def _ema(values: Sequence[float], beta: float = 0.6) -> list[float]:
    out, m = [], None
    for v in values:
        m = v if m is None else beta * m + (1 - beta) * v
        out.append(m)
    return out


def plot(runs: dict[str, dict[str, Any]], levels: dict[str, str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 2, figsize=(13, 8.5))
    axes = list(grid.flat)
    palette = plt.get_cmap("tab10").colors
    index = {"loss": 0, "gradient": 0}
    for name, run in runs.items():
        level = levels.get(name, "loss")
        color = palette[index[level] % len(palette)]
        index[level] += 1
        style = dict(color=color, lw=1.5, ls="-" if level == "loss" else "--", label=name)
        if name == "ew":  # the baseline, in black
            style |= dict(color="black", lw=2.4)
            index[level] -= 1
        steps = [r["step"] for r in run["records"]]
        for ax, t in zip(axes, TASKS):
            ax.plot(steps, _ema([r["loss"][t] for r in run["records"]]), **style)
        axes[3].plot(range(1, len(run["grad_norm"]) + 1), run["grad_norm"], **style)
    for ax, t in zip(axes, TASKS):
        ax.set_title(f"{t}: training loss (EMA 0.6)")
        ax.set_xlabel("step")
    axes[3].set_title("norm of the shared-parameter gradient (before clipping)")
    axes[3].set_xlabel("step")
    axes[3].set_yscale("log")
    handles, labels = axes[3].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.89, 0.5), fontsize=9)
    fig.suptitle(title + "   (solid: loss level, dashed: gradient level)")
    fig.tight_layout(rect=(0, 0, 0.89, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _range(values: Sequence[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}"


def _timing_summary(names: list[str], levels: dict[str, str], overhead: dict[str, float],
                    t_shared: dict[str, dict[str, float]], t_gated: dict[str, dict[str, float]]) -> str:
    """Sentences read off the timing numbers: every verdict is computed, none is fixed text."""
    ew = t_shared["ew"]["cpu"]
    ratio = {n: t_shared[n]["cpu"] / ew for n in names}
    gated = {n: t_gated[n]["ratio_cpu"] for n in t_gated}
    plain = [n for n in names if levels[n] == "loss" and not _recomputes(n) and n != "ew"]
    recompute = [n for n in names if levels[n] == "loss" and _recomputes(n)]
    grad = [n for n in names if levels[n] == "gradient"]
    iqr = statistics.median(t_shared[n]["cpu_iqr"] / ew for n in names)
    out = ["**Reading.**"]
    if plain:
        worst = max(plain, key=lambda n: overhead[n])
        estimate = 1 + overhead[worst] / ew
        out.append(
            f"Loss-level strategies ({', '.join(plain)}) add at most {overhead[worst] * 1e3:.2f} ms of their own work "
            f"per step ({worst}), {overhead[worst] / ew:.3%} of EW's {ew * 1e3:.0f} ms step: 1 + own/EW = "
            f"{estimate:.4f}, {'within' if estimate <= GOAL else 'above'} the {GOAL} goal.")
        spread = max(abs(ratio[n] - 1) for n in plain)
        measured = f"Their measured shared-arch ratios are {_range([ratio[n] for n in plain])}"
        if gated and all(n in gated for n in plain):
            measured += f" ({_range([gated[n] for n in plain])} gated)"
        relation = "within" if spread <= iqr else "beyond"
        out.append(f"{measured}; the largest distance from 1 ({spread:.2f}) is {relation} the median "
                   f"interquartile range of the step times ({iqr:.2f} of EW's step).")
    for n in recompute:
        verdict = "within" if ratio[n] <= GOAL else "above"
        out.append(
            f"{n} re-evaluates the losses after every optimizer step (one more forward pass): "
            f"{ratio[n]:.2f}x shared" + (f", {gated[n]:.2f}x gated" if n in gated else "")
            + f", {verdict} the {GOAL} goal on the shared arch; its own bookkeeping is {overhead[n] * 1e3:.2f} ms.")
    if grad:
        out.append(
            f"Gradient-level strategies take {_range([ratio[n] for n in grad])}x EW on the shared arch"
            + (f" and {_range([gated[n] for n in grad if n in gated])}x on the gated arch, whose Jacobian spans all "
               "T + 1 encoder copies" if gated else "")
            + f"; slowest on the shared arch: {max(grad, key=lambda n: ratio[n])}. Largest own work per step "
            "(own_ms): " + ", ".join(f"{n} {overhead[n] * 1e3:.1f} ms"
                                    for n in sorted(grad, key=lambda n: -overhead[n])[:2]) + ".")
    return " ".join(out)


def _noise_summary(noise_dmtl: float, dmtl: dict[str, float], noise_seed: int) -> str:
    """The noise floor of the ΔMTL table and which strategies lie within it (computed)."""
    others = [n for n in dmtl if n != "ew"]
    inside = [n for n in others if abs(dmtl[n]) <= abs(noise_dmtl)]
    outside = [n for n in others if abs(dmtl[n]) > abs(noise_dmtl)]
    text = (f"**Noise floor:** EW trained from seed {noise_seed} (other initialisation and data order) lands at "
            f"ΔMTL {noise_dmtl:+.2f} % against EW from seed 0. {len(inside)} of {len(others)} strategies differ from "
            f"EW by at most that much")
    text += f" ({', '.join(inside)})" if inside else ""
    if outside:
        text += f"; {', '.join(f'{n} ({dmtl[n]:+.2f} %)' for n in outside)} by more"
    return text + ". One seed per strategy: this table gives no spread per strategy."


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", help="timm features_only backbone (shared arch)")
    p.add_argument("--gated-model", default="resnet18", help="backbone of the gated timing run")
    p.add_argument("--strategies", default="", help="comma-separated subset (default: all available)")
    p.add_argument("--size", default="32x48", help="image size HxW of the embedded scenes")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6, help="timed rounds, one step of every strategy each (shared arch)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds (shared arch)")
    p.add_argument("--gated-steps", type=int, default=2, help="timed steps per strategy, gated arch (0: skip)")
    p.add_argument("--steps", type=int, default=12, help="training steps per strategy for ΔMTL (0: skip)")
    p.add_argument("--steps-per-epoch", type=int, default=4, help="DWA and epoch hooks need several epochs")
    p.add_argument("--val-length", type=int, default=32)
    p.add_argument("--noise-seed", type=int, default=1, help="EW from this seed gives the noise floor (-1: skip)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 1 gated step, 4 training steps")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.quick:  # caps, so that --quick --steps 0 still skips the training
        args.rounds, args.warmup = min(args.rounds, 2), min(args.warmup, 1)
        args.gated_steps, args.steps = min(args.gated_steps, 1), min(args.steps, 4)
        args.steps_per_epoch, args.val_length = 2, 8
    args.size = tuple(int(v) for v in args.size.lower().split("x"))
    args.train_length = args.batch * max(args.steps_per_epoch, args.steps, 1)  # a fresh scene per sample
    torch.manual_seed(0)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    wanted = args.strategies.split(",") if args.strategies else balancing.available()
    if "ew" not in wanted:
        wanted = ["ew", *wanted]
    names, skipped = _usable(wanted)
    levels = {n: _level(n) for n in names}
    threads = torch.get_num_threads()
    print(f"strategies: {names}; skipped: {skipped or 'none'}; torch threads: {threads}", flush=True)

    datasets = make_datasets(_config(args, "ew", "shared", args.model, "unused"))

    overhead = own_overhead(names, 10 if args.quick else 100)
    print("own work per step beyond EW (3-scalar problem): "
          + " ".join(f"{n}={v * 1e3:.2f}ms" for n, v in overhead.items()), flush=True)
    print(f"timing, shared arch ({args.model}) ...", flush=True)
    phases: dict[str, float] = {}
    mark = time.perf_counter()
    t_shared = time_interleaved(args, names, "shared", args.model, datasets, args.warmup, args.rounds)
    phases["shared timing"], mark = time.perf_counter() - mark, time.perf_counter()
    t_gated: dict[str, dict[str, float]] = {}
    if args.gated_steps > 0:
        print(f"timing, gated arch ({args.gated_model}) ...", flush=True)
        t_gated = time_paired(args, names, "gated", args.gated_model, datasets, 1, args.gated_steps)
        phases["gated timing"], mark = time.perf_counter() - mark, time.perf_counter()

    runs: dict[str, dict[str, Any]] = {}
    noise = None
    if args.steps > 0:
        for name in names:
            runs[name] = train_one(args, name, args.model, datasets)
            last = runs[name]["records"][-1]["loss"]
            print(f"  trained {name:9s} {runs[name]['seconds']:6.1f} s  last losses "
                  + " ".join(f"{t}={v:.3f}" for t, v in last.items()), flush=True)
        if args.noise_seed >= 0:
            noise = train_one(args, "ew", args.model, datasets, seed=args.noise_seed)
            print(f"  trained ew (seed {args.noise_seed}) {noise['seconds']:6.1f} s", flush=True)
        phases["training"] = time.perf_counter() - mark

    # ---------------------------------------------------------------- table
    dmtl: dict[str, float] = {}
    ranks: dict[str, float] = {}
    primary = hib = None
    if runs:
        primary, hib = runs["ew"]["primary"], runs["ew"]["hib"]
        base = runs["ew"]["metrics"]
        dmtl = {n: delta_mtl(r["metrics"], base, hib, primary) for n, r in runs.items()}
        ranks = mean_rank({n: r["metrics"] for n, r in runs.items()}, hib, primary)
    noise_dmtl = delta_mtl(noise["metrics"], runs["ew"]["metrics"], hib, primary) if noise else None

    rows = []
    ew_s, ew_g = t_shared["ew"], t_gated.get("ew")
    for n in names:
        s = t_shared[n]
        row: dict[str, Any] = {
            "strategy": n, "level": levels[n],
            "shared_cpu_ms": _fmt(s["cpu"] * 1e3, ".1f"), "shared_wall_ms": _fmt(s["wall"] * 1e3, ".1f"),
            "shared_ratio_cpu": _fmt(s["cpu"] / ew_s["cpu"], ".3f"),
            "shared_ratio_wall": _fmt(s["wall"] / ew_s["wall"], ".3f"),
            "shared_iqr_rel": _fmt(s["cpu_iqr"] / ew_s["cpu"], ".3f"),
            "own_ms": _fmt(overhead[n] * 1e3, ".2f"),
            "extra_forward": "yes" if _recomputes(n) else "",
        }
        if levels[n] == "loss":  # the strategy's own work decides; measured ratios where it adds a forward
            estimate = s["cpu"] / ew_s["cpu"] if _recomputes(n) else 1 + overhead[n] / ew_s["cpu"]
            row["goal_1.05"] = "ok" if estimate <= GOAL else "MISSED"
        if ew_g:
            g = t_gated[n]
            row |= {"gated_cpu_ms": _fmt(g["cpu"] * 1e3, ".1f"), "gated_ratio_cpu": _fmt(g["ratio_cpu"], ".3f"),
                    "gated_ratio_wall": _fmt(g["ratio_wall"], ".3f")}
        if n in runs:
            m = runs[n]["metrics"]
            row |= {"delta_mtl_pct": _fmt(dmtl[n], "+.2f"), "mean_rank": _fmt(ranks[n], ".2f")}
            for t in TASKS:
                row[f"{t}_{primary[t]}"] = _fmt(m[t][primary[t]], ".4g")
            for t in TASKS:
                row[f"{t}_final_loss"] = _fmt(runs[n]["records"][-1]["loss"][t], ".4f")
            row["final_grad_norm"] = _fmt(runs[n]["grad_norm"][-1], ".3g")
        rows.append(row)

    cols = ["strategy", "level", "shared_cpu_ms", "shared_wall_ms", "shared_ratio_cpu", "shared_ratio_wall",
            "shared_iqr_rel", "own_ms", "extra_forward", "goal_1.05"]
    if t_gated:
        cols += ["gated_cpu_ms", "gated_ratio_cpu", "gated_ratio_wall"]
    if runs:
        cols += ["delta_mtl_pct", "mean_rank"] + [f"{t}_{primary[t]}" for t in TASKS] + \
                [f"{t}_final_loss" for t in TASKS] + ["final_grad_norm"]
    with open(out / "balancing.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    if runs:
        plot(runs, levels, out / "balancing.png",
             f"{args.model}, hard sharing, {args.size[0]}x{args.size[1]}, batch {args.batch}, {args.steps} steps")

    total = time.perf_counter() - started
    env = (f"torch {torch.__version__}, {threads} torch thread(s) (OMP_NUM_THREADS="
           f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), {os.cpu_count()} CPUs, {platform.machine()}, "
           f"Python {platform.python_version()}; whole script {total / 60:.1f} min wall, "
           f"{time.process_time() / 60:.1f} min CPU ("
           + ", ".join(f"{k} {v / 60:.1f}" for k, v in phases.items()) + " min wall)")
    cmd = "python benchmarks/balancing.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Loss-balancing strategies: step time and ΔMTL",
        "",
        f"`OMP_NUM_THREADS=1 {cmd.strip()}` — {env}. Tasks {', '.join(TASKS)} on the embedded scenes, "
        f"{args.size[0]}x{args.size[1]} images, batch {args.batch}, AdamW lr 1e-3, cosine schedule, grad clip 5 "
        "(the `TrainConfig` defaults).",
        "",
        "## Step time relative to EW",
        "",
        f"One `Trainer.train_step` (forward, strategy backward, optimizer step, FAMO's re-evaluation of the "
        f"losses) on the same batch, every strategy starting from the same initialisation. Shared arch: "
        f"`{args.model}` features_only, one live trainer per strategy, {args.warmup} warm-up round(s) then "
        f"{args.rounds} timed rounds of one step of every strategy (alternating order, so that load changes on "
        "the shared machine hit every strategy alike); median per strategy. `ratio_cpu` uses the process CPU "
        "time (one thread: the work done, less exposed to other processes on the machine than wall time); "
        "`iqr_rel` is the interquartile range of the CPU times relative to EW's median, a noise indicator. "
        "`own_ms`: the strategy's own work per step beyond EW's (weights, solvers, aggregation; "
        "`backward` + `after_optimizer_step` on a 3-scalar problem whose backward pass is free, median of 100), "
        "a noise-free complement to the ratios. `extra_forward`: the strategy re-evaluates the losses after the "
        "optimizer step (FAMO's update needs the new losses of the same batch), i.e. one more forward pass per "
        f"step. Goal for loss-level strategies: step time <= {GOAL} x EW's; `goal_1.05` judges it by "
        "1 + own_ms / EW's step (the strategy's own work is measured without noise, the step ratio with the "
        "noise of the iqr column), and by ratio_cpu for a strategy with an extra forward pass."
        + (f" Gated arch: `{args.gated_model}` converted for 3 tasks (4 encoder copies), sparsity hinge at "
           "budget 0.5; gradient-level strategies take per-task gradients of the whole encoder (all slots and "
           "gates). Too large to keep every trainer alive: each strategy's trainer alternates steps with a live "
           f"EW trainer (1 warm-up + {args.gated_steps} timed steps each) and its ratio is against the EW steps "
           "taken alongside."
           if t_gated else ""),
        "",
    ]
    tcols = ["strategy", "level", "shared_cpu_ms", "shared_ratio_cpu", "shared_ratio_wall", "shared_iqr_rel", "own_ms",
             "extra_forward", "goal_1.05"]
    if t_gated:
        tcols += ["gated_cpu_ms", "gated_ratio_cpu", "gated_ratio_wall"]
    lines += ["| " + " | ".join(tcols) + " |", "|" + "---|" * len(tcols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in tcols) + " |" for r in rows]
    lines += ["", _timing_summary(names, levels, overhead, t_shared, t_gated)]
    if runs:
        mcols = ["strategy", "level", "delta_mtl_pct", "mean_rank"] + [f"{t}_{primary[t]}" for t in TASKS] + \
                [f"{t}_final_loss" for t in TASKS] + ["final_grad_norm"]
        epochs = max(1, math.ceil(args.steps / args.steps_per_epoch))
        lines += [
            "",
            "## ΔMTL after a short training",
            "",
            f"Each strategy trains `{args.model}` (hard sharing) for {epochs * args.steps_per_epoch} steps "
            f"({epochs} epochs of {args.steps_per_epoch}) from the same initialisation, on the same "
            f"{args.train_length} training scenes in the same order, then is evaluated on {args.val_length} "
            "validation scenes. ΔMTL (%, positive = better): `gatedmtl.tasks.delta_mtl` against EW with the "
            f"primary metric of each task ({', '.join(f'{t}: {m}' for t, m in primary.items())}); Mean Rank: "
            "`gatedmtl.tasks.mean_rank` over the same three metrics (lower = better). Final losses: training "
            "loss of the last step; final_grad_norm: norm of the shared-parameter gradient the strategy wrote "
            "at the last step (before clipping).",
            "",
            (_noise_summary(noise_dmtl, dmtl, args.noise_seed) if noise_dmtl is not None else
             "Single seed per strategy, no noise-floor run (--noise-seed -1)."),
            "",
            "| " + " | ".join(mcols) + " |", "|" + "---|" * len(mcols),
        ]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in mcols) + " |" for r in rows]
        lines += ["", "Training dynamics (per-task loss, shared gradient norm per step): ![dynamics](balancing.png)"]
    if skipped:
        lines += ["", "Skipped (optional solver missing): " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    (out / "balancing.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'balancing.md'}, .csv{', .png' if runs else ''} in {total / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
