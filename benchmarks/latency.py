"""Lean-graph latency vs FLOPs: ONNX Runtime CPU latency of lean encoders next to hard sharing and T separate networks.

For each backbone (a timm ``features_only`` encoder, as ``gatedmtl.train`` builds it) and T tasks,
the script exports and times with ONNX Runtime (CPU, sequential execution):

* ``backbone (hard sharing)``: the plain backbone; T tasks on one shared backbone cost exactly this;
* ``T separate``: T plain backbones with their own weights in ONE ONNX graph, run one after
  the other (what a user deploys without sharing);
* ``random <d>``: the lean model of a gated model whose gates are random (fixed seed) with a
  fraction ``d`` open, plus all ``closed`` and all ``open``;
* ``trained``: the lean model of a short training run at budget 0.5 on the embedded scenes
  (``gatedmtl.train.Trainer``, small images, projected onto the budget by ``finalize()``); its gate
  logits and weights are loaded into a gated model converted at the benchmark's input size,
  which is pruned and exported (the gates do not depend on the input size).

Latency measures (the machine this runs on is shared, so wall-clock medians are noisy):

* ``kernel ms``: ONNX Runtime's profiler, per node the fastest of ``--prof-runs`` runs, summed
  over the nodes (:func:`gatedmtl.profile.onnx_kernel_time`). It barely moves with other
  processes' load; it leaves out the executor's time between kernels. **Ratios and targets
  use it.**
* ``CPU ms``: median thread CPU time of ``session.run`` at 1 thread (it includes the executor);
* ``wall ms``: median wall clock; interleaved timing (rounds visit every model in a shuffled
  order and run it 5 times in a row, keeping the last 4) so that load hits all models alike.
* a ``--multi-threads`` column (default 4 intra-op threads): kernel ms and wall ms.

Ratios are normalised to the plain backbone: ``FLOP ratio`` = fvcore FLOPs / the backbone's,
``latency ratio`` = kernel ms / the backbone's, ``per FLOP`` = latency ratio / FLOP ratio.
Targets: per FLOP <= 1.15 (1.3 for mobilenetv3) at densities 0.25/0.5/0.75 and trained; every
lean model below all-open faster than T separate networks; all closed <= 1.05x the backbone;
all open <= 1.05x T separate networks.

With ``--mix hard`` the gated models use the hard (one-hot, straight-through) shared mix, random and
trained alike: the lean shared slot then takes one channel gather instead of a Mul/Add chain.
``--mix soft,hard`` times both in one run (same weights and gates, only the mix differs).
``--mix anneal`` is the training default (``TrainConfig.mix``): the trained row is trained with the
annealed mix, which ends as the hard mix, so its random rows are the hard mix's.

Writes ``latency[_group<N>][_<level>][_hardmix|_annealmix|_mixes].md/.csv/.png`` under ``--out`` (``latency.*``
for the default ``--gate-group 16``, soft mix). Usage::

    python benchmarks/latency.py [--models resnet18,hrnet_w18_small_v2,mobilenetv3_large_100]
        [--gate-group 16] [--mix soft|hard|anneal|soft,hard] [--size 224x224] [--runs 20] [--no-train]
        [--train-steps 25]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch
from torch import nn

import gatedmtl
from gatedmtl.export import export_onnx
from gatedmtl.network import build_backbone
from gatedmtl.profile import KernelTime, onnx_kernel_time, ort_session
from gatedmtl.train import TRAIN_MIXES
from gatedmtl.verify import perturb_slots, set_gates

DEFAULT_GROUP = 16
TARGET_PER_FLOP = {"mobilenetv3_large_100": 1.3}
TARGET_PER_FLOP_DEFAULT = 1.15
TARGET_CLOSED = 1.05  # x the plain backbone
TARGET_OPEN = 1.05  # x T separate networks
PER_FLOP_DENSITIES = ("0.25", "0.5", "0.75", "trained")

BACKBONE, SEPARATE = "backbone (hard sharing)", "T separate"

OP_GROUPS = {"Conv": "conv", "FusedConv": "conv", "NchwcConv": "conv", "Gemm": "conv", "MatMul": "conv",
             "ReorderInput": "NCHWc reorder", "ReorderOutput": "NCHWc reorder",
             "Concat": "concat / split", "Split": "concat / split", "Slice": "concat / split",
             "Gather": "channel gather", "GatherElements": "channel gather",
             "Mul": "mul / add", "Add": "mul / add", "Sum": "mul / add", "Sub": "mul / add", "Div": "mul / add",
             "Relu": "activation", "Sigmoid": "activation", "HardSigmoid": "activation", "HardSwish": "activation",
             "Clip": "activation", "Tanh": "activation", "Silu": "activation", "Gelu": "activation"}
GROUP_NAMES = ("conv", "NCHWc reorder", "concat / split", "channel gather", "mul / add", "activation", "other")


def target_per_flop(model: str) -> float:
    return TARGET_PER_FLOP.get(model, TARGET_PER_FLOP_DEFAULT)


@dataclass
class Row:
    model: str
    input: str
    kind: str  # BACKBONE, SEPARATE, "random", "trained"
    mix: str  # "-" (plain), "soft", "hard", "anneal" (trained annealed, the hard mix's graph): the shared mix
    density: str  # "-", "closed", "0.25", ..., "open", "trained"
    open_fraction: float  # fraction of task channels open (random: the drawn gates; trained: after projection)
    slots: str
    graph: str  # how the lean model runs its slots (streams / folded + reason / task networks / plain)
    flops: int
    flop_ratio: float
    kernel_ms: float
    cpu_ms: float
    wall_ms: float
    wall_p90_ms: float
    latency_ratio: float  # kernel ms / backbone kernel ms
    per_flop: float
    cpu_per_flop: float
    wall_per_flop: float
    vs_separate: float  # kernel ms / T separate kernel ms
    kernel4_ms: float
    wall4_ms: float
    latency4_ratio: float
    export_s: float
    parity: float
    nodes: int
    ops_ms: dict[str, float] = field(default_factory=dict)  # 1-thread kernel ms per op group


class _Plain(nn.Module):
    """A plain encoder with a task-named output (what the exporter wants)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor):
        return {"out": self.backbone(x)}


