"""``profile``: FLOPs, parameters, per-slot and per-layer tables and ONNX Runtime latency.

Works on a plain backbone, a :class:`~gatedmtl.surgery.GatedModel` and a
:class:`~gatedmtl.prune.LeanModel`, so that the three can be compared side by side::

    from gatedmtl.profile import compare, profile
    profiles = [profile(backbone, (1, 3, 224, 224)), profile(gated, (1, 3, 224, 224)),
                profile(prune(gated), (1, 3, 224, 224))]
    print(compare(profiles)); print(profiles[2].table())

Definitions (all FLOPs are fvcore's, one multiply-add = 1 FLOP, i.e. what timm and most papers
call MACs -- ``torch.utils.flop_counter`` reports twice these numbers --, eval mode, for
``input_shape`` ``(B, C, H, W)``; :mod:`gatedmtl.flop_ops` says which ops count):

* ``flops``: :func:`gatedmtl.count_flops` of the model as it is. For a gated model that is
  the full folded model (every slot computes every filter); ``predicted_flops`` is what
  ``prune(model)`` will count (:func:`gatedmtl.predict_flops`).
* per slot (shared + each task): the parameters of that slot's own modules and the FLOPs of
  its own modules -- the kept filters (+ fused norms) of every gated layer and its copy of
  every ungated per-slot layer. For a lean model they are fvcore's counts of those modules,
  for a gated model the prediction from the gates (``cost`` per channel x channels the slot
  computes). Whatever fvcore counts outside the slots' modules (parameter-free ops such as
  pooling, upsampling or attention matmuls, run once per folded slot, and modules shared by
  every slot) is reported as ``slot_independent``; per-slot FLOPs + slot-independent = total.
* shared modules: parameter-owning modules kept as one copy for every slot and not gated (their
  input is not the folded batch, e.g. XCiT's positional-encoding projection), with their FLOPs.
* uncounted ops: the ops fvcore met and did not count, with their number of calls: elementwise
  and other ops that the convention leaves out (:data:`gatedmtl.flop_ops.NOT_COUNTED`), and
  flagged, any op that does real compute without a FLOP handle (the FLOPs then miss it).
* latency: the model exported to a temporary ONNX file (:func:`gatedmtl.export.export_onnx`)
  and timed with ONNX Runtime on the CPU (``threads`` intra-op threads, sequential
  execution) after warm-up runs. A gated model does not export (gates are training-only):
  its latency is that of ``prune(model)``, said so in the table.

CLI (``gatedmtl profile ...`` calls :func:`main`)::

    gatedmtl profile resnet18 --tasks seg,depth,normals --density 0.5 [--input 1,3,224,224]
                     [--json out.json] [--no-latency] [--threads 1] [--runs 20] [--features-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .cost import (_check_shape, _runs, _warn_uncounted, analyze, count_params, measure_flops, predict_flops,
                   shared_branch)
from .flop_ops import NOT_COUNTED, uncounted_compute
from .prune import LeanGatedLayer, LeanModel, SplitBranch, computed_slots, prune
from .slots import SlotModule, is_slot_unit
from .surgery import GatedModel, gateable

__all__ = ["Profile", "SlotStats", "LayerStats", "UngatedLayer", "SharedModule", "Latency", "KernelTime", "onnx_latency",
           "onnx_kernel_time", "ort_session", "profile", "compare", "measure_latency", "measure_timing", "main"]

CONVENTION = ("FLOPs are fvcore's: one multiply-add = 1 FLOP (timm and most papers call these MACs; "
              "torch.utils.flop_counter reports 2 per multiply-add)")


@dataclass
class SlotStats:
    """One slot (``"shared"`` or a task): parameters and FLOPs of its own modules."""

    slot: str
    params: int
    flops: int
    computed: bool = True  # False where the lean model does not fold this slot at all


@dataclass
class LayerStats:
    """One gated layer: ``kept[s]`` of ``channels`` output channels computed by slot ``s``."""

    name: str
    kind: str  # "conv", "depthwise" or "linear"
    norm: str | None  # type of the paired norm fused into the gated output, if any
    channels: int
    kept: list[int]
    gate_of: str | None = None  # a tied gate (convert(..., tie_depthwise=True)): the layer whose gate it uses


@dataclass
class UngatedLayer:
    """A per-slot module whose output is not gated: every computed slot runs its whole copy."""

    name: str
    type: str
    reason: str
    flops_per_slot: int = 0


@dataclass
class SharedModule:
    """A parameter-owning module kept as one copy for every slot (not gated)."""

    name: str
    type: str
    reason: str
    flops: int = 0  # fvcore's count of the module in the (lean) model


@dataclass
class Latency:
    """ONNX Runtime CPU latency of one exported model, in milliseconds."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    threads: int
    of: str = "model"  # what was timed: "model" or "prune(model)"
    cpu_median_ms: float = float("nan")  # median thread CPU time of the calling thread (all of it at 1 thread)


