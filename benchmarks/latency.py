"""Lean-graph latency vs FLOPs: ONNX Runtime CPU latency of lean models at several gate densities.

For each backbone, T tasks and each gate density (random per channel, fixed seed), the gated
model is pruned, exported with :func:`gatedmtl.export.export_onnx` and timed with ONNX Runtime
(1 intra-op thread by default) next to the plain backbone. Ratios are normalised to the **plain
backbone** (its fvcore FLOPs and its latency):

    flop ratio    = fvcore FLOPs(lean) / fvcore FLOPs(plain backbone)
    latency ratio = median latency(lean) / median latency(plain backbone)
    per FLOP      = latency ratio / flop ratio          (target <= 1.15)
    all closed    : latency ratio                        (target <= 1.3)

Timing is interleaved: after warm-up, every round visits every model of one backbone in a
shuffled order and runs it 5 times in a row, keeping the last 4 (warm caches, as when a model
runs alone), so that load from other processes hits all models alike; the median of ``--runs``
timings is reported (p90 and min too, and the thread CPU time as a load-insensitive check).

Writes ``latency.md``, ``latency.csv`` and ``latency.png`` under ``--out``; ``latency_group<N>.*``
with ``--gate-group N`` (lean widths in multiples of N) and ``latency[...]_<level>.*`` with
``--opt-level extended|basic`` (without ORT's NCHWc layout transform, which speeds up the plain
backbone much more than the lean graph, whose slot splits and channel gathers break NCHWc
chains). Usage::

    python benchmarks/latency.py [--models resnet18,hrnet_w18_small_v2,mobilenetv3_large_100]
        [--size 224] [--hrnet-size 224x224] [--densities closed,0.25,0.5,0.75,open] [--runs 20]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch
from torch import nn

import gatedmtl
from gatedmtl.export import export_onnx
from gatedmtl.verify import perturb_slots, set_gates

TARGET_PER_FLOP = 1.15
TARGET_CLOSED = 1.3


@dataclass
class Row:
    model: str
    input: str
    density: str
    slots: str
    flops: int
    flop_ratio: float
    median_ms: float
    p90_ms: float
    min_ms: float
    cpu_ms: float
    latency_ratio: float
    cpu_ratio: float
    per_flop: float
    parity: float
    ops_ms: dict[str, float]  # ORT kernel time per op group (profiled runs, median-free mean)


class _Plain(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor):
        return {"out": self.backbone(x)}


OPT_LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}


def _session(path: Path, threads: int, level: str = "all", profile_prefix: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = OPT_LEVELS[level]
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _time(sessions: dict[str, ort.InferenceSession], shape: tuple[int, ...], runs: int, warmup: int,
          seed: int, block: int = 5) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per session ``runs`` timings (ms, wall and thread CPU time).

    Rounds visit the sessions in a shuffled order; each visit runs one session ``block`` times
    in a row and keeps the last ``block - 1`` (the first refills the caches that the other
    models evicted), so models are timed warm, as when one runs alone, and load from other
    processes hits all of them alike.
    """
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, {"image": x})
    wall = {k: [] for k in sessions}
    cpu = {k: [] for k in sessions}
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


OP_GROUPS = {"Conv": "conv", "FusedConv": "conv", "ReorderInput": "NCHWc reorder", "ReorderOutput": "NCHWc reorder",
             "Split": "slot split / concat", "Concat": "slot split / concat", "Slice": "slot split / concat",
             "Gather": "channel gather", "Mul": "mul / add", "Add": "mul / add", "Sum": "mul / add"}
GROUP_NAMES = ("conv", "NCHWc reorder", "slot split / concat", "channel gather", "mul / add", "other")


def _op_breakdown(path: Path, threads: int, level: str, x: np.ndarray, runs: int = 10, warmup: int = 3) -> dict[str, float]:
    """Mean ORT kernel time (ms per run) per op group, from ONNX Runtime's own profiler (warm-up runs dropped)."""
    session = _session(path, threads, level, profile_prefix=str(path.with_suffix("")))
    for _ in range(warmup + runs):
        session.run(None, {"image": x})
    events = json.loads(Path(session.end_profiling()).read_text())
    first = sorted(e["ts"] for e in events if e.get("name") == "model_run")[warmup]
    totals = dict.fromkeys(GROUP_NAMES, 0.0)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= first:
            totals[OP_GROUPS.get(e["args"]["op_name"], "other")] += e["dur"] / 1e3 / runs
    return totals


def _build(name: str) -> nn.Module:
    kwargs = {"features_only": True} if name.startswith("hrnet") else {}
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _density(text: str) -> str | float:
    return text if text in ("open", "closed") else float(text)