class _Separate(nn.Module):
    """T plain encoders with their own weights, one per task, run one after the other."""

    def __init__(self, backbones: list[nn.Module], tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.tasks = tasks
        self.nets = nn.ModuleList(backbones)

    def forward(self, x: torch.Tensor):
        return {t: net(x) for t, net in zip(self.tasks, self.nets)}


def _time(paths: dict[str, Path], shape: tuple[int, ...], runs: int, warmup: int, seed: int, threads: int,
          level: str, block: int = 5) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per file ``runs`` timings (ms): wall clock and thread CPU time of ``session.run``.

    Rounds visit the files in a shuffled order; each visit runs one session ``block`` times in a
    row and keeps the last ``block - 1`` (the first refills the caches that the other models
    evicted), so models are timed warm and load from other processes hits all of them alike.
    """
    sessions = {k: ort_session(p, threads, level=level) for k, p in paths.items()}
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, {"image": x})
    wall: dict[str, list[float]] = {k: [] for k in sessions}
    cpu: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    rng = random.Random(seed)
    while min(len(v) for v in wall.values()) < runs:
        rng.shuffle(order)
        for k in order:
            for i in range(block):
                c0, t0 = time.thread_time(), time.perf_counter()
                sessions[k].run(None, {"image": x})
                t1, c1 = time.perf_counter(), time.thread_time()
                if i:
                    wall[k].append(t1 - t0)
                    cpu[k].append(c1 - c0)
    return {k: (np.asarray(wall[k][:runs]) * 1e3, np.asarray(cpu[k][:runs]) * 1e3) for k in sessions}


def _kernel_times(files: dict[str, Path], shape: tuple[int, ...], runs: int, threads: int, level: str, rounds: int,
                  seed: int) -> dict[str, KernelTime]:
    """:func:`onnx_kernel_time` of every file; with ``rounds > 1`` interleaved.

    Each round profiles every file (shuffled order) for ``runs // rounds`` runs; per file and op
    type the fastest round is kept, so a burst of load from other processes that hits one file's
    profile is not read as that file being slower.
    """
    if rounds <= 1:
        return {k: onnx_kernel_time(p, shape, threads=threads, runs=runs, level=level) for k, p in files.items()}
    best: dict[str, KernelTime] = {}
    order = list(files)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            kt = onnx_kernel_time(files[k], shape, threads=threads, runs=max(1, runs // rounds), level=level)
            if k not in best:
                best[k] = kt
                continue
            by_op = {op: min(ms, best[k].by_op.get(op, ms)) for op, ms in kt.by_op.items()}
            best[k] = KernelTime(total_ms=sum(by_op.values()), by_op=by_op, nodes_by_op=kt.nodes_by_op,
                                 runs=best[k].runs + kt.runs, threads=threads)
    return best


def _groups(kernel: KernelTime) -> dict[str, float]:
    totals = dict.fromkeys(GROUP_NAMES, 0.0)
    for op, ms in kernel.by_op.items():
        totals[OP_GROUPS.get(op, "other")] += ms
    return totals


def _cpu_name() -> str:
    """The CPU's model name and widest SIMD extension (ONNX Runtime's blocked convolutions depend on both)."""
    name, flags = platform.processor() or "CPU model unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    simd = next((f for f in ("avx512f", "avx2", "neon", "asimd") if f in flags), None)
    return f"{name} ({simd}), {platform.machine()}" if simd else f"{name}, {platform.machine()}"


def _open_fraction(model: gatedmtl.GatedModel) -> float:
    masks = [g.open_mask() for g in model.gates()]
    return float(sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks))


def _graph(lean: gatedmtl.LeanModel) -> str:
    if len(lean.slots) == 1:
        return "plain (one slot)"
    if lean.streams:
        return "per-slot streams"
    if lean.task_networks is not None:
        return "task networks (folded: " + (lean.folded_reason or "") + ")"
    return "folded on the batch axis: " + (lean.folded_reason or "streams off")


def _gate_mix(mix: str) -> str:
    """The gates' mix of a benchmark mix: an annealed run ends with the hard mix."""
    return "hard" if mix == "anneal" else mix