@dataclass
class KernelTime:
    """ONNX Runtime's own profile of one ONNX file: per node the fastest of ``runs`` runs, in ms.

    ``total_ms`` (the sum over nodes of each node's minimum kernel time) barely moves with load
    from other processes, unlike wall-clock medians; it leaves out the executor's time between
    kernels (which the thread CPU time of :class:`Latency` includes).
    """

    total_ms: float
    by_op: dict[str, float]  # ONNX Runtime op type (after its graph optimisations) -> summed node minima
    nodes_by_op: dict[str, int]  # op type -> number of nodes
    runs: int
    threads: int


@dataclass
class Profile:
    """What :func:`profile` measured. ``table()`` renders it, ``to_json(path)`` saves it."""

    name: str
    kind: str  # "backbone", "gated" or "lean"
    input_shape: tuple[int, ...]
    tasks: tuple[str, ...]
    flops: int
    params: int
    predicted_flops: int | None = None  # gated: FLOPs of prune(model)
    slot_independent_flops: int = 0
    slot_independent_params: int = 0
    gate_params: int = 0
    slots: list[SlotStats] = field(default_factory=list)
    layers: list[LayerStats] = field(default_factory=list)
    ungated: list[UngatedLayer] = field(default_factory=list)
    shared: list[SharedModule] = field(default_factory=list)
    uncounted_ops: dict[str, int] = field(default_factory=dict)  # aten op -> calls fvcore did not count
    computed_slots: tuple[int, ...] = ()
    latency: Latency | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def uncounted_compute(self) -> dict[str, int]:
        """Uncounted ops that do real compute: FLOPs missing from ``flops``."""
        return uncounted_compute(self.uncounted_ops)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"uncounted_compute": self.uncounted_compute}

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        return path

    def table(self) -> str:
        """Markdown: summary, per-slot, per-layer and ungated-layer tables."""
        shape = "x".join(map(str, self.input_shape))
        lines = [f"## {self.name} ({self.kind}), input {shape}" + (f", tasks {', '.join(self.tasks)}" if self.tasks else ""),
                 "", CONVENTION + ".", "", "| quantity | value |", "|---|---|",
                 f"| FLOPs (fvcore, multiply-adds) | {_g(self.flops)} |"]
        if self.predicted_flops is not None:
            lines.append(f"| FLOPs after prune (predicted) | {_g(self.predicted_flops)} |")
        lines.append(f"| params | {_m(self.params)} |")
        if self.gate_params:
            lines.append(f"| of which gate logits | {_m(self.gate_params)} |")
        missing = self.uncounted_compute
        if missing:
            lines.append(f"| **not counted (real compute)** | {', '.join(f'{op} x{n}' for op, n in missing.items())} |")
        if self.kind != "backbone" and self.computed_slots:
            names = ["shared", *self.tasks]
            lines.append(f"| slots folded on the batch axis | {', '.join(names[s] for s in self.computed_slots)} |")
        if self.latency is not None:
            lat = self.latency
            what = "" if lat.of == "model" else f" of {lat.of}"
            lines.append(f"| ORT CPU latency{what}, {lat.threads} thread{'s' * (lat.threads > 1)} | "
                         f"median {lat.median_ms:.2f} ms, p90 {lat.p90_ms:.2f} ms ({lat.runs} runs) |")
        for note in self.notes:
            lines.append(f"| note | {note} |")
        if self.slots:
            pred = " (predicted after prune)" if self.kind == "gated" else ""
            lines += ["", f"### per slot{pred}", "", "| slot | params | FLOPs | share of FLOPs |", "|---|---:|---:|---:|"]
            total = sum(s.flops for s in self.slots) + self.slot_independent_flops
            for s in self.slots:
                mark = "" if s.computed else " (not computed)"
                lines.append(f"| {s.slot}{mark} | {_m(s.params)} | {_g(s.flops)} | {_pct(s.flops, total)} |")
            lines.append(f"| slot-independent | {_m(self.slot_independent_params)} | {_g(self.slot_independent_flops)} | "
                         f"{_pct(self.slot_independent_flops, total)} |")
            lines.append(f"| **total** | {_m(sum(s.params for s in self.slots) + self.slot_independent_params + self.gate_params)}"
                         f" | {_g(total)} | |")
        if self.layers:
            heads = ["shared", *self.tasks]
            lines += ["", "### gated layers (output channels kept per slot / total)", "",
                      "| layer | kind | norm | " + " | ".join(heads) + " | channels |",
                      "|---|---|---|" + "---:|" * (len(heads) + 1)]
            for layer in self.layers:
                kept = " | ".join(str(k) for k in layer.kept)
                kind = layer.kind + (f", gate of {layer.gate_of}" if layer.gate_of else "")
                lines.append(f"| {layer.name} | {kind} | {layer.norm or 'no'} | {kept} | {layer.channels} |")
        if self.ungated:
            lines += ["", "### ungated per-slot layers (every computed slot runs its whole copy)", "",
                      "| layer | type | FLOPs per slot | reason |", "|---|---|---:|---|"]
            for u in self.ungated:
                lines.append(f"| {u.name} | {u.type} | {_g(u.flops_per_slot)} | {u.reason} |")
        if self.shared:
            lines += ["", "### shared modules (one copy for every slot, not gated)", "",
                      "| module | type | FLOPs | reason |", "|---|---|---:|---|"]
            for m in self.shared:
                lines.append(f"| {m.name} | {m.type} | {_g(m.flops)} | {m.reason} |")
        if self.uncounted_ops:
            lines += ["", "### ops fvcore did not count", "", "| op | calls | why |", "|---|---:|---|"]
            for op, n in self.uncounted_ops.items():
                why = ("by convention (elementwise, reduction, pooling or data movement)" if op in NOT_COUNTED
                       else "**no FLOP handle: real compute missing from the FLOPs**")
                lines.append(f"| {op} | {n} | {why} |")
        return "\n".join(lines) + "\n"


