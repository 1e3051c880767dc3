"""Export a lean multi-task model to ONNX, check it against PyTorch, and optionally quantize it to int8.

Works on any ``nn.Module`` whose forward takes one image batch ``(N, C, H, W)`` and returns a dict
``{task_name: tensor | list[tensor] | tuple[tensor, ...]}``.

ONNX naming contract (read back by the stand-alone runner in ``export/run.py``):

* the single input is called ``"image"`` and has a dynamic batch axis named ``"batch"``;
* a task returning a tensor becomes the output ``"{task}"``;
* a task returning a list/tuple becomes the outputs ``"{task}.0"``, ``"{task}.1"``, ...;
* an output that is the very tensor an earlier task returned (a lean model whose tasks all borrow
  a level from the shared branch) is exported once, under the earlier task's name: ONNX Runtime
  would otherwise copy it once per extra graph output. The later task's entry in the metadata
  names that output (``{"task": "c", "kind": "list", "outputs": ["b.0", "c.1"]}``);
* the structure is stored as JSON in the model's ``metadata_props`` under the key
  :data:`METADATA_KEY`, e.g. ``{"version": 1, "input": {...}, "tasks": [{"task": "b", "kind": "list",
  "outputs": ["b.0", "b.1"]}]}``.

Public API: :func:`export_onnx`, :func:`quantize_int8`, :func:`compare_outputs`, :func:`relative_error`,
:class:`ExportReport`, :class:`QuantReport`, :class:`OutputQuantStats`, :class:`ExportError`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .files import check_not_special, check_output, remove_stale_temps, replace_file, temp_path

__all__ = [
    "METADATA_KEY",
    "INPUT_NAME",
    "BATCH_AXIS_NAME",
    "ExportError",
    "ExportReport",
    "OutputQuantStats",
    "QuantReport",
    "compare_outputs",
    "export_onnx",
    "quantize_int8",
    "relative_error",
]

METADATA_KEY = "gatedmtl.structure"
"""metadata_props key holding the JSON description of inputs and task outputs."""
INPUT_NAME = "image"
BATCH_AXIS_NAME = "batch"
STRUCTURE_VERSION = 1

#: Models whose parameters + buffers exceed this size are saved with external data by default.
EXTERNAL_DATA_THRESHOLD_BYTES = int(1.5 * 2**30)
#: Hard protobuf limit: a single .onnx file cannot hold more than this.
PROTOBUF_LIMIT_BYTES = 2**31 - 1

#: Deprecation warnings emitted by torch's TorchScript ONNX exporter itself (silenced locally, nowhere else).
_TORCHSCRIPT_DEPRECATIONS = (
    "You are using the legacy TorchScript-based ONNX export",
    "The feature will be removed. Please remove usage of this function",
)


class ExportError(RuntimeError):
    """The exported ONNX model does not reproduce the PyTorch model (or could not be run at all)."""


# --------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ExportReport:
    """What :func:`export_onnx` produced.

    Attributes:
        path: the ``.onnx`` file.
        outputs: ONNX output name -> shape of that output for ``input_shape`` (PyTorch forward), in output order.
        tasks: task name -> its ONNX output names (one name for a tensor task, ``task.i`` for list tasks;
            an output that is an earlier task's tensor is named as that task's output).
        max_rel_error: ONNX output name -> worst scale-aware relative error vs PyTorch over the checked batch
            sizes (empty when ``check=False``).
        checked_batches: batch sizes run through onnxruntime during the check.
        export_seconds: wall time of the exporter call plus saving.
        check_seconds: wall time of the onnxruntime parity check (0 when not checked).
        file_size_bytes: size of the ``.onnx`` file plus its external data file, if any.
        external_data_path: ``path + ".data"`` when weights are stored externally, else ``None``.
        exporter: ``"torchscript"`` or ``"dynamo"``.
        opset: the default-domain opset of the written model.
    """

    path: Path
    outputs: dict[str, tuple[int, ...]]
    tasks: dict[str, list[str]]
    max_rel_error: dict[str, float]
    checked_batches: list[int]
    export_seconds: float
    check_seconds: float
    file_size_bytes: int
    external_data_path: Path | None
    exporter: str
    opset: int

    def summary(self) -> str:
        """Human-readable multi-line summary."""
        lines = [
            f"ONNX export: {self.path} ({self.file_size_bytes / 2**20:.2f} MiB"
            + (f", weights in {self.external_data_path.name}" if self.external_data_path else "")
            + f"), exporter={self.exporter}, opset={self.opset}, {self.export_seconds:.1f} s",
        ]
        for name, shape in self.outputs.items():
            err = self.max_rel_error.get(name)
            err_s = f"  rel.err {err:.2e}" if err is not None else ""
            lines.append(f"  {name:<24} {tuple(shape)}{err_s}")
        if self.checked_batches:
            lines.append(f"  checked with onnxruntime at batch {self.checked_batches} in {self.check_seconds:.1f} s")
        return "\n".join(lines)


@dataclass
class OutputQuantStats:
    """Accuracy change of one output, int8 vs float, over the calibration batches.

    Attributes:
        mean_abs_diff: mean of ``|int8 - float|`` over all elements of all batches.
        rel_error: scale-aware relative error ``max|int8 - float| / max(max|float|, 1e-6)``.
        argmax_agreement: for outputs with a channel axis (rank >= 2, ``shape[1] >= 2``, e.g. class or
            segmentation logits) the % of positions where argmax over axis 1 agrees; else ``None``.
    """

    mean_abs_diff: float
    rel_error: float
    argmax_agreement: float | None
    angle_error_deg: float | None = None
    metric: str = "rel_error"

    def worst(self) -> tuple[str, float, bool]:
        """``(what, value, bad)``: the metric that fits the output and whether it is large."""
        if self.metric == "argmax_agreement" and self.argmax_agreement is not None:
            return "argmax agreement %", self.argmax_agreement, self.argmax_agreement < QUANT_WARN_AGREEMENT
        if self.metric == "angle_error_deg" and self.angle_error_deg is not None:
            return "mean angle error deg", self.angle_error_deg, self.angle_error_deg > QUANT_WARN_ANGLE
        return "relative error", self.rel_error, self.rel_error > QUANT_WARN_REL


QUANT_WARN_AGREEMENT = 95.0  # % of positions whose argmax int8 and float agree
QUANT_WARN_ANGLE = 5.0  # degrees between int8 and float normal vectors
QUANT_WARN_REL = 0.1  # scale-aware relative error of a regression output


@dataclass
class QuantReport:
    """What :func:`quantize_int8` produced."""

    path: Path
    float_path: Path
    outputs: dict[str, OutputQuantStats]
    calibration_batches: int
    float_size_bytes: int
    int8_size_bytes: int
    quantize_seconds: float
    preprocessed: bool
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Human-readable multi-line summary."""
        lines = [
            f"int8 QDQ model: {self.path} ({self.int8_size_bytes / 2**20:.2f} MiB, float "
            f"{self.float_size_bytes / 2**20:.2f} MiB), {self.calibration_batches} calibration batches, "
            f"{self.quantize_seconds:.1f} s"
        ]
        for name, s in self.outputs.items():
            agree = f"  argmax agree {s.argmax_agreement:.1f}%" if s.argmax_agreement is not None else ""
            agree += f"  angle {s.angle_error_deg:.2f} deg" if s.angle_error_deg is not None else ""
            lines.append(f"  {name:<24} mean|d| {s.mean_abs_diff:.3e}  rel.err {s.rel_error:.3e}{agree}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def warnings(self) -> list[str]:
        """One line per output whose int8 error is large by the metric that fits it."""
        out = []
        for name, s in self.outputs.items():
            what, value, bad = s.worst()
            if bad:
                out.append(f"int8 output {name}: {what} {value:.3g} (float vs int8 on the calibration batches); "
                           "check its accuracy before deploying, or keep the float model")
        return out

    def write_report(self, path: str | Path, force: bool = False) -> Path:
        """Write the accuracy report as JSON next to the int8 model."""
        path = Path(path)
        check_output(path, force=force)
        data = {"model": str(self.path), "float_model": str(self.float_path),
                "calibration_batches": self.calibration_batches, "float_size_bytes": self.float_size_bytes,
                "int8_size_bytes": self.int8_size_bytes, "notes": self.notes, "warnings": self.warnings(),
                "outputs": {n: {**s.__dict__, "checked_metric": s.worst()[0], "value": s.worst()[1], "large": s.worst()[2]}
                            for n, s in self.outputs.items()}}
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path


# --------------------------------------------------------------------------------------------------------------
# Comparison helpers
# --------------------------------------------------------------------------------------------------------------


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """Scale-aware relative error ``max|a - b| / max(max|b|, 1e-6)`` of two same-shape arrays.

    Returns ``inf`` for a shape mismatch or when NaNs appear in only one of the two arrays.
    """
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if not np.array_equal(nan_a, nan_b):
        return float("inf")
    keep = ~nan_b
    if not keep.any():
        return 0.0
    diff = np.abs(a[keep] - b[keep])
    if not np.isfinite(diff).all():  # infs that do not match exactly
        same = a[keep] == b[keep]
        if not same[~np.isfinite(diff)].all():
            return float("inf")
        diff = np.where(same, 0.0, diff)
    scale = max(float(np.max(np.abs(b[keep][np.isfinite(b[keep])]), initial=0.0)), 1e-6)
    return float(np.max(diff)) / scale


def compare_outputs(
    actual: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], rtol: float, *, what: str = "ONNX"
) -> dict[str, float]:
    """Compare named outputs by :func:`relative_error`; raise :class:`ExportError` if any exceeds ``rtol``.

    Args:
        actual: output name -> array from the exported model.
        reference: output name -> array from PyTorch; must have the same names.
        rtol: largest accepted relative error.
        what: label used in the error message.

    Returns:
        output name -> relative error.
    """
    missing = sorted(set(reference) - set(actual))
    extra = sorted(set(actual) - set(reference))
    if missing or extra:
        raise ExportError(f"{what} outputs do not match the PyTorch outputs: missing {missing}, unexpected {extra}")
    errors: dict[str, float] = {}
    for name, ref in reference.items():
        got = actual[name]
        if tuple(np.shape(got)) != tuple(np.shape(ref)):
            raise ExportError(
                f"{what} output {name!r} has shape {tuple(np.shape(got))}, PyTorch gives {tuple(np.shape(ref))}"
            )
        errors[name] = relative_error(got, ref)
    if errors:
        worst = max(errors, key=lambda k: errors[k])
        if not errors[worst] <= rtol:
            raise ExportError(
                f"{what} output {worst!r} differs from PyTorch: relative error {errors[worst]:.3e} > rtol {rtol:.1e} "
                f"(all: {', '.join(f'{k}={v:.1e}' for k, v in errors.items())}). Unsupported or "
                f"training-only ops are the usual cause; try exporter='dynamo', another opset, or a larger rtol."
            )
    return errors


