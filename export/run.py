#!/usr/bin/env python3
"""Stand-alone edge runner for ONNX models exported by gatedmtl (or any single-input ONNX model).

Needs only onnxruntime, numpy and the Python standard library (Pillow only to read image files).
Copy this file next to ``model.onnx`` on the device; no torch, no gatedmtl.

CLI::

    python run.py model.onnx --input image.png|array.npy|random [--batch N] [--threads N]
                  [--warmup 5] [--runs 50] [--json out.json] [--save out.npz] [--force]
                  [--no-normalize] [--size HxW] [--providers CPUExecutionProvider]

``--save out.npz`` writes every output array, and a PNG map per dense task next to it
(``out.<task>.png``: class colours for segmentation, grey levels for depth, RGB for normals).
Images are standardised with the mean/std that gatedmtl stored in the model (ImageNet's when absent).

Library::

    from run import run_model, benchmark
    outputs = run_model("model.onnx", array)          # {output_name: np.ndarray}
    stats = benchmark("model.onnx", (1, 3, 224, 224))  # {"mean_ms": ..., "median_ms": ..., ...}

Exit codes: 0 ok, 2 user error (bad arguments, missing/unloadable model, unreadable or mis-shaped input),
1 unexpected failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

try:
    import onnxruntime as ort
except ImportError:  # reported as a user error when a model is loaded
    ort = None  # type: ignore[assignment]

__all__ = [
    "RunnerError",
    "benchmark",
    "group_outputs",
    "load_input",
    "load_session",
    "read_structure",
    "read_runner_metadata",
    "save_outputs",
    "dense_map",
    "run_model",
    "time_session",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
METADATA_KEY = "gatedmtl.structure"  # JSON written by gatedmtl.export.export_onnx
RUNNER_METADATA_KEY = "gatedmtl.runner"  # normalisation and task descriptions, also from export_onnx

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


class RunnerError(Exception):
    """A user-facing problem (model file, input, arguments): printed without traceback, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def load_session(path: str | os.PathLike, threads: int | None = None, providers: Sequence[str] | None = None):
    """Open ``path`` with onnxruntime.

    Args:
        path: ``.onnx`` file (external ``.data`` weights must sit next to it).
        threads: intra-op threads; ``None`` = onnxruntime default (one per physical core).
        providers: execution providers, default ``["CPUExecutionProvider"]``.

    Raises:
        RunnerError: onnxruntime missing, file missing, unknown provider or a file onnxruntime cannot load.
    """
    if ort is None:
        raise RunnerError("onnxruntime is not installed; install it with: pip install onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise RunnerError(f"model file not found: {path}")
    if threads is not None and threads < 1:
        raise RunnerError(f"--threads must be >= 1, got {threads}")
    providers = list(providers or ["CPUExecutionProvider"])
    unknown = [p for p in providers if p not in ort.get_available_providers()]
    if unknown:
        raise RunnerError(f"execution provider(s) {unknown} not available; available: {ort.get_available_providers()}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - InvalidProtobuf, NoSuchFile (external data), Fail, ...
        raise RunnerError(f"cannot load model {path}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _single_input(session) -> Any:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise RunnerError(f"the model has {len(inputs)} inputs {[i.name for i in inputs]}; this runner feeds one")
    return inputs[0]


def _input_dtype(session) -> np.dtype:
    inp = _single_input(session)
    if inp.type not in _ORT_DTYPES:
        raise RunnerError(f"unsupported input type {inp.type} for input {inp.name!r}")
    return np.dtype(_ORT_DTYPES[inp.type])


def read_structure(session) -> dict[str, Any] | None:
    """The gatedmtl task structure stored in the model metadata, or ``None`` for other models.

    Returns:
        e.g. ``{"version": 1, "input": {...}, "tasks": [{"task": "b", "kind": "list", "outputs": ["b.0", "b.1"]}]}``.
    """
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None


def read_runner_metadata(session) -> dict[str, Any]:
    """Normalisation (``{"normalization": {"mean", "std"}}``) and tasks that gatedmtl stored; ``{}`` if none."""
    raw = session.get_modelmeta().custom_metadata_map.get(RUNNER_METADATA_KEY)
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}


def group_outputs(outputs: dict[str, np.ndarray], structure: dict[str, Any] | None) -> dict[str, Any]:
    """Rebuild ``{task: array | list[array]}`` from flat named outputs (identity if ``structure`` is None)."""
    if not structure:
        return dict(outputs)
    grouped: dict[str, Any] = {}
    for task in structure.get("tasks", []):
        arrays = [outputs[n] for n in task["outputs"] if n in outputs]
        grouped[task["task"]] = arrays if task.get("kind") == "list" else (arrays[0] if arrays else None)
    return grouped


# ----------------------------------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------------------------------


def _dim_label(i: int, rank: int) -> str:
    """Human name of axis ``i`` ("batch", "channels", "height", "width" for rank-4 inputs)."""
    if rank == 4:
        return ("batch", "channels", "height", "width")[i]
    return "batch" if i == 0 else f"dim {i}"


def _describe(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else str(d or "?") for d in shape) + ")"


def check_input(session, array: np.ndarray) -> np.ndarray:
    """Validate ``array`` against the model input (rank, fixed dims, dtype kind) and cast floats to its dtype.

    Raises:
        RunnerError: rank or a fixed dimension does not match, or the dtype cannot be fed.
    """
    inp = _single_input(session)
    want = list(inp.shape)
    array = np.asarray(array)
    if array.ndim != len(want):
        raise RunnerError(
            f"input has shape {array.shape} (rank {array.ndim}) but the model input {inp.name!r} expects rank "
            f"{len(want)}: {_describe(want)}"
        )
    for i, (got, exp) in enumerate(zip(array.shape, want)):
        if isinstance(exp, int) and exp > 0 and got != exp:
            raise RunnerError(
                f"input has shape {array.shape} but the model expects {_describe(want)}: "
                f"{_dim_label(i, len(want))} is {got}, must be {exp}"
            )
    dtype = _input_dtype(session)
    if array.dtype != dtype:
        if np.issubdtype(dtype, np.floating) and (
            np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
        ):
            array = array.astype(dtype)
        else:
            raise RunnerError(f"input dtype {array.dtype} cannot be fed to a model expecting {dtype}")
    return np.ascontiguousarray(array)


def _spatial_size(session, size: tuple[int, int] | None) -> tuple[int, int]:
    """Model input H, W (``size`` overrides; required when the model's H/W are dynamic)."""
    shape = list(_single_input(session).shape)
    static = len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape[2:])
    if size is not None and static and tuple(size) != tuple(shape[2:]):
        raise RunnerError(f"the model has a fixed input size {shape[2]}x{shape[3]}; --size {size[0]}x{size[1]} "
                          "applies only to models with a dynamic height/width: drop it (images are resized to the "
                          "model's size)")
    if size is not None:
        return size
    if len(shape) != 4:
        raise RunnerError(f"image input needs a model with (N, C, H, W) input, this one has {_describe(shape)}")
    h, w = shape[2], shape[3]
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        raise RunnerError(f"the model input {_describe(shape)} has dynamic height/width; pass --size HxW")
    return h, w


def _channels(session) -> int:
    shape = list(_single_input(session).shape)
    c = shape[1] if len(shape) == 4 else None
    return c if isinstance(c, int) and c > 0 else 3


def load_image(path: str | os.PathLike, channels: int, size: tuple[int, int], normalize: bool = True,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               notes: list[str] | None = None) -> np.ndarray:
    """Read an image file into a ``(1, C, H, W)`` float32 array.

    Resized (bilinear) to ``size`` = (H, W), with a line in ``notes`` when the size changes; scaled to
    [0, 1]; with ``normalize`` then standardised with ``mean``/``std`` (default: ImageNet's; grey images:
    the channel averages). ``channels`` must be 1 or 3.
    """
    try:
        from PIL import Image
    except ImportError as exc:
        raise RunnerError(
            "reading image files needs Pillow (pip install pillow); or pass a .npy array or 'random'"
        ) from exc
    if channels not in (1, 3):
        raise RunnerError(f"the model takes {channels} channels; images give 1 or 3, pass a .npy array instead")
    try:
        with Image.open(path) as img:
            if img.size != (size[1], size[0]) and notes is not None:
                notes.append(f"resized the image from {img.size[1]}x{img.size[0]} to the model's {size[0]}x{size[1]} "
                             "(HxW, bilinear, aspect ratio not kept)")
            img = img.convert("RGB" if channels == 3 else "L").resize((size[1], size[0]), Image.BILINEAR)
            pixels = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise RunnerError(f"cannot read image {path}: {_first_line(exc)}") from exc
    pixels = pixels.reshape(size[0], size[1], channels)
    if normalize:
        mean = list(mean or IMAGENET_MEAN)
        std = list(std or IMAGENET_STD)
        m = np.array(mean if channels == len(mean) else [np.mean(mean)] * channels, dtype=np.float32)
        sd = np.array(std if channels == len(std) else [np.mean(std)] * channels, dtype=np.float32)
        pixels = (pixels - m) / sd
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])