def train_gates(name: str, tasks: tuple[str, ...], group: int, steps: int, epochs: int, seed: int, tmp: Path,
                log, mix: str = "soft", ties: dict[str, bool] | None = None) -> tuple[dict[str, torch.Tensor], tuple[str, ...], dict]:
    """A short training run at budget 0.5 (embedded scenes, 64x96); the projected encoder's state dict."""
    from gatedmtl.train import TrainConfig, Trainer

    config = TrainConfig(model=name, tasks=("seg", "depth", "normals")[: len(tasks)], image_size=(64, 96),
                         train_length=steps * 8, val_length=8, budget="0.5", epochs=epochs, steps_per_epoch=steps,
                         batch_size=8, lr=2e-3, gate_lr=0.05, gate_group=group, mix=mix, seed=seed,
                         **(ties or {}),
                         out=str(tmp / f"train-{name}-{mix}"), device="cpu", progress=False)
    t0 = time.perf_counter()
    trainer = Trainer(config)
    trainer.fit()
    _, report = trainer.finalize()  # projects the encoder's gates onto the budget, then prunes
    report["train_s"] = time.perf_counter() - t0
    report["steps"] = epochs * trainer.steps_per_epoch
    enc = trainer.net.encoder
    report["open_fraction"] = _open_fraction(enc)
    log(f"  {name}: trained {report['steps']} steps in {report['train_s']:.0f} s; before projection "
        f"{report['before_projection'] / report['requested']:.2f}x the budget, projection changed "
        f"{report['changed_gates']} of {report['gates']} gates")
    return {k: v.detach().clone() for k, v in enc.state_dict().items()}, tuple(enc.tasks), report