# --------------------------------------------------------------------------------------------------------------
# Output structure
# --------------------------------------------------------------------------------------------------------------


def _flatten_outputs(out: Any) -> tuple[list[dict[str, Any]], list[str], list[torch.Tensor]]:
    """Flatten ``{task: tensor | list[tensor]}`` into task records and the ONNX outputs (names and tensors, in order).

    A tensor that an earlier task already returned (the same object) is one ONNX output: the later
    task's record names the earlier output.

    Returns:
        (tasks, names, tensors) with ``tasks = [{"task": str, "kind": "tensor"|"list", "outputs": [names]}]``
        and ``names[i]`` the ONNX output holding ``tensors[i]`` (every tensor once).
    """
    if not isinstance(out, Mapping):
        raise TypeError(
            f"model forward must return a dict {{task_name: tensor | list of tensors}}, got {type(out).__name__}; "
            "wrap the model so that it returns a dict"
        )
    if not out:
        raise TypeError("model forward returned an empty dict: nothing to export")
    tasks: list[dict[str, Any]] = []
    tensors: list[torch.Tensor] = []
    for task, value in out.items():
        if not isinstance(task, str) or not task:
            raise TypeError(f"task names must be non-empty strings, got {task!r}")
        if isinstance(value, torch.Tensor):
            tasks.append({"task": task, "kind": "tensor", "outputs": [task]})
            tensors.append(value)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            names = [f"{task}.{i}" for i in range(len(value))]
            tasks.append({"task": task, "kind": "list", "outputs": names})
            tensors.extend(value)
        else:
            kind = type(value).__name__ if not isinstance(value, (list, tuple)) else "list/tuple holding non-tensors"
            raise TypeError(
                f"task {task!r}: output must be a tensor or a non-empty list/tuple of tensors, got {kind}"
            )
    names = [n for t in tasks for n in t["outputs"]]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes or INPUT_NAME in names:
        raise ValueError(
            f"ONNX output names collide: {dupes or [INPUT_NAME]}; rename the tasks "
            f"(a task may not be called {INPUT_NAME!r} or like another task's list element 'task.i')"
        )
    first: dict[int, str] = {}  # id(tensor) -> the ONNX output that holds it
    for name, tensor in zip(names, tensors):
        first.setdefault(id(tensor), name)
    output_of = {name: first[id(tensor)] for name, tensor in zip(names, tensors)}
    for t in tasks:
        t["outputs"] = [output_of[n] for n in t["outputs"]]
    exported = [(n, t) for n, t in zip(names, tensors) if output_of[n] == n]
    return tasks, [n for n, _ in exported], [t for _, t in exported]