def _with_batch(array: np.ndarray, batch: int | None, source: str) -> np.ndarray:
    """Tile a batch-1 array to ``batch`` rows (no-op when ``batch`` is None or already matching)."""
    if batch is None or array.shape[0] == batch:
        return array
    if array.shape[0] != 1:
        raise RunnerError(f"{source} already has batch {array.shape[0]}; --batch {batch} can only tile a batch of 1")
    return np.repeat(array, batch, axis=0)


def load_input(
    spec: str,
    session,
    batch: int | None = None,
    size: tuple[int, int] | None = None,
    normalize: bool = True,
    seed: int = 0,
    notes: list[str] | None = None,
) -> np.ndarray:
    """Build the input batch from ``spec``: ``"random"``, a ``.npy`` file or an image file.

    * random: standard normal of the model's input shape, batch ``batch`` (default 1);
    * .npy: used as is (an array one rank short of the model input gets a batch axis; floats are cast);
    * image: see :func:`load_image`.

    Returns:
        array validated by :func:`check_input`.
    """
    if batch is not None and batch < 1:
        raise RunnerError(f"--batch must be >= 1, got {batch}")
    inp = _single_input(session)
    rank = len(inp.shape)
    if size is not None and rank == 4:
        _spatial_size(session, size)  # refuses a --size that a fixed-size model would ignore
    if spec == "random":
        shape = []
        for i, d in enumerate(inp.shape):
            if i == 0:
                shape.append(batch or (d if isinstance(d, int) and d > 0 else 1))
            elif isinstance(d, int) and d > 0:
                shape.append(d)
            elif size is not None and rank == 4 and i >= 2:
                shape.append(size[i - 2])
            else:
                raise RunnerError(f"the model input {_describe(inp.shape)} has a dynamic {_dim_label(i, rank)}; "
                                  "pass --size HxW or a .npy input")
        array = np.random.default_rng(seed).standard_normal(shape).astype(_input_dtype(session))
        return check_input(session, array)
    path = Path(spec)
    if not path.is_file():
        raise RunnerError(f"input file not found: {spec} (use an image, a .npy file or 'random')")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise RunnerError(f"cannot read {path} as a .npy array: {_first_line(exc)}") from exc
        if array.ndim == rank - 1:
            array = array[None]
        return check_input(session, _with_batch(array, batch, str(path)))
    if suffix in IMAGE_SUFFIXES:
        norm = read_runner_metadata(session).get("normalization") or {}
        image = load_image(path, _channels(session), _spatial_size(session, size), normalize,
                           norm.get("mean"), norm.get("std"), notes)
        return check_input(session, _with_batch(image, batch, str(path)))
    raise RunnerError(f"unsupported input {spec!r}: use an image ({', '.join(sorted(IMAGE_SUFFIXES))}), "
                      "a .npy file or 'random'")