def bench_model(name: str, size: tuple[int, int], tasks: tuple[str, ...], densities: list[str], runs: int,
                warmup: int, threads: int, seed: int, tmp: Path, log, level: str = "all",
                gate_group: int = 1) -> list[Row]:
    shape = (1, 3, *size)
    backbone = _build(name)
    model = gatedmtl.convert(backbone, tasks, input_size=shape[1:], gate_group=gate_group).eval()
    gen = torch.Generator().manual_seed(seed)
    perturb_slots(model, generator=gen)
    files: dict[str, Path] = {"plain": export_onnx(_Plain(backbone), tmp / f"{name}-plain.onnx", shape, check=False).path}
    flops = {"plain": gatedmtl.count_flops(backbone, shape)}
    slots, parity = {"plain": "-"}, {"plain": 0.0}
    names = ["shared", *tasks]
    for d in densities:
        t0 = time.perf_counter()
        set_gates(model, _density(d), torch.Generator().manual_seed(seed + 1))
        lean = gatedmtl.prune(model).eval()
        report = export_onnx(lean, tmp / f"{name}-{d}.onnx", shape)  # checked against torch in ORT (1e-4)
        files[d] = report.path
        parity[d] = max(report.max_rel_error.values())
        flops[d] = gatedmtl.count_flops(lean, shape)
        slots[d] = "+".join(names[s] for s in lean.slots)
        log(f"  {name} density {d}: {flops[d] / 1e9:.3f} GFLOPs, slots {slots[d]}, ORT parity {parity[d]:.1e} "
            f"({time.perf_counter() - t0:.0f} s)")
    times = _time({k: _session(p, threads, level) for k, p in files.items()}, shape, runs, warmup, seed)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    ops = {k: _op_breakdown(p, threads, level, x) for k, p in files.items()}
    base_wall, base_cpu = float(np.median(times["plain"][0])), float(np.median(times["plain"][1]))
    rows = []
    for k in ["plain", *densities]:
        wall, cpu = times[k]
        fr = flops[k] / flops["plain"]
        lr = float(np.median(wall)) / base_wall
        rows.append(Row(name, "x".join(map(str, shape)), "backbone" if k == "plain" else k, slots[k], flops[k],
                        round(fr, 4), round(float(np.median(wall)), 3), round(float(np.percentile(wall, 90)), 3),
                        round(float(wall.min()), 3), round(float(np.median(cpu)), 3), round(lr, 4),
                        round(float(np.median(cpu)) / base_cpu, 4), round(lr / fr, 4), parity[k],
                        {g: round(v, 3) for g, v in ops[k].items()}))
    return rows