def _g(flops: float) -> str:
    return f"{flops / 1e9:.4f} G" if abs(flops) >= 1e7 else f"{flops / 1e6:.3f} M"


def _m(params: float) -> str:
    return f"{params / 1e6:.3f} M"


def _pct(part: float, total: float) -> str:
    return f"{100 * part / total:.1f} %" if total else "-"


# ----------------------------------------------------------------------------------------------
# Structure: layers, slots, ungated modules
# ----------------------------------------------------------------------------------------------


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        return "depthwise"
    return "conv"


def _ungated_reason(module: nn.Module) -> str:
    why = gateable(module)
    if why is None:
        return "output channels are not on the gated axis (e.g. a token or reshaped output)"
    if why == "not a convolution or linear layer":
        if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(module).__name__:
            return "norm not fused with a gated conv (its per-slot copy runs on every slot)"
        return "not a convolution or linear layer"
    return why


def _gated_names(model: GatedModel) -> set[str]:
    names = set(model.gate_names)
    return names | {model.backbone.get_submodule(n).producer for n in model.gate_names}


def _gated_layers(model: GatedModel) -> list[LayerStats]:
    rows = []
    for name in model.gate_names:
        unit: SlotModule = model.backbone.get_submodule(name)
        producer: SlotModule = model.backbone.get_submodule(unit.producer)
        open_ = unit.gate.open_mask().cpu()
        kept = [int((~open_.all(0)).sum())] + [int(o.sum()) for o in open_]
        norm = type(unit.slots[0]).__name__ if producer is not unit else None
        owner = model.tied_gates.get(name)
        gate_of = model.backbone.get_submodule(owner).producer if owner else None
        rows.append(LayerStats(unit.producer, _kind(producer.slots[0]), norm, unit.gate.channels, kept, gate_of))
    return rows