# ----------------------------------------------------------------------------------------------------------------
# Run and benchmark
# ----------------------------------------------------------------------------------------------------------------


def _run(session, array: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, {_single_input(session).name: array})
    except Exception as exc:  # noqa: BLE001 - ORT raises InvalidArgument/Fail/RuntimeException for bad inputs
        raise RunnerError(f"the model rejected the input of shape {array.shape}: {_first_line(exc)}") from exc
    return dict(zip(names, values))


def run_model(path: str | os.PathLike, array: np.ndarray, threads: int | None = None) -> dict[str, np.ndarray]:
    """Run the model once on ``array`` (``(N, C, H, W)``; floats cast to the model dtype).

    Returns:
        output name -> array, in model output order (gatedmtl names: ``task`` or ``task.i``).
    """
    session = load_session(path, threads)
    return _run(session, check_input(session, array))


def time_session(session, array: np.ndarray, warmup: int = 5, runs: int = 50) -> dict[str, float | int]:
    """Latency of ``session.run`` on ``array``: warm-up runs excluded; times in milliseconds."""
    if warmup < 0 or runs < 1:
        raise RunnerError(f"need --warmup >= 0 and --runs >= 1, got {warmup} and {runs}")
    feed = {_single_input(session).name: array}
    names = [o.name for o in session.get_outputs()]
    for _ in range(warmup):
        session.run(names, feed)
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        session.run(names, feed)
        times[i] = (time.perf_counter() - t0) * 1e3
    return {
        "mean_ms": float(times.mean()),
        "median_ms": float(np.median(times)),
        "p90_ms": float(np.percentile(times, 90)),
        "min_ms": float(times.min()),
        "max_ms": float(times.max()),
        "runs": runs,
        "warmup": warmup,
    }