class _FlatOutputs(nn.Module):
    """Wraps a dict-returning model so that forward returns the flat tuple of output tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)  # exporters restore the wrapper's mode afterwards, recursively

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """image (N, C, H, W) -> flat tuple of task outputs in ONNX output order."""
        return tuple(_flatten_outputs(self.model(image))[2])


# --------------------------------------------------------------------------------------------------------------
# Pre-flight checks
# --------------------------------------------------------------------------------------------------------------


def _refuse_gated(model: nn.Module) -> None:
    """Raise TypeError if any submodule is a gatedmtl gate (duck-typed via ``_gatedmtl_gate = True``)."""
    for name, module in model.named_modules():
        if getattr(module, "_gatedmtl_gate", False) is True:
            where = name or "<root>"
            raise TypeError(
                f"{type(model).__name__} is a gated training model (gate module {type(module).__name__} at "
                f"{where!r}); run gatedmtl.prune(model) first to obtain the lean model, then export that"
            )


def _check_output_path(path: Path, force: bool = False) -> None:
    """Fail fast (before the slow export) if ``path`` cannot or may not be written."""
    if path.is_dir():
        raise ValueError(f"output path {path} is a directory; give a file name such as {path / 'model.onnx'}")
    check_output(path, force=force)
    check_not_special(path.parent / (path.name + ".data"))


@contextlib.contextmanager
def _work_dir(path: Path, kind: str):
    """A temporary folder next to ``path`` (named with this process id, so a later run removes it after a kill)."""
    remove_stale_temps(path.parent)
    work = temp_path(path, kind)
    work.mkdir()
    try:
        yield str(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise ValueError(f"input_shape must be positive (N, C, ...), e.g. (1, 3, 224, 224); got {tuple(input_shape)}")
    return shape


def _model_nbytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _model_device(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------


def _torch_supports_dynamo_flag() -> bool:
    """True if ``torch.onnx.export`` has the ``dynamo=`` switch (torch >= 2.5)."""
    return "dynamo" in inspect.signature(torch.onnx.export).parameters


def _run_exporter(
    wrapper: nn.Module,
    example: torch.Tensor,
    out_file: Path,
    output_names: list[str],
    output_ranks: list[int],
    opset: int | None,
    exporter: str,
    external_data: bool,
) -> None:
    """Write ``wrapper`` to ``out_file`` (may spill extra weight files next to it)."""
    has_flag = _torch_supports_dynamo_flag()
    if exporter == "torchscript":
        dynamic_axes: dict[str, dict[int, str]] = {INPUT_NAME: {0: BATCH_AXIS_NAME}}
        for name, rank in zip(output_names, output_ranks):
            if rank >= 1:
                dynamic_axes[name] = {0: BATCH_AXIS_NAME}
        common: dict[str, Any] = dict(
            input_names=[INPUT_NAME], output_names=output_names, opset_version=opset, dynamic_axes=dynamic_axes
        )
        # Default exporter. Deprecated since torch 2.9 but still shipped (torch 2.14.1 included: dynamo=False)
        # and much faster on CPU with the same parity on our models: on 2 cores an HRNet-18 with 4 task branches
        # took 11 s vs 163 s with dynamo; a timm resnet18 (features_only) with 3 task heads at 224x224 took
        # 2.3 s vs 6.9 s, and dynamo's file was larger (44 vs 32 MiB, BatchNorm not folded). Its deprecation
        # warnings are silenced only inside this call.
        kwargs = dict(common, dynamo=False) if has_flag else common
        with warnings.catch_warnings():
            for message in _TORCHSCRIPT_DEPRECATIONS:
                warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
            # shape checks in Python (input validation, head sizes) are constants of the traced
            # graph by design; the batch axis stays dynamic and is checked against torch below
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(wrapper, (example,), str(out_file), **kwargs)
    else:
        if not has_flag:
            raise RuntimeError(f"exporter='dynamo' needs torch >= 2.5 (found {torch.__version__})")
        dynamic_shapes = ({0: torch.export.Dim(BATCH_AXIS_NAME)},)
        torch.onnx.export(
            wrapper, (example,), str(out_file), dynamo=True, external_data=external_data, verbose=False,
            input_names=[INPUT_NAME], output_names=output_names, opset_version=opset, dynamic_shapes=dynamic_shapes,
        )


def _resolve_exporter(exporter: str) -> str:
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    return exporter


def _structure_json(tasks: list[dict[str, Any]], input_shape: tuple[int, ...]) -> str:
    return json.dumps(
        {
            "version": STRUCTURE_VERSION,
            "input": {"name": INPUT_NAME, "shape": [BATCH_AXIS_NAME, *input_shape[1:]], "dtype": "float32"},
            "tasks": tasks,
        }
    )


RUNNER_METADATA_KEY = "gatedmtl.runner"


def _finalize_onnx(tmp_file: Path, path: Path, structure: str, external_data: bool, runner: str | None = None) -> int:
    """Load the raw export, attach metadata, save to ``path`` (+ ``path.data``) atomically; return the opset."""
    import onnx

    proto = onnx.load(str(tmp_file))  # also loads any external weight files next to it
    for prop in [p for p in proto.metadata_props if p.key in (METADATA_KEY, RUNNER_METADATA_KEY)]:
        proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, structure
    if runner is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = RUNNER_METADATA_KEY, runner
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)

    staging = tmp_file.parent / "final"
    staging.mkdir()
    staged = staging / path.name
    data_name = path.name + ".data"
    if external_data:
        onnx.save_model(
            proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
            location=data_name, size_threshold=1024,
        )
    else:
        onnx.save_model(proto, str(staged))
    _publish(staged, path)
    return opset


def _publish(staged: Path, path: Path) -> None:
    """Move a staged model (and its ``.data`` file, if any) into place; both get the .onnx file's permissions."""
    data_name = path.name + ".data"
    staged_data = staged.parent / data_name
    if staged_data.exists():
        os.chmod(staged_data, staged.stat().st_mode & 0o777)
        replace_file(staged_data, path.parent / data_name)
    replace_file(staged, path)