def bench_model(name: str, size: tuple[int, int], tasks: tuple[str, ...], densities: list[str], args, tmp: Path,
                log) -> tuple[list[Row], dict | None]:
    shape = (1, 3, *size)
    group = args.gate_group
    backbone = build_backbone(name).eval()
    files: dict[str, Path] = {}
    info: dict[str, dict] = {}
    t0 = time.perf_counter()
    files[BACKBONE] = export_onnx(_Plain(backbone), tmp / f"{name}-plain.onnx", shape, check=False).path
    export_s = time.perf_counter() - t0  # before the FLOP count, which traces the model too
    info[BACKBONE] = dict(kind=BACKBONE, density="-", mix="-", open_fraction=float("nan"), slots="-", graph="plain",
                          flops=gatedmtl.count_flops(backbone, shape), export_s=export_s, parity=0.0)
    copies = []
    for i in range(len(tasks)):  # own (different) weights: identical ones could be merged by the exporter
        torch.manual_seed(args.seed + 100 + i)
        copies.append(build_backbone(name).eval())
    t0 = time.perf_counter()
    files[SEPARATE] = export_onnx(_Separate(copies, tasks), tmp / f"{name}-separate.onnx", shape, check=False).path
    info[SEPARATE] = dict(kind=SEPARATE, density="-", mix="-", open_fraction=float("nan"), slots="-",
                          graph=f"{len(tasks)} plain backbones in one graph",
                          flops=len(tasks) * info[BACKBONE]["flops"], export_s=time.perf_counter() - t0, parity=0.0)

    variants: list[tuple[str, str, str, gatedmtl.GatedModel]] = []
    train_report = None
    for mix in args.mixes:  # the same weights (perturbation seed) and gates (set_gates seed) for every mix
        model = gatedmtl.convert(backbone, tasks, input_size=shape[1:], gate_group=group, mix=_gate_mix(mix),
                                 **args.ties).eval()
        perturb_slots(model, generator=torch.Generator().manual_seed(args.seed))
        variants += [("random", d, mix, model) for d in densities]
    for mix in [] if args.no_train else args.mixes:
        state, trained_tasks, report = train_gates(name, tasks, group, args.train_steps, args.train_epochs,
                                                   args.seed, tmp, log, mix, args.ties)
        train_report = (train_report or {}) | {mix: report}
        fresh = gatedmtl.convert(build_backbone(name), trained_tasks, input_size=shape[1:], gate_group=group,
                                 mix=_gate_mix(mix), **args.ties).eval()
        trained_gates = set(k for k in state if k.endswith((".gate.alpha", ".gate.beta")))
        fresh_gates = set(k for k in fresh.state_dict() if k.endswith((".gate.alpha", ".gate.beta")))
        if trained_gates != fresh_gates:
            raise RuntimeError(f"{name}: the gates converted at {size} differ from the trained ones at 64x96")
        fresh.load_state_dict(state)  # weights and gate logits (alpha, beta) per gate name
        variants.append(("trained", "trained", mix, fresh))
    for kind, d, mix, gated in variants:
        if kind == "random":
            set_gates(gated, d if d in ("open", "closed") else float(d), torch.Generator().manual_seed(args.seed + 1))
        key = f"{kind} {d} {mix}"
        lean = gatedmtl.prune(gated).eval()
        t0 = time.perf_counter()
        report = export_onnx(lean, tmp / f"{name}-{kind}-{d}-{mix}.onnx", shape)  # checked in ORT (1e-4)
        export_s = time.perf_counter() - t0  # export and ORT check, not the FLOP count below
        files[key] = report.path
        info[key] = dict(kind=kind, density=d, mix=mix, open_fraction=_open_fraction(gated),
                         slots="+".join((["shared", *gated.tasks])[s] for s in lean.slots), graph=_graph(lean),
                         flops=gatedmtl.count_flops(lean, shape), export_s=export_s,
                         parity=max(report.max_rel_error.values()))
        log(f"  {name} {key}: {info[key]['flops'] / 1e9:.3f} GFLOPs, {info[key]['graph']}, export "
            f"{info[key]['export_s']:.0f} s, ORT parity {info[key]['parity']:.1e}")

    times = _time(files, shape, args.runs, args.warmup, args.seed, 1, args.opt_level)
    kernel = _kernel_times(files, shape, args.prof_runs, 1, args.opt_level, args.prof_rounds, args.seed)
    if args.multi_threads:
        times4 = _time(files, shape, args.runs4, args.warmup, args.seed, args.multi_threads, args.opt_level)
        kernel4 = _kernel_times(files, shape, args.prof_runs, args.multi_threads, args.opt_level, args.prof_rounds,
                                args.seed)
    base, sep = kernel[BACKBONE].total_ms, kernel[SEPARATE].total_ms
    base_cpu, base_wall = float(np.median(times[BACKBONE][1])), float(np.median(times[BACKBONE][0]))
    rows = []
    for k in files:
        i = info[k]
        wall, cpu = times[k]
        fr = i["flops"] / info[BACKBONE]["flops"]
        lr = kernel[k].total_ms / base
        k4 = kernel4[k].total_ms if args.multi_threads else float("nan")
        w4 = float(np.median(times4[k][0])) if args.multi_threads else float("nan")
        l4 = k4 / kernel4[BACKBONE].total_ms if args.multi_threads else float("nan")
        rows.append(Row(model=name, input="x".join(map(str, shape)), kind=i["kind"], mix=i["mix"], density=i["density"],
                        open_fraction=round(i["open_fraction"], 4), slots=i["slots"], graph=i["graph"],
                        flops=i["flops"], flop_ratio=round(fr, 4), kernel_ms=round(kernel[k].total_ms, 3),
                        cpu_ms=round(float(np.median(cpu)), 3), wall_ms=round(float(np.median(wall)), 3),
                        wall_p90_ms=round(float(np.percentile(wall, 90)), 3), latency_ratio=round(lr, 4),
                        per_flop=round(lr / fr, 4), cpu_per_flop=round(float(np.median(cpu)) / base_cpu / fr, 4),
                        wall_per_flop=round(float(np.median(wall)) / base_wall / fr, 4),
                        vs_separate=round(kernel[k].total_ms / sep, 4), kernel4_ms=round(k4, 3), wall4_ms=round(w4, 3),
                        latency4_ratio=round(l4, 4), export_s=round(i["export_s"], 1), parity=i["parity"],
                        nodes=sum(kernel[k].nodes_by_op.values()),
                        ops_ms={g: round(v, 3) for g, v in _groups(kernel[k]).items()}))
    return rows, train_report


def target(r: Row) -> str:
    """The row's targets and whether it meets them (``met`` / ``MISSED``), from its numbers."""
    if r.kind in (BACKBONE, SEPARATE):
        return "reference"
    checks = []
    if r.density == "closed":
        checks.append((r.latency_ratio <= TARGET_CLOSED, f"<= {TARGET_CLOSED} x backbone"))
    if r.density == "open":
        checks.append((r.vs_separate <= TARGET_OPEN, f"<= {TARGET_OPEN} x T separate"))
    else:
        checks.append((r.vs_separate < 1, "faster than T separate"))
    if r.density in PER_FLOP_DENSITIES:
        checks.append((r.per_flop <= target_per_flop(r.model), f"per FLOP <= {target_per_flop(r.model)}"))
    return "; ".join(f"{'met' if ok else 'MISSED'} ({what})" for ok, what in checks)


def label(r: Row) -> str:
    if r.kind in (BACKBONE, SEPARATE):
        return r.kind
    hard = {"hard": ", hard mix", "anneal": ", annealed mix"}.get(r.mix, "")
    return f"trained (budget 0.5{hard})" if r.kind == "trained" else f"random {r.density}{hard}"


def _fmt(v: float, spec: str = ".2f") -> str:
    return "-" if v != v else format(v, spec)  # NaN -> "-"