def _threads_label(threads: int | None) -> str:
    return str(threads) if threads else f"onnxruntime default ({os.cpu_count()} logical CPUs)"


def benchmark(
    path: str | os.PathLike, shape: Sequence[int], warmup: int = 5, runs: int = 50, threads: int | None = None
) -> dict[str, Any]:
    """Latency of the model on a random input of ``shape`` (e.g. ``(1, 3, 224, 224)``).

    Returns:
        ``{"mean_ms", "median_ms", "p90_ms", "min_ms", "max_ms", "runs", "warmup", "threads", "shape"}``.
    """
    session = load_session(path, threads)
    array = np.random.default_rng(0).standard_normal(tuple(shape)).astype(_input_dtype(session))
    array = check_input(session, array)
    _run(session, array)  # surfaces shape errors as RunnerError before timing
    stats: dict[str, Any] = dict(time_session(session, array, warmup, runs))
    stats.update(threads=_threads_label(threads), shape=list(array.shape))
    return stats


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def _parse_size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected HxW such as 224x224, got {text!r}")
    return parts[0], parts[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py", description="Run an ONNX model (gatedmtl export) with onnxruntime and time it."
    )
    p.add_argument("model", help="path to model.onnx")
    p.add_argument("--input", default="random", help="image file (png/jpg/...), .npy array, or 'random' (default)")
    p.add_argument("--batch", type=int, default=None, help="batch size (random input; tiles a single image/array)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's choice)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs (default 5)")
    p.add_argument("--runs", type=int, default=50, help="timed runs (default 50; 0 = no benchmark)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--save", type=Path, default=None,
                   help="write the outputs to this .npz file, and a PNG map per dense task next to it")
    p.add_argument("--force", action="store_true", help="overwrite existing --json / --save files")
    p.add_argument("--no-normalize", action="store_true",
                   help="images: only scale to [0, 1], skip the ImageNet mean/std normalisation")
    p.add_argument("--size", type=_parse_size, default=None, help="image/random H x W for models with dynamic H/W")
    p.add_argument("--providers", default="CPUExecutionProvider",
                   help="comma-separated onnxruntime execution providers (default CPUExecutionProvider)")
    return p


def _output_summary(outputs: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    summary = {}
    for name, value in outputs.items():
        arr = np.asarray(value)
        numeric = arr.size and (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_)
        summary[name] = {
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "min": float(np.nanmin(arr)) if numeric else None,
            "max": float(np.nanmax(arr)) if numeric else None,
        }
    return summary


def _print_report(report: dict[str, Any]) -> None:
    inp = report["input"]
    print(f"model: {report['model']}  providers: {', '.join(report['providers'])}")
    print(f"input: {inp['source']}  shape {tuple(inp['shape'])}  {inp['dtype']}")
    print("outputs:")
    width = max(len(n) for n in report["outputs"])
    for name, o in report["outputs"].items():
        rng = f"min {o['min']:.4g}  max {o['max']:.4g}" if o["min"] is not None else ""
        print(f"  {name:<{width}}  {str(tuple(o['shape'])):<20} {o['dtype']:<8} {rng}")
    if report.get("tasks"):
        print("tasks: " + "; ".join(f"{t}: {', '.join(names)}" for t, names in report["tasks"].items()))
    lat = report.get("latency")
    if lat:
        print(
            f"latency: batch {inp['shape'][0]}, {lat['runs']} runs after {lat['warmup']} warm-up, "
            f"threads {lat['threads']}"
        )
        print(
            f"  mean {lat['mean_ms']:.3f} ms  median {lat['median_ms']:.3f} ms  p90 {lat['p90_ms']:.3f} ms  "
            f"min {lat['min_ms']:.3f} ms"
        )


def _check_new(path: Path, force: bool) -> None:
    if path.exists() and not path.is_file():
        raise RunnerError(f"{path} exists and is not a regular file; give a file path")
    if path.exists() and not force:
        raise RunnerError(f"{path} exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise RunnerError(f"folder {path.parent} does not exist")


_PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                     [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0]], dtype=np.uint8)