def _ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _torch_reference(model: nn.Module, image: torch.Tensor) -> dict[str, np.ndarray]:
    """Eval-mode, no-grad forward; returns ONNX output name -> float array."""
    with torch.no_grad():
        _, names, tensors = _flatten_outputs(model(image))
    return {n: t.detach().float().cpu().numpy() for n, t in zip(names, tensors)}


def _onnx_outputs(session, image: np.ndarray, input_name: str = INPUT_NAME) -> dict[str, np.ndarray]:
    """Run an onnxruntime session on one batch; returns output name -> array."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {input_name: image})))


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: tuple[int, ...],
    *,
    opset: int | None = None,
    check: bool = True,
    rtol: float = 1e-4,
    external_data: bool | None = None,
    exporter: str = "torchscript",
    check_dynamic_batch: bool = True,
    force: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> ExportReport:
    """Export a lean multi-task model to ONNX with named, flattened task outputs and a dynamic batch axis.

    Args:
        model: ``nn.Module`` mapping an image batch ``(N, C, H, W)`` float32 to
            ``{task: tensor | list[tensor]}``. Must not contain gate modules (prune first).
        path: destination ``.onnx`` file; its folder must exist.
        input_shape: example input shape ``(N, C, H, W)``; the batch axis is exported as dynamic.
        opset: ONNX opset; ``None`` = the exporter's default (20 for TorchScript in torch 2.14).
        check: run onnxruntime on a random input of ``input_shape`` and compare with PyTorch.
        rtol: largest accepted scale-aware relative error per output (see :func:`relative_error`).
        external_data: store weights in ``path + ".data"``; ``None`` = only if the model exceeds 1.5 GiB.
        exporter: ``"torchscript"`` (default, fast) or ``"dynamo"`` (torch.export based).
        check_dynamic_batch: with ``check``, also verify a second batch size (2 if N == 1 else 1).
        force: replace an existing ``path`` (a regular file only; nothing else is ever replaced).
        metadata: extra JSON-able facts for the runner (e.g. ``{"normalization": {"mean": [...], "std": [...]},
            "task_spec": {...}}``), stored under the ``gatedmtl.runner`` metadata key.

    Returns:
        :class:`ExportReport`.

    Raises:
        TypeError: gated model, or forward output not a ``{task: tensor | list[tensor]}`` dict.
        FileNotFoundError / PermissionError / ValueError: bad output path or arguments (raised before exporting).
        ExportError: the exporter failed, onnxruntime cannot run the file, or an output differs by more than ``rtol``.
    """
    exporter = _resolve_exporter(exporter)
    path = Path(path).expanduser().absolute()
    shape = _check_input_shape(input_shape)
    _refuse_gated(model)
    _check_output_path(path, force)
    nbytes = _model_nbytes(model)
    if external_data is None:
        external_data = nbytes > EXTERNAL_DATA_THRESHOLD_BYTES
    elif not external_data and nbytes > PROTOBUF_LIMIT_BYTES:
        raise ValueError(
            f"model weights are {nbytes / 2**30:.2f} GiB, above the 2 GiB ONNX protobuf limit; "
            "use external_data=True (or None)"
        )

    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        gen = torch.Generator().manual_seed(0)
        image = torch.randn(shape, generator=gen).to(device)
        with torch.no_grad():
            tasks, names, tensors = _flatten_outputs(model(image))
        reference = {n: t.detach().float().cpu().numpy() for n, t in zip(names, tensors)}
        ranks = [t.dim() for t in tensors]
        # Trace with batch >= 2: a batch of 1 invites size-1 specialisation (broadcasting, torch.export 0/1 rule).
        trace_batch = shape[0] if shape[0] >= 2 else 2
        example = torch.randn((trace_batch, *shape[1:]), generator=gen).to(device)

        with _work_dir(path, "export") as tmp:
            raw = Path(tmp) / "raw.onnx"
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    _run_exporter(
                        _FlatOutputs(model).eval(), example, raw, names, ranks, opset, exporter, external_data
                    )
            except Exception as exc:  # noqa: BLE001 - re-raised with the exporter named and a way out
                other = "dynamo" if exporter == "torchscript" else "torchscript"
                raise ExportError(
                    f"torch.onnx.export ({exporter} exporter) failed: {type(exc).__name__}: {exc}\n"
                    f"Try exporter={other!r} or another opset; the model must be traceable with one image input."
                ) from exc
            opset_used = _finalize_onnx(raw, path, _structure_json(tasks, shape), external_data,
                                        json.dumps(dict(metadata)) if metadata else None)
            export_seconds = time.perf_counter() - t0

        data_path = path.parent / (path.name + ".data")
        file_size = path.stat().st_size + (data_path.stat().st_size if external_data and data_path.exists() else 0)

        errors: dict[str, float] = {}
        batches: list[int] = []
        check_seconds = 0.0
        if check:
            t0 = time.perf_counter()
            try:
                session = _ort_session(path)
            except Exception as exc:  # noqa: BLE001 - any ORT load failure is an export failure
                raise ExportError(f"onnxruntime cannot load the exported model {path}: {exc}") from exc
            checks = [(shape[0], image, reference)]
            if check_dynamic_batch:
                b2 = 2 if shape[0] == 1 else 1
                img2 = torch.randn((b2, *shape[1:]), generator=gen).to(device)
                checks.append((b2, img2, _torch_reference(model, img2)))
            for batch, img, ref in checks:
                try:
                    got = _onnx_outputs(session, img.cpu().numpy())
                except Exception as exc:  # noqa: BLE001
                    raise ExportError(f"onnxruntime failed to run {path} at batch {batch}: {exc}") from exc
                for name, err in compare_outputs(got, ref, rtol, what=f"ONNX (batch {batch})").items():
                    errors[name] = max(errors.get(name, 0.0), err)
                batches.append(batch)
            check_seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)

    return ExportReport(
        path=path,
        outputs={n: tuple(r.shape) for n, r in reference.items()},
        tasks={t["task"]: list(t["outputs"]) for t in tasks},
        max_rel_error=errors,
        checked_batches=batches,
        export_seconds=export_seconds,
        check_seconds=check_seconds,
        file_size_bytes=file_size,
        external_data_path=data_path if external_data else None,
        exporter=exporter,
        opset=opset_used,
    )


# --------------------------------------------------------------------------------------------------------------
# int8 quantization
# --------------------------------------------------------------------------------------------------------------


def _calibration_reader(input_name: str, batches: list[np.ndarray]):
    """A fresh onnxruntime CalibrationDataReader yielding ``{input_name: batch}`` for each batch."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {input_name: batch}

    return _Reader()