def write_results(rows: list[Row], out: Path, meta: dict[str, str], trained: dict[str, dict], threads4: int,
                  stem: str = "latency") -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        fields = [k for k in asdict(rows[0]) if k != "ops_ms"] + ["target"] + [f"{g} ms" for g in GROUP_NAMES]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            row = {k: v for k, v in asdict(r).items() if k != "ops_ms"}
            w.writerow(row | {"target": target(r)} | {f"{g} ms": r.ops_ms[g] for g in GROUP_NAMES})

    models = list(dict.fromkeys(r.model for r in rows))
    lines = ["# Lean-graph latency vs FLOPs (ONNX Runtime, CPU)", "",
             "Encoders only (timm `features_only` backbones, as `gatedmtl.train` builds them). `backbone (hard "
             "sharing)`: one plain backbone, which is also what T tasks on one shared backbone cost; `T separate`: "
             "T plain backbones with their own weights in one ONNX graph, run one after the other; `random d`: "
             "random gates with a fraction d open (fixed seed); `trained`: gates from a short training run at "
             "budget 0.5 (below), loaded into a model converted at this input size.", "",
             "**Latency measure.** This machine is shared with other heavy jobs, so wall-clock medians are "
             "noisy. `kernel ms` is ONNX Runtime's profiler: per node the fastest of the profiled runs, summed "
             "over the nodes, which barely moves with load; it leaves out the executor's time between kernels. "
             "`CPU ms` is the median thread CPU time of `session.run` at 1 thread (executor included), `wall ms` "
             "the median wall clock. The latency ratio, per-FLOP ratio, `vs T separate` and the target column "
             "use `kernel ms`; per FLOP by CPU time and by wall clock are given next to it.", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "Targets: per FLOP <= " + ", ".join(f"{target_per_flop(m)} ({m})" for m in models)
              + f" at densities 0.25, 0.5, 0.75 and trained; every lean model below all-open faster than T separate; "
              f"all closed <= {TARGET_CLOSED} x backbone; all open <= {TARGET_OPEN} x T separate.", ""]
    lines += ["| model | row | open | GFLOPs | FLOP ratio | kernel ms | CPU ms | wall ms (p90) | latency ratio | "
              "per FLOP | per FLOP (CPU) | per FLOP (wall) | vs T separate | "
              f"kernel ms, {threads4} thr | wall ms, {threads4} thr | ratio, {threads4} thr | target |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        openf = "-" if r.open_fraction != r.open_fraction else f"{r.open_fraction:.2f}"
        lines.append(f"| {r.model} | {label(r)} | {openf} | {r.flops / 1e9:.3f} | {r.flop_ratio:.2f} | {r.kernel_ms:.2f} | "
                     f"{r.cpu_ms:.2f} | {r.wall_ms:.2f} ({r.wall_p90_ms:.2f}) | {r.latency_ratio:.2f} | "
                     f"{r.per_flop:.2f} | {r.cpu_per_flop:.2f} | {r.wall_per_flop:.2f} | {r.vs_separate:.2f} | "
                     f"{_fmt(r.kernel4_ms)} | {_fmt(r.wall4_ms)} | {_fmt(r.latency4_ratio)} | {target(r)} |")

    lean = [r for r in rows if r.kind in ("random", "trained")]
    per = [r for r in lean if r.density in PER_FLOP_DENSITIES]
    below_open = [r for r in lean if r.density != "open"]
    lines += ["", "## Summary (computed from the table)", ""]
    if per:
        worst = max(per, key=lambda r: r.per_flop / target_per_flop(r.model))
        met = sum(r.per_flop <= target_per_flop(r.model) for r in per)
        lines.append(f"- Per FLOP: {met} of {len(per)} lean models at densities 0.25/0.5/0.75 and trained meet their "
                     f"target; the furthest from it is {worst.model} {label(worst)} at "
                     f"{worst.per_flop:.2f} (target {target_per_flop(worst.model)}).")
        for m in models:
            mine = [r for r in per if r.model == m]
            if mine:
                lines.append(f"  - {m}: per FLOP " + ", ".join(f"{r.density if r.kind == 'random' else 'trained'}"
                                                                f"{' ' + r.mix if r.mix in ('hard', 'anneal') else ''} "
                                                                f"{r.per_flop:.2f}" for r in mine)
                             + f" (by CPU time " + ", ".join(f"{r.cpu_per_flop:.2f}" for r in mine) + ").")
    if below_open:
        slower = [r for r in below_open if r.vs_separate >= 1]
        lines.append(f"- Against T separate networks: {len(below_open) - len(slower)} of {len(below_open)} lean models "
                     "below all-open are faster" + (": every one." if not slower else "; slower: " + ", ".join(
                         f"{r.model} {label(r)} ({r.vs_separate:.2f}x)" for r in slower) + "."))
    for d, limit, what, attr in (("closed", TARGET_CLOSED, "the backbone", "latency_ratio"),
                                 ("open", TARGET_OPEN, "T separate", "vs_separate")):
        mine = [r for r in lean if r.density == d]
        if mine:
            lines.append(f"- All {d} / {what}: " + ", ".join(
                f"{r.model} {getattr(r, attr):.2f} ({'met' if getattr(r, attr) <= limit else 'MISSED'})" for r in mine)
                + f" (target <= {limit}).")
    over = [r for r in rows if r.kernel_ms > r.cpu_ms]
    if over:
        most = max(over, key=lambda r: r.kernel_ms / r.cpu_ms)
        lines.append(f"- `kernel ms` exceeds the whole run's CPU time on {len(over)} of {len(rows)} rows, at most "
                     f"{most.kernel_ms / most.cpu_ms:.2f}x ({most.model} {label(most)}, {most.nodes} nodes): the "
                     "profiler's own cost per node, which weighs most in graphs of many small nodes; compare "
                     "`per FLOP (CPU)` there.")
    if trained:
        lines += ["", "## Trained gates", "",
                  "| model | mix | steps | train s | FLOPs before projection / budget | gates changed by the projection | "
                  "open after projection | landed / budget (64x96) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for m, per_mix in trained.items():
            for mix, t in per_mix.items():
                lines.append(f"| {m} | {mix} | {t['steps']} | {t['train_s']:.0f} | "
                             f"{t['before_projection'] / t['requested']:.2f} | {t['changed_gates']} of {t['gates']} "
                             f"({100 * t['changed_gates'] / t['gates']:.0f} %) | {t['open_fraction']:.2f} | "
                             f"{t['landed'] / t['requested']:.3f} |")

    lines += ["", "## How the lean models run", "", "| model | row | slots | graph | nodes | export s | ORT parity |",
              "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.model} | {label(r)} | {r.slots} | {r.graph} | {r.nodes} | {r.export_s:.1f} | "
                     f"{r.parity:.1e} |")

    lines += ["", "## Where the time goes", "",
              "ONNX Runtime's profiler at 1 thread, per op group the sum of the per-node minimum kernel times (ms; "
              "the same numbers as `kernel ms`). `conv`: convolutions (with ORT's fused activations) and Gemm; "
              "`concat / split`: a task's input put together from its own and the shared channels, and slot "
              "splits; `channel gather`: channel reordering to the full width; `mul / add`: the shared slot's mix "
              "and the backbone's own residual adds; `activation`: activations that ORT could not fuse into the "
              "conv before them; `NCHWc reorder`: layout changes around ORT's blocked-layout convolutions. "
              "`conv per FLOP`: conv ms / the backbone's conv ms / FLOP ratio; `non-conv share`: what the other "
              "groups add, as a fraction of the latency that the FLOPs predict.", "",
              "| model | row | " + " | ".join(GROUP_NAMES) + " | total | conv per FLOP | non-conv share |",
              "|---|---|" + "---:|" * (len(GROUP_NAMES) + 3)]
    base_conv = {r.model: r.ops_ms["conv"] for r in rows if r.kind == BACKBONE}
    base_total = {r.model: r.kernel_ms for r in rows if r.kind == BACKBONE}
    for r in rows:
        total = sum(r.ops_ms.values())
        cells = " | ".join(f"{r.ops_ms[g]:.2f} ({100 * r.ops_ms[g] / total:.0f} %)" for g in GROUP_NAMES)
        conv_pf = r.ops_ms["conv"] / base_conv[r.model] / r.flop_ratio
        extra = (total - r.ops_ms["conv"]) / (base_total[r.model] * r.flop_ratio)
        lines.append(f"| {r.model} | {label(r)} | {cells} | {total:.2f} | {conv_pf:.2f} | {100 * extra:.0f} % |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / f"{stem}.png", meta)


def _plot(rows: list[Row], path: Path, meta: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r.model == model]
        base = next(r for r in mine if r.kind == BACKBONE)
        top_x = max(r.flops for r in mine) / 1e9 * 1.1
        slope = base.kernel_ms / (base.flops / 1e9)
        xs = np.linspace(0, top_x, 20)
        ax.plot(xs, slope * xs, color="0.5", lw=1, label="FLOP-proportional (through the backbone)")
        ax.plot(xs, target_per_flop(model) * slope * xs, color="0.5", lw=1, ls="--",
                label=f"target {target_per_flop(model)} x")
        for j, mix in enumerate(dict.fromkeys(r.mix for r in mine if r.kind == "random")):
            rnd = [r for r in mine if r.kind == "random" and r.mix == mix]
            ax.plot([r.flops / 1e9 for r in rnd], [r.kernel_ms for r in rnd], "o-" if mix == "soft" else "s--",
                    color=f"C{j}", label=f"lean, random gates, {mix} mix")
            for r in rnd:
                ax.annotate(r.density, (r.flops / 1e9, r.kernel_ms), textcoords="offset points", xytext=(4, -10),
                            fontsize=7, color=f"C{j}")
        for r in mine:
            if r.kind == "trained":
                ax.plot([r.flops / 1e9], [r.kernel_ms], "D" if r.mix == "soft" else "P", color="C3", ms=8,
                        label=f"lean, trained gates (budget 0.5, {r.mix} mix)")
            elif r.kind == BACKBONE:
                ax.plot([r.flops / 1e9], [r.kernel_ms], "k*", ms=13, label=BACKBONE)
            elif r.kind == SEPARATE:
                ax.plot([r.flops / 1e9], [r.kernel_ms], "s", color="C2", ms=9, label=SEPARATE)
        ax.set_xlim(0, top_x)
        ax.set_ylim(0, max(max(r.kernel_ms for r in mine), target_per_flop(model) * slope * top_x) * 1.05)
        ax.set_xlabel("fvcore GFLOPs")
        ax.set_ylabel("ORT kernel ms (sum of per-node minima, 1 thread)")
        ax.set_title(f"{model}, {mine[0].input}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Lean multi-task encoders: latency vs FLOPs ({meta.get('tasks', '')}, {meta.get('gates', '')}, "
                 f"{'/'.join(args_mixes(meta))} mix)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def args_mixes(meta: dict[str, str]) -> list[str]:
    return [m for m in TRAIN_MIXES if f"{m}:" in meta.get("shared mix", "") or f"{m} (" in meta.get("shared mix", "")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet18,hrnet_w18_small_v2,mobilenetv3_large_100")
    p.add_argument("--tasks", type=int, default=3, help="number of tasks T (at most 3 with trained gates)")
    p.add_argument("--size", default="224x224", help="HxW of the input")
    p.add_argument("--hrnet-size", default=None, help="HxW for hrnet models (default: --size), e.g. 288x384")
    p.add_argument("--densities", default="closed,0.25,0.5,0.75,open")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model at 1 thread (wall and CPU time)")
    p.add_argument("--runs4", type=int, default=10, help="timed runs per model at --multi-threads (wall)")
    p.add_argument("--prof-runs", type=int, default=10, help="profiled runs per model (per-node minimum)")
    p.add_argument("--prof-rounds", type=int, default=1,
                   help="interleave the profiles: this many rounds over every model, each of prof-runs / rounds runs, "
                        "per op type the fastest round (for a machine under varying load)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--multi-threads", type=int, default=4, help="intra-op threads of the extra column (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--opt-level", choices=("all", "extended", "basic"), default="all",
                   help="ORT graph optimisation level ('all' includes the NCHWc layout transform)")
    p.add_argument("--gate-group", type=int, default=DEFAULT_GROUP, help="channels per gate (convert's gate_group)")
    p.add_argument("--mix", default="soft", help="shared-slot mix of the gated models: soft, hard, anneal (the training default) or a list such as soft,hard")
    p.add_argument("--tie", default="", help="gate tying of the conversions (and training runs): depthwise, residual or "
                                             "depthwise,residual (convert's tie_depthwise / tie_residual), plus "
                                             "skip-mix (convert's skip_depthwise_mix, with depthwise); results "
                                             "get '_tied' plus the tyings")
    p.add_argument("--gate-structure", default="free", choices=("free", "prefix"),
                   help="the gates' structure (convert's gate_structure; results get '_prefix' for prefix)")
    p.add_argument("--no-train", action="store_true", help="skip the trained-gates rows")
    p.add_argument("--train-steps", type=int, default=25, help="steps per epoch of the short training run")
    p.add_argument("--train-epochs", type=int, default=4)
    p.add_argument("--hrnet-train-steps", type=int, default=12, help="steps per epoch for hrnet (slower per step)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    args.mixes = [m.strip() for m in args.mix.split(",") if m.strip()]
    args.ties_list = sorted({t.strip() for t in args.tie.split(",") if t.strip()})
    if any(t not in ("depthwise", "residual", "skip-mix") for t in args.ties_list):
        p.error(f"--tie takes depthwise, residual, skip-mix or a list of them, got {args.tie!r}")
    if "skip-mix" in args.ties_list and "depthwise" not in args.ties_list:
        p.error("--tie skip-mix needs depthwise (it skips the mix in front of tied depthwise convs)")
    args.ties = {("skip_depthwise_mix" if t == "skip-mix" else f"tie_{t}"): True for t in args.ties_list}
    if args.gate_structure != "free":  # passed on with the ties to convert() and TrainConfig
        args.ties["gate_structure"] = args.gate_structure
    if not args.mixes or any(m not in TRAIN_MIXES for m in args.mixes) or len(set(args.mixes)) < len(args.mixes):
        p.error(f"--mix takes soft, hard, anneal or a comma-separated list of them, got {args.mix!r}")
    if not args.no_train and args.tasks > 3:
        p.error("trained gates use the embedded scenes' 3 tasks: --tasks must be <= 3 (or pass --no-train)")
    stem = "latency" + (f"_group{args.gate_group}" if args.gate_group != DEFAULT_GROUP else "")
    stem += f"_{args.opt_level}" if args.opt_level != "all" else ""
    stem += {("soft",): "", ("hard",): "_hardmix", ("anneal",): "_annealmix"}.get(tuple(args.mixes), "_mixes")
    stem += "".join(f"_{t}" for t in sorted(args.ties_list) if t != "skip-mix")
    stem = stem.replace("_depthwise_residual", "_tied").replace("_depthwise", "_tied_depthwise").replace(
        "_residual", "_tied_residual") + ("_skipmix" if "skip-mix" in args.ties_list else "")
    stem += f"_{args.gate_structure}" if args.gate_structure != "free" else ""
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    tasks = tuple(f"task{i}" for i in range(args.tasks))
    densities = [d.strip() for d in args.densities.split(",") if d.strip()]
    size = tuple(int(v) for v in args.size.split("x"))
    hr_size = tuple(int(v) for v in args.hrnet_size.split("x")) if args.hrnet_size else size
    start = time.perf_counter()
    load0 = os.getloadavg()[0]

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {msg}", flush=True)

    rows: list[Row] = []
    trained: dict[str, dict] = {}
    steps = args.train_steps
    with tempfile.TemporaryDirectory(prefix="gatedmtl-latency-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            hr = name.startswith("hrnet")
            args.train_steps = args.hrnet_train_steps if hr else steps
            log(f"{name}: exporting the backbone, T separate backbones and the lean models")
            mine, report = bench_model(name, hr_size if hr else size, tasks, densities, args, Path(tmp), log)
            rows += mine
            if report is not None:
                trained[name] = report
            for r in mine:
                log(f"  {r.kind:>24} {r.density:>8} {r.mix:>4}: FLOPs x{r.flop_ratio:.2f}  kernel {r.kernel_ms:.2f} ms "
                    f"x{r.latency_ratio:.2f}  per FLOP {r.per_flop:.2f} (CPU {r.cpu_per_flop:.2f})  "
                    f"vs separate {r.vs_separate:.2f}  {target(r)}")
    args.train_steps = steps
    meta = {"tasks": f"T = {args.tasks}",
            "gates": f"one per {args.gate_group} channel(s)" + (
                "".join({"depthwise": "; depthwise convs fed by a gated layer use that layer's gates (convert(..., "
                                      "tie_depthwise=True))",
                         "residual": "; the gated layers that write one residual stream use one gate (convert(..., "
                                     "tie_residual=True))",
                         "prefix": "; prefix structure: each task keeps a leading run of every layer's channels and "
                                   "the shared slot reads one task per layer (convert(..., gate_structure='prefix'))",
                         "skip-mix": "; a layer that only tied depthwise convs read passes its shared branch on "
                                     "without the mix (convert(..., skip_depthwise_mix=True))"}[t]
                        for t in args.ties_list + ([args.gate_structure] if args.gate_structure != "free" else []))),
            "shared mix": "; ".join({"soft": "soft: softmax of beta, a Mul/Add chain per layer in the lean graph",
                                     "hard": "hard (rows marked 'hard mix'): one-hot argmax of beta (random rows: "
                                             "of the same random beta), one channel gather per layer in the lean "
                                             "graph",
                                     "anneal": "anneal (rows marked 'annealed mix'): trained with the soft mix, its "
                                               "temperature lowered from 1 to 0.01 between 50 % and 90 % of the steps, "
                                               "then the hard mix; random rows use the hard mix (the graph an annealed "
                                               "run ends with)"}[m] for m in args.mixes),
            "ONNX Runtime": f"{ort.__version__}, CPUExecutionProvider, sequential execution, graph optimisation level "
                            f"{args.opt_level!r}; 1 intra-op thread unless a column says otherwise",
            "timing": f"{args.warmup} warm-up runs, then {args.runs} timed runs per model at 1 thread and {args.runs4} "
                      f"at {args.multi_threads} threads in interleaved blocks of 4 warm runs (wall and CPU time, "
                      f"median); {args.prof_runs} profiled runs per model and thread count after 3 warm-up runs "
                      "(kernel ms)" + (f", interleaved in {args.prof_rounds} rounds over the models (per op type the "
                                       "fastest round)" if args.prof_rounds > 1 else ""),
            "trained gates": (f"TrainConfig(budget='0.5', gate_group={args.gate_group}, mix in {args.mixes}, image_size=(64, 96), "
                              f"epochs={args.train_epochs}, steps_per_epoch={steps} ({args.hrnet_train_steps} for "
                              "hrnet), batch_size=8, lr=2e-3, gate_lr=0.05), then finalize()"
                              if not args.no_train else "not run (--no-train)"),
            "machine": f"{_cpu_name()}, {os.cpu_count()} CPUs, load average "
                       f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at end",
            f"{args.multi_threads}-thread columns": (
                f"this machine has {os.cpu_count()} CPU cores, so {args.multi_threads} intra-op threads share "
                f"{min(os.cpu_count() or 1, args.multi_threads)} cores with each other and with the other jobs: "
                "the figures show the graph's behaviour, not an edge CPU's speed-up"
                if (os.cpu_count() or 1) < args.multi_threads else "one core per thread"),
            "torch / timm": f"{torch.__version__} / {timm.__version__}",
            "wall time of this script": f"{time.perf_counter() - start:.0f} s"}
    write_results(rows, Path(args.out), meta, trained, args.multi_threads, stem)
    log(f"wrote {Path(args.out) / stem}.md, .csv, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