def _lean_layers(model: LeanModel) -> list[LayerStats]:
    rows = []
    for name, layer in model.lean_layers():
        branch = next(b for b, p in zip(layer.branches, layer.present) if p)
        if isinstance(branch, SplitBranch):
            branch = branch.pieces[0]
        paired = isinstance(branch, nn.Sequential)
        core = branch[0] if paired else branch
        norm = type(branch[1]).__name__ if paired else None
        depthwise = any(getattr(layer, f"in_index_{s}") is not None for s in range(layer.num_slots)) or any(
            isinstance(b, SplitBranch) and any(getattr(b, f"in_index_{i}") is not None for i in range(len(b.pieces)))
            for b in layer.branches)
        kind = "depthwise" if depthwise else _kind(core)
        rows.append(LayerStats(name, kind, norm, layer.channels, list(layer.kept)))
    return rows


def _ungated_slot_modules(backbone: nn.Module, skip: set[str]) -> list[tuple[str, SlotModule]]:
    return [(n, m) for n, m in backbone.named_modules() if isinstance(m, SlotModule) and n not in skip]


def _slot_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# Latency
# ----------------------------------------------------------------------------------------------


class _DictOutput(nn.Module):
    """A plain backbone as ``{"out": backbone(x)}`` (the exporter wants task-named outputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> dict[str, Any]:
        out = self.model(x)
        return out if isinstance(out, dict) else {"out": out}


def _export_for_timing(model: nn.Module, path: Path, shape: tuple[int, ...]) -> None:
    from .export import export_onnx

    wrapped = model if isinstance(model, LeanModel) else _DictOutput(model)
    with warnings.catch_warnings():  # tracer chatter from backbone code, not actionable here
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        export_onnx(wrapped, path, shape, check=False)


def measure_latency(model: nn.Module, input_shape: Sequence[int], *, threads: int = 1, runs: int = 20,
                    warmup: int = 3) -> Latency:
    """Export ``model`` (a plain backbone or a lean model) to a temporary ONNX file and time it with ORT."""
    shape = _check_shape(input_shape)
    with tempfile.TemporaryDirectory(prefix="gatedmtl-profile-") as tmp:
        path = Path(tmp) / "model.onnx"
        _export_for_timing(model, path, shape)
        return onnx_latency(path, shape, threads=threads, runs=runs, warmup=warmup)


def measure_timing(model: nn.Module, input_shape: Sequence[int], *, threads: int = 1, runs: int = 10,
                   warmup: int = 3) -> tuple[Latency, KernelTime]:
    """Both ORT timings of ``model`` (a plain backbone or a lean model) from one export: the wall-clock /
    thread-CPU :class:`Latency` and the load-insensitive per-node minimum :class:`KernelTime`."""
    shape = _check_shape(input_shape)
    with tempfile.TemporaryDirectory(prefix="gatedmtl-profile-") as tmp:
        path = Path(tmp) / "model.onnx"
        _export_for_timing(model, path, shape)
        return (onnx_latency(path, shape, threads=threads, runs=runs, warmup=warmup),
                onnx_kernel_time(path, shape, threads=threads, runs=runs, warmup=warmup))


def ort_session(path: str | Path, threads: int = 1, *, level: str = "all", profile_prefix: str | None = None):
    """An ONNX Runtime CPU session: ``threads`` intra-op threads, sequential execution, quiet log.

    ``level``: graph optimisation level, ``"all"`` (with the NCHWc layout transform), ``"extended"``
    or ``"basic"``; ``profile_prefix``: turn ONNX Runtime's profiler on, writing ``<prefix>_*.json``.
    """
    import onnxruntime as ort

    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
    if level not in levels:
        raise ValueError(f"level must be one of {sorted(levels)}, got {level!r}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[level]
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_latency(path: str | Path, input_shape: Sequence[int], *, threads: int = 1, runs: int = 20,
                 warmup: int = 3) -> Latency:
    """Time the ONNX file ``path`` with ONNX Runtime (CPU, sequential) on a random input of ``input_shape``.

    Wall-clock statistics of ``runs`` runs after ``warmup`` runs, and the median thread CPU time
    of the calling thread (with ``threads=1`` ONNX Runtime computes in that thread, so it is the
    model's CPU time, less sensitive to other processes than the wall clock).
    """
    import numpy as np

    shape = _check_shape(input_shape)
    if runs < 1 or threads < 1:
        raise ValueError(f"runs and threads must be >= 1, got runs={runs}, threads={threads}")
    session = ort_session(path, threads)
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(warmup):
        session.run(None, {name: x})
    times, cpu = [], []
    for _ in range(runs):
        c0, t0 = time.thread_time(), time.perf_counter()
        session.run(None, {name: x})
        t1, c1 = time.perf_counter(), time.thread_time()
        times.append((t1 - t0) * 1e3)
        cpu.append((c1 - c0) * 1e3)
    arr = np.asarray(times)
    return Latency(float(np.median(arr)), float(np.percentile(arr, 90)), float(arr.mean()), float(arr.min()),
                   runs, threads, cpu_median_ms=float(np.median(cpu)))


def onnx_kernel_time(path: str | Path, input_shape: Sequence[int], *, threads: int = 1, runs: int = 10,
                     warmup: int = 3, level: str = "all") -> KernelTime:
    """Profile ``path`` with ONNX Runtime's profiler: per node the minimum kernel time over ``runs`` runs.

    The ``warmup`` runs before are dropped. See :class:`KernelTime`.
    """
    import numpy as np

    shape = _check_shape(input_shape)
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    with tempfile.TemporaryDirectory(prefix="gatedmtl-ortprof-") as tmp:
        session = ort_session(path, threads, level=level, profile_prefix=str(Path(tmp) / "profile"))
        name = session.get_inputs()[0].name
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        for _ in range(warmup + runs):
            session.run(None, {name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    first = starts[warmup]
    fastest: dict[str, float] = {}
    op_of: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= first:
            node = e["name"]
            fastest[node] = min(fastest.get(node, float("inf")), e["dur"] / 1e3)
            op_of[node] = e["args"]["op_name"]
    by_op: dict[str, float] = {}
    count: dict[str, int] = {}
    for node, ms in fastest.items():
        by_op[op_of[node]] = by_op.get(op_of[node], 0.0) + ms
        count[op_of[node]] = count.get(op_of[node], 0) + 1
    return KernelTime(sum(fastest.values()), by_op, count, runs, threads)


# ----------------------------------------------------------------------------------------------
# profile
# ----------------------------------------------------------------------------------------------


def profile(model: nn.Module, input_shape: Sequence[int], *, latency: bool = True, threads: int = 1,
            runs: int = 20, name: str | None = None) -> Profile:
    """Profile a plain backbone, a :class:`GatedModel` or a :class:`LeanModel` (see module docstring).

    Args:
        model: the model; it is put in eval mode for the measurements and restored after.
        input_shape: ``(B, C, H, W)`` (or any ``(B, ...)`` the model takes).
        latency: export to ONNX and time with ONNX Runtime (a gated model: its pruned model).
        threads: ORT intra-op threads.
        runs: timed runs after 3 warm-up runs.
        name: label in tables; defaults to the backbone's class name.
    """
    shape = _check_shape(input_shape)
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, GatedModel):
            prof = _profile_gated(model, shape)
        elif isinstance(model, LeanModel):
            prof = _profile_lean(model, shape)
        else:
            measured = measure_flops(model, shape)
            _warn_uncounted(measured, model)
            prof = Profile(name="", kind="backbone", input_shape=shape, tasks=(), flops=measured.total,
                           params=count_params(model), uncounted_ops=measured.uncounted)
        inner = model.backbone if isinstance(model, (GatedModel, LeanModel)) else model
        prof.name = name or _model_name(inner)
        if latency:
            if isinstance(model, GatedModel):
                prof.latency = measure_latency(prune(model).eval(), shape, threads=threads, runs=runs)
                prof.latency.of = "prune(model)"
                prof.notes.append("a gated model does not export (its gates are training-only): "
                                  "the latency is that of prune(model)")
            else:
                prof.latency = measure_latency(model, shape, threads=threads, runs=runs)
    finally:
        model.train(was_training)
    return prof


def _model_name(module: nn.Module) -> str:
    cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"])
    return type(module).__name__


def _profile_gated(model: GatedModel, shape: tuple[int, ...]) -> Profile:
    batch = shape[0]
    info = analyze(model, shape)
    slots = computed_slots(model)
    names = ["shared", *model.tasks]
    gated = _gated_names(model)
    ungated = _ungated_slot_modules(model.backbone, gated)
    by = measure_flops(shared_branch(model), shape).by_module if ungated or model.shared_modules else {}
    ungated_rows = [UngatedLayer(n, type(m.slots[0]).__name__, _ungated_reason(m.slots[0]), by.get(n, 0))
                    for n, m in ungated]
    per_slot_ungated = sum(u.flops_per_slot for u in ungated_rows)

    gated_flops = [0.0] * model.num_slots
    for gate, cost in zip(model.gates(), info.costs):
        open_ = gate.open_mask().cpu().to(torch.float64)
        gated_flops[0] += float((cost * (1 - open_.prod(0))).sum())
        for t in range(len(model.tasks)):
            gated_flops[t + 1] += float((cost * open_[t]).sum())
    slot_rows = []
    for s in range(model.num_slots):
        params = sum(_slot_params(m.slots[s]) for m in model.backbone.modules() if isinstance(m, SlotModule))
        on = s in slots
        flops = int(round(batch * gated_flops[s])) + (per_slot_ungated if on else 0)
        slot_rows.append(SlotStats(names[s], params, flops, on))
    gate_params = sum(p.numel() for g in model.unique_gates() for p in g.parameters())
    params = count_params(model)
    predicted = predict_flops(model, shape)
    measured = measure_flops(model, shape)
    _warn_uncounted(measured, model)
    k, runs = _runs(slots)
    shared = [SharedModule(n, type(model.backbone.get_submodule(n)).__name__, why,
                           by.get(n, 0) * (runs if n in model.batch_independent else k))
              for n, why in model.shared_modules.items()]
    prof = Profile(name="", kind="gated", input_shape=shape, tasks=model.tasks, flops=measured.total,
                   params=params, predicted_flops=predicted, shared=shared, uncounted_ops=measured.uncounted,
                   slot_independent_flops=predicted - sum(r.flops for r in slot_rows),
                   slot_independent_params=params - gate_params - sum(r.params for r in slot_rows),
                   gate_params=gate_params, slots=slot_rows, layers=_gated_layers(model), ungated=ungated_rows,
                   computed_slots=slots)
    if len(slots) < model.num_slots:
        prof.notes.append(f"prune(model) folds only {len(slots)} of {model.num_slots} slots (see prune.computed_slots)")
    return prof


def _shared_leaves(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """Parameter-owning leaf modules outside every per-slot module: one copy for every slot."""
    out, skip = [], []
    for n, m in backbone.named_modules():
        if any(n.startswith(p + ".") for p in skip):
            continue
        if isinstance(m, (SlotModule, LeanGatedLayer)):
            skip.append(n)
        elif n and is_slot_unit(m):
            out.append((n, m))
    return out


def _profile_lean(model: LeanModel, shape: tuple[int, ...]) -> Profile:
    measured = measure_flops(model, shape)
    _warn_uncounted(measured, model)
    by = measured.by_module
    names = ["shared", *model.tasks]
    layers = model.lean_layers()
    ungated = _ungated_slot_modules(model.backbone, set())
    slot_flops = [0] * model.num_slots
    slot_params = [0] * model.num_slots
    for n, layer in layers:
        for s in range(layer.num_slots):
            if layer.present[s]:
                slot_flops[s] += by.get(f"backbone.{n}.branches.{s}", 0)
                slot_params[s] += _slot_params(layer.branches[s])
    ungated_rows = []
    for n, m in ungated:
        per = [by.get(f"backbone.{n}.slots.{i}", 0) for i in range(m.num_slots)]
        ungated_rows.append(UngatedLayer(n, type(m.slots[0]).__name__, _ungated_reason(m.slots[0]), max(per, default=0)))
        for s in range(m.num_slots):  # prune folds fewer slots only when there is no ungated module
            slot_flops[s] += per[s]
            slot_params[s] += _slot_params(m.slots[s])
    total = measured.total
    params = count_params(model)
    slot_rows = [SlotStats(names[s], slot_params[s], slot_flops[s], s in model.slots) for s in range(model.num_slots)]
    shared = [SharedModule(n, type(m).__name__, "one copy for every slot", by.get(f"backbone.{n}", 0))
              for n, m in _shared_leaves(model.backbone)]
    prof = Profile(name="", kind="lean", input_shape=shape, tasks=model.tasks, flops=total, params=params,
                   shared=shared, uncounted_ops=measured.uncounted,
                   slot_independent_flops=total - sum(slot_flops),
                   slot_independent_params=params - sum(slot_params), slots=slot_rows,
                   layers=_lean_layers(model), ungated=ungated_rows, computed_slots=tuple(model.slots))
    prof.notes.append(_execution_note(model))
    return prof


def _execution_note(model: LeanModel) -> str:
    """How the lean model runs its slots: per-slot streams, folded on the batch axis (and why), or one slot."""
    if len(model.slots) == 1:
        return "one slot computed: the lean model is the plain backbone"
    if model.streams:
        layers = [m for _, m in model.lean_layers()]
        deferred = sum(m.defer for m in layers)
        note = "slots run as per-slot streams (no slot split or concat at any layer)"
        if deferred == len(layers):
            return note + "; every gated layer's restore is deferred past the channel-wise ops after it"
        return (note + f"; restores deferred at {deferred} of {len(layers)} gated layers"
                + (f" (not at the others: {model.deferred_reason})" if model.deferred_reason else ""))
    if model.task_networks is not None:
        return "every gate open: one plain network per task"
    return ("slots run FOLDED on the batch axis at every layer (a split and a concat of the slots per gated layer): "
            f"per-slot streams could not run this backbone ({model.folded_reason or 'disabled'})")


def compare(profiles: Sequence[Profile]) -> str:
    """Markdown table of several profiles side by side, ratios relative to the first."""
    if not profiles:
        return ""
    ref = profiles[0]
    lines = ["| model | kind | FLOPs (fvcore, multiply-adds) | x first | params | x first | latency median | p90 | x first |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in profiles:
        lat = p.latency
        lat_s = f"{lat.median_ms:.2f} ms" + ("" if lat.of == "model" else f" ({lat.of})") if lat else "-"
        p90 = f"{lat.p90_ms:.2f} ms" if lat else "-"
        lat_r = f"{lat.median_ms / ref.latency.median_ms:.2f}" if lat and ref.latency else "-"
        flops = p.predicted_flops if p.predicted_flops is not None else p.flops
        label = " (after prune)" if p.predicted_flops is not None else ""
        lines.append(f"| {p.name} | {p.kind} | {_g(flops)}{label} | {flops / max(ref.flops, 1):.2f} | {_m(p.params)} | "
                     f"{p.params / max(ref.params, 1):.2f} | {lat_s} | {p90} | {lat_r} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _shape(text: str) -> tuple[int, ...]:
    """``B,C,H,W``; ``C,H,W`` and ``HxW`` (3 channels) get batch 1."""
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected B,C,H,W such as 1,3,224,224, got {text!r}") from None
    if len(shape) == 2:
        shape = (1, 3, *shape)
    elif len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or any(v <= 0 for v in shape):
        raise argparse.ArgumentTypeError(f"expected positive B,C,H,W such as 1,3,224,224, got {text!r}")
    return shape


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gatedmtl profile",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="FLOPs, params, per-slot/per-layer tables and ONNX Runtime CPU latency of a timm backbone, "
                    "its gated model (random gates at --density, for demonstration) and the lean model it prunes to; "
                    "or of a checkpoint (gated: with its trained gates; lean). FLOPs are fvcore's count: one "
                    "multiply-add = one FLOP (what timm and most papers call MACs).")
    p.add_argument("model", help="timm model name (built with pretrained=False), or a .safetensors checkpoint "
                                 "written by gatedmtl train / prune")
    p.add_argument("--tasks", default="seg,depth,normals", help="comma-separated task names (timm model only)")
    p.add_argument("--density", type=float, default=0.5,
                   help="fraction of channels each task opens, at random (0 = all closed, 1 = all open)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random gates")
    p.add_argument("--mix", default="hard", choices=["soft", "hard"],
                   help="shared-branch mix of the converted timm model (hard: a one-hot choice of task per channel, "
                        "what a run trained with the default --mix anneal ends with; soft: the softmax mix)")
    p.add_argument("--tie-depthwise", action="store_true",
                   help="convert the timm model with tied depthwise gates (see gatedmtl train --tie-depthwise)")
    p.add_argument("--tie-residual", action="store_true",
                   help="convert the timm model with one gate per residual stream (see gatedmtl train --tie-residual)")
    p.add_argument("--skip-depthwise-mix", action="store_true",
                   help="convert with no shared mix in front of tied depthwise convs (see gatedmtl train "
                        "--skip-depthwise-mix; needs --tie-depthwise)")
    p.add_argument("--gate-structure", default="free", choices=["free", "prefix"],
                   help="convert with this gate structure (see gatedmtl train --gate-structure)")
    p.add_argument("--input", type=_shape, default=None,
                   help="B,C,H,W, C,H,W or HxW (default: batch 1 at timm's input size)")
    p.add_argument("--features-only", action="store_true", help="build the timm model with features_only=True")
    p.add_argument("--json", default=None, help="also write the profiles to this JSON file")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.add_argument("--no-latency", action="store_true", help="skip the ONNX export and ORT timing")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    p.add_argument("--runs", type=int, default=20, help="timed ORT runs (after 3 warm-up runs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``gatedmtl profile MODEL [options]`` (``argv``: the arguments after ``profile``)."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.json:
            from .files import check_output

            check_output(args.json, force=args.force)
        if Path(args.model).suffix == ".safetensors" or Path(args.model).is_file():
            profiles = _checkpoint_profiles(args)
        else:
            profiles = _timm_profiles(args)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(compare(profiles))
    for prof in profiles[1:]:
        print(prof.table())
    if args.json:
        Path(args.json).write_text(json.dumps({p.kind: p.as_dict() for p in profiles}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _checkpoint_profiles(args: argparse.Namespace) -> list[Profile]:
    """Backbone, gated (trained gates, as saved) and lean profiles of a training or lean checkpoint."""
    from .cost import shared_branch
    from .train import load_network

    net, meta = load_network(args.model)
    encoder = net.encoder
    if not isinstance(encoder, (GatedModel, LeanModel)):
        raise ValueError(f"{args.model} is a hard-sharing ('shared' arch) run: its encoder is the plain "
                         f"{meta['config']['model']}; profile the timm model by name instead")
    shape = args.input or (1, *meta["input_size"])
    opts = dict(latency=not args.no_latency, threads=args.threads, runs=args.runs)
    if isinstance(encoder, GatedModel):
        backbone = shared_branch(encoder)
        return [profile(backbone, shape, **opts), profile(encoder, shape, latency=False),
                profile(prune(encoder).eval(), shape, **opts)]
    return [_plain_of_lean(meta, shape, opts), profile(encoder, shape, **opts)]


def _plain_of_lean(meta: dict[str, Any], shape: tuple[int, ...], opts: dict[str, Any]) -> Profile:
    from .network import build_backbone

    backbone = build_backbone(meta["config"]["model"], in_chans=int(meta["input_size"][0])).eval()
    return profile(backbone, shape, **opts)


def _timm_profiles(args: argparse.Namespace) -> list[Profile]:
    import timm

    from .surgery import convert, default_input_size
    from .tasks import available_tasks
    from .verify import set_gates

    if not 0.0 <= args.density <= 1.0:
        raise ValueError(f"--density must lie in [0, 1], got {args.density}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in available_tasks()]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {', '.join(available_tasks())}")
    if args.model not in timm.list_models():
        close = timm.list_models(f"*{args.model}*")[:8]
        raise ValueError(f"unknown timm model {args.model!r}" + (f"; did you mean one of {close}?" if close else ""))
    kwargs = {"features_only": True} if args.features_only else {}
    backbone = timm.create_model(args.model, pretrained=False, **kwargs).eval()
    shape = args.input or (1, *default_input_size(backbone))
    gated = convert(backbone, tasks, input_size=shape[1:], mix=args.mix, tie_depthwise=args.tie_depthwise,
                    tie_residual=args.tie_residual, skip_depthwise_mix=args.skip_depthwise_mix,
                    gate_structure=args.gate_structure).eval()
    set_gates(gated, args.density, torch.Generator().manual_seed(args.seed))
    lean = prune(gated).eval()
    opts = dict(latency=not args.no_latency, threads=args.threads, runs=args.runs)
    return [profile(backbone, shape, **opts), profile(gated, shape, latency=False), profile(lean, shape, **opts)]


if __name__ == "__main__":
    sys.exit(main())