def write_results(rows: list[Row], out: Path, meta: dict[str, str], stem: str = "latency") -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        fields = [k for k in asdict(rows[0]) if k != "ops_ms"] + [f"{g} ms" for g in GROUP_NAMES]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            row = {k: v for k, v in asdict(r).items() if k != "ops_ms"}
            w.writerow(row | {f"{g} ms": r.ops_ms[g] for g in GROUP_NAMES})

    lines = ["# Lean-graph latency vs FLOPs (ONNX Runtime, CPU)", "",
             "Ratios are normalised to the **plain backbone** (its fvcore FLOPs and its median latency); "
             f"targets: latency ratio <= {TARGET_PER_FLOP} x FLOP ratio, all-closed lean <= {TARGET_CLOSED} x backbone.",
             "Gates are random (fixed seed) at each density, one per channel or per group of channels (see below); `slots` are the slots the lean model folds on "
             "the batch axis (all closed: the plain backbone; all open: no shared slot).", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "| model | input | density | slots | GFLOPs | FLOP ratio | median ms | p90 ms | latency ratio | "
              "CPU-time ratio | latency / FLOP ratio | ORT parity | target |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.density == "backbone":
            target = "reference"
        elif r.density == "closed":
            target = f"{'met' if r.latency_ratio <= TARGET_CLOSED else 'MISSED'} (<= {TARGET_CLOSED} x backbone)"
        else:
            target = "met" if r.per_flop <= TARGET_PER_FLOP else "MISSED"
        lines.append(f"| {r.model} | {r.input} | {r.density} | {r.slots} | {r.flops / 1e9:.3f} | {r.flop_ratio:.2f} | "
                     f"{r.median_ms:.2f} | {r.p90_ms:.2f} | {r.latency_ratio:.2f} | {r.cpu_ratio:.2f} | "
                     f"{r.per_flop:.2f} | {r.parity:.1e} | {target} |")
    lean = [r for r in rows if r.density != "backbone"]
    worst = max(lean, key=lambda r: r.per_flop)
    closed = [r for r in lean if r.density == "closed"]
    lines += ["", f"Worst latency / FLOP ratio: {worst.per_flop:.2f} ({worst.model}, density {worst.density}); "
              f"{sum(r.per_flop <= TARGET_PER_FLOP for r in lean)} of {len(lean)} lean models meet <= {TARGET_PER_FLOP}."]
    if closed:
        lines.append("All closed / backbone latency: " + ", ".join(f"{r.model} {r.latency_ratio:.2f}" for r in closed) + ".")
    lines += ["", "## Where the time goes", "",
              "ONNX Runtime's profiler, kernel time per op group in ms per run (10 profiled runs after 3 warm-up runs; "
              "the profiler adds a little overhead, so the sums exceed the medians above). `slot split / concat`: the "
              "folded batch split per layer and put back together; `channel gather`: a task's width restored from its "
              "own and the shared channels; `mul / add`: the shared slot's mix (and the backbone's own Mul/Add); "
              "`NCHWc reorder`: layout changes that ORT inserts around convs whose neighbours cannot stay in its "
              "blocked layout.", "",
              "| model | density | " + " | ".join(GROUP_NAMES) + " | total |",
              "|---|---|" + "---:|" * (len(GROUP_NAMES) + 1)]
    for r in rows:
        total = sum(r.ops_ms.values())
        cells = " | ".join(f"{r.ops_ms[g]:.2f} ({100 * r.ops_ms[g] / total:.0f} %)" for g in GROUP_NAMES)
        lines.append(f"| {r.model} | {r.density} | {cells} | {total:.2f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5.5))
    top = max(max(r.flop_ratio for r in rows), max(r.latency_ratio for r in rows)) * 1.08
    xs = np.linspace(0, top, 50)
    ax.plot(xs, xs, color="0.6", lw=1, label="latency = FLOPs")
    ax.plot(xs, TARGET_PER_FLOP * xs, color="0.6", lw=1, ls="--", label=f"target {TARGET_PER_FLOP} x FLOPs")
    for i, model in enumerate(dict.fromkeys(r.model for r in rows)):
        mine = [r for r in rows if r.model == model and r.density != "backbone"]
        color = f"C{i}"
        ax.plot([r.flop_ratio for r in mine], [r.latency_ratio for r in mine], "o-", color=color, label=model)
        for r in mine:
            ax.annotate(r.density, (r.flop_ratio, r.latency_ratio), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color=color)
    ax.plot([1], [1], "k*", ms=12, label="plain backbone (reference)")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("fvcore FLOPs, lean / plain backbone")
    ax.set_ylabel("ORT CPU latency (median), lean / plain backbone")
    ax.set_title(f"Lean multi-task models: latency vs FLOPs ({meta.get('tasks', '')})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet18,hrnet_w18_small_v2,mobilenetv3_large_100")
    p.add_argument("--tasks", type=int, default=3, help="number of tasks T")
    p.add_argument("--size", default="224x224", help="HxW of the input")
    p.add_argument("--hrnet-size", default=None, help="HxW for hrnet models (default: --size), e.g. 288x384")
    p.add_argument("--densities", default="closed,0.25,0.5,0.75,open")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--opt-level", choices=sorted(OPT_LEVELS), default="all",
                   help="ORT graph optimisation level ('all' includes the NCHWc layout transform)")
    p.add_argument("--gate-group", type=int, default=1, help="channels per gate (gatedmtl.convert's gate_group)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    stem = "latency" + (f"_group{args.gate_group}" if args.gate_group != 1 else "")
    stem += f"_{args.opt_level}" if args.opt_level != "all" else ""
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    tasks = tuple(f"task{i}" for i in range(args.tasks))
    densities = [d.strip() for d in args.densities.split(",") if d.strip()]
    size = tuple(int(v) for v in args.size.split("x"))
    hr_size = tuple(int(v) for v in args.hrnet_size.split("x")) if args.hrnet_size else size
    start = time.perf_counter()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {msg}", flush=True)

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gatedmtl-latency-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            log(f"{name}: converting, pruning and exporting at {len(densities)} densities")
            rows += bench_model(name, hr_size if name.startswith("hrnet") else size, tasks, densities, args.runs,
                                args.warmup, args.threads, args.seed, Path(tmp), log, args.opt_level, args.gate_group)
            for r in rows[-len(densities) - 1:]:
                log(f"  {r.density:>8}: FLOPs x{r.flop_ratio:.2f}  latency {r.median_ms:.2f} ms x{r.latency_ratio:.2f}"
                    f"  per FLOP {r.per_flop:.2f}")
    meta = {"tasks": f"T = {args.tasks}", "gates": f"one per {args.gate_group} channel(s), random per gate",
            "ONNX Runtime": f"{ort.__version__}, CPUExecutionProvider, "
            f"{args.threads} intra-op thread(s), sequential, graph optimisation level {args.opt_level!r}",
            "timing": f"{args.warmup} warm-up runs, then {args.runs} timed runs per model in interleaved blocks "
                      "of 4 warm runs, median",
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                       f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end",
            "torch / timm": f"{torch.__version__} / {timm.__version__}",
            "wall time of this script": f"{time.perf_counter() - start:.0f} s"}
    write_results(rows, Path(args.out), meta, stem)
    log(f"wrote {Path(args.out) / stem}.md, .csv, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