def _file_size_with_data(path: Path) -> int:
    """Size of an .onnx file plus the external data files it references (if present next to it)."""
    import onnx

    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        e.value
        for t in model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    for loc in locations:
        f = path.parent / loc
        if f.exists():
            total += f.stat().st_size
    return total


_ARGMAX_TASKS = ("seg", "semseg", "classify", "classification", "class", "cls")
_ANGLE_TASKS = ("normals", "normal")


def _fitting_metric(name: str, tasks: Mapping[str, Any] | None) -> str | None:
    """The metric that fits output ``name`` (``task`` or ``task.i``) by its task, ``None`` when unknown."""
    if not tasks:
        return None
    task = name.split(".", 1)[0]
    if task not in tasks:
        return None
    spec = tasks[task]
    task = spec.get("task", task) if isinstance(spec, Mapping) else task  # e.g. {"left": {"task": "classify"}}
    if task in _ANGLE_TASKS:
        return "angle_error_deg"
    if task in _ARGMAX_TASKS or task.startswith(_ARGMAX_TASKS):
        return "argmax_agreement"
    return "rel_error"


def _angle_error(f: np.ndarray, q: np.ndarray) -> float:
    """Mean angle in degrees between float and int8 vectors along axis 1."""
    fn = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    return float(np.degrees(np.arccos(np.clip((fn * qn).sum(1), -1.0, 1.0))).mean())