def dense_map(array: np.ndarray, kind: str | None = None) -> np.ndarray | None:
    """An ``(H, W, 3)`` uint8 picture of the first sample of a dense ``(N, C, H, W)`` output, or ``None``.

    ``kind``: ``"seg"`` (argmax class colours), ``"depth"`` (grey, near = bright), ``"normals"``
    (``(n + 1) / 2`` as RGB); guessed from ``C`` when ``None`` (1: depth, 3: normals, else seg).
    """
    if array.ndim != 4 or array.shape[2] < 2 or array.shape[3] < 2:
        return None
    x = np.asarray(array[0], dtype=np.float32)
    kind = kind or ("depth" if x.shape[0] == 1 else "normals" if x.shape[0] == 3 else "seg")
    if kind == "depth" or x.shape[0] == 1:
        d = x[0]
        lo, hi = float(np.nanmin(d)), float(np.nanmax(d))
        grey = (255 * (1 - (d - lo) / max(hi - lo, 1e-12))).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if kind == "normals" and x.shape[0] == 3:
        n = x / np.maximum(np.linalg.norm(x, axis=0, keepdims=True), 1e-12)
        return ((n.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)
    return _PALETTE[np.argmax(x, axis=0) % len(_PALETTE)]


def save_outputs(path: Path, outputs: dict[str, np.ndarray], meta: dict[str, Any], force: bool = False) -> list[Path]:
    """Write ``outputs`` to ``path`` (.npz) and one PNG per dense output (``path.<name>.png``); the paths written."""
    path = Path(path)
    if path.suffix != ".npz":
        raise RunnerError(f"--save {path} should be an .npz file")
    pictures = {}
    for name, value in outputs.items():
        task = name.split(".", 1)[0]
        kind = task if task in ("seg", "depth", "normals") else None
        picture = dense_map(np.asarray(value), kind)
        if picture is not None:
            pictures[path.with_name(f"{path.stem}.{name}.png")] = picture
    for target in [path, *pictures]:
        _check_new(target, force)
    np.savez(path, **{k: np.asarray(v) for k, v in outputs.items()})
    written = [path]
    if pictures:
        try:
            from PIL import Image
        except ImportError as exc:
            raise RunnerError("PNG maps need Pillow (pip install pillow); the .npz file was written") from exc
        for target, picture in pictures.items():
            Image.fromarray(picture).save(target)
            written.append(target)
    return written


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    """Load, run once, benchmark; returns the JSON-able report."""
    if args.runs < 0 or args.warmup < 0:
        raise RunnerError("--runs and --warmup must be >= 0")
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    session = load_session(args.model, args.threads, providers)
    notes: list[str] = []
    array = load_input(args.input, session, args.batch, args.size, normalize=not args.no_normalize, notes=notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    outputs = _run(session, array)
    structure = read_structure(session)
    report: dict[str, Any] = {
        "model": str(args.model),
        "providers": session.get_providers(),
        "input": {"source": args.input, "shape": list(array.shape), "dtype": str(array.dtype)},
        "outputs": _output_summary(outputs),
        "tasks": {t["task"]: t["outputs"] for t in structure["tasks"]} if structure else None,
        "latency": None,
        "notes": notes,
    }
    if args.save is not None:
        report["saved"] = [str(p) for p in save_outputs(args.save, outputs, read_runner_metadata(session), args.force)]
    if args.runs > 0:
        lat: dict[str, Any] = dict(time_session(session, array, args.warmup, args.runs))
        lat["threads"] = _threads_label(args.threads)
        report["latency"] = lat
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        report = run_cli(args)
        _print_report(report)
        if args.json is not None:
            _check_new(args.json, args.force)
            try:
                args.json.write_text(json.dumps(report, indent=2) + "\n")
            except OSError as exc:
                raise RunnerError(f"cannot write {args.json}: {exc.strerror or exc}") from exc
            print(f"wrote {args.json}")
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