def _quant_stats(
    float_outs: list[dict[str, np.ndarray]], int8_outs: list[dict[str, np.ndarray]],
    tasks: Mapping[str, Any] | None = None,
) -> dict[str, OutputQuantStats]:
    """Per-output accuracy of int8 vs float over all batches (with the metric that fits each task)."""
    stats: dict[str, OutputQuantStats] = {}
    for name in float_outs[0]:
        abs_sum, count, max_diff, max_ref = 0.0, 0, 0.0, 0.0
        agree, positions = 0, 0
        logits_like = True
        for f_out, q_out in zip(float_outs, int8_outs):
            f = f_out[name].astype(np.float64)
            q = q_out[name].astype(np.float64)
            d = np.abs(q - f)
            abs_sum += float(d.sum())
            count += d.size
            max_diff = max(max_diff, float(d.max(initial=0.0)))
            max_ref = max(max_ref, float(np.abs(f).max(initial=0.0)))
            if f.ndim >= 2 and f.shape[1] >= 2:
                eq = np.argmax(f, axis=1) == np.argmax(q, axis=1)
                agree += int(eq.sum())
                positions += eq.size
            else:
                logits_like = False
        metric = _fitting_metric(name, tasks)
        angle = None
        if metric == "angle_error_deg":
            angle = float(np.mean([_angle_error(f[name].astype(np.float64), q[name].astype(np.float64))
                                   for f, q in zip(float_outs, int8_outs)]))
        agreement = 100.0 * agree / positions if logits_like and positions else None
        if metric is None:
            metric = "argmax_agreement" if agreement is not None else "rel_error"
        stats[name] = OutputQuantStats(
            mean_abs_diff=abs_sum / max(count, 1),
            rel_error=max_diff / max(max_ref, 1e-6),
            argmax_agreement=agreement if metric == "argmax_agreement" else None,
            angle_error_deg=angle,
            metric=metric,
        )
    return stats


def quantize_int8(
    onnx_path: str | Path,
    out_path: str | Path,
    calibration: Iterable[np.ndarray],
    *,
    per_channel: bool = True,
    force: bool = False,
    tasks: Mapping[str, Any] | None = None,
) -> QuantReport:
    """Static int8 quantization (QDQ format) of an exported model, with an accuracy report.

    Args:
        onnx_path: float model written by :func:`export_onnx` (single input).
        out_path: destination of the int8 model; its folder must exist.
        calibration: batches ``(N, C, H, W)`` fed to the model for range calibration; the same batches are
            then used to compare int8 with float outputs. A few hundred images is typical; 1 batch works.
        per_channel: per-output-channel weight scales (better accuracy for convs).
        force: replace an existing ``out_path``.
        tasks: ``{task: ...}`` of the model (e.g. a checkpoint's task spec): each output is then judged by
            the metric that fits its task (argmax agreement for segmentation/classification, mean angle
            for normals, relative error otherwise); without it, argmax agreement for outputs with a
            channel axis.

    Returns:
        :class:`QuantReport` with per-output mean abs diff, relative error and argmax agreement.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    onnx_path = Path(onnx_path).expanduser().absolute()
    out_path = Path(out_path).expanduser().absolute()
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model {onnx_path} not found; export it first with export_onnx()")
    _check_output_path(out_path, force)
    float_session = _ort_session(onnx_path)
    if len(float_session.get_inputs()) != 1:
        raise ValueError(f"{onnx_path} has {len(float_session.get_inputs())} inputs; expected one image input")
    input_name = float_session.get_inputs()[0].name
    batches = [np.ascontiguousarray(b, dtype=np.float32) for b in calibration]
    if not batches:
        raise ValueError("calibration is empty; pass at least one input batch (N, C, H, W)")

    float_size = _file_size_with_data(onnx_path)
    use_external = float_size > EXTERNAL_DATA_THRESHOLD_BYTES
    notes: list[str] = []
    t0 = time.perf_counter()
    with _work_dir(out_path, "quant") as tmp:
        prepped = Path(tmp) / "prep.onnx"
        source = onnx_path
        preprocessed = False
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(
                str(onnx_path), str(prepped), save_as_external_data=use_external, all_tensors_to_one_file=True
            )
            source, preprocessed = prepped, True
        except Exception as exc:  # noqa: BLE001 - preprocessing is an optimisation; fall back to the raw model
            notes.append(f"quant_pre_process failed ({type(exc).__name__}: {exc}); quantized the model as exported")
        staged = Path(tmp) / out_path.name
        quantize_static(
            str(source),
            str(staged),
            _calibration_reader(input_name, batches),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            use_external_data_format=use_external,
        )
        # Keep the task structure (quantize_static may drop metadata_props) and mark the model as int8.
        src_meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
        qmodel = onnx.load(str(staged))
        have = {p.key for p in qmodel.metadata_props}
        for key, value in {**src_meta, "gatedmtl.quantization": "int8-qdq"}.items():
            if key not in have:
                entry = qmodel.metadata_props.add()
                entry.key, entry.value = key, value
        final = Path(tmp) / "final"
        final.mkdir()
        if use_external:
            onnx.save_model(
                qmodel, str(final / out_path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                location=out_path.name + ".data",
            )
        else:
            onnx.save_model(qmodel, str(final / out_path.name))
        _publish(final / out_path.name, out_path)
    quantize_seconds = time.perf_counter() - t0

    int8_session = _ort_session(out_path)
    float_outs = [_onnx_outputs(float_session, b, input_name) for b in batches]
    int8_outs = [_onnx_outputs(int8_session, b, input_name) for b in batches]
    return QuantReport(
        path=out_path,
        float_path=onnx_path,
        outputs=_quant_stats(float_outs, int8_outs, tasks),
        calibration_batches=len(batches),
        float_size_bytes=float_size,
        int8_size_bytes=_file_size_with_data(out_path),
        quantize_seconds=quantize_seconds,
        preprocessed=preprocessed,
        notes=notes,
    )

