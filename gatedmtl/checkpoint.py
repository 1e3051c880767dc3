"""Checkpoints: safetensors files written atomically, with a JSON metadata record inside.

No checkpoint is ever unpickled: ``.pt``/``.pth`` weight files are read with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .files import check_not_special, remove_stale_temps, replace_file, temp_path

__all__ = ["save_checkpoint", "load_checkpoint", "read_meta", "load_weights", "CheckpointError", "META_KEY"]

META_KEY = "gatedmtl"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted, unsafe, or of another model."""


def save_checkpoint(path: str | Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any],
                    keep_previous: str | Path | None = None) -> Path:
    """Write ``tensors`` + ``meta`` (JSON, key order kept) to ``path`` atomically (temp file, fsync, rename).

    With ``keep_previous``, the file that ``path`` held before is kept under that name (a hard
    link, so that ``path`` exists at every moment). Temporary files that a killed writer left in
    the folder are removed first. Only a regular file is ever replaced. A tensor that shares
    memory with one written before it (a tied gate's logits under each layer that uses the gate)
    is written as its own copy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_not_special(path)
    remove_stale_temps(path.parent)
    flat: dict[str, Tensor] = {}
    storages: set[int] = set()
    for k, v in tensors.items():
        t = v.detach().contiguous().cpu()
        storage = t.untyped_storage().data_ptr()
        if t.numel() and storage in storages:
            t = t.clone()
        storages.add(storage)
        flat[k] = t
    tmp = temp_path(path)
    try:
        save_file(flat, str(tmp), metadata={META_KEY: json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if keep_previous is not None and path.is_file():
            previous = Path(keep_previous)
            check_not_special(previous)
            previous.unlink(missing_ok=True)
            os.link(path, previous)
        replace_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _describe_foreign(path: Path) -> str | None:
    """What a file that is not a safetensors checkpoint is, from its first bytes (``None``: unknown)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04") or head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        return ("a PyTorch pickle/zip file (torch.save); gatedmtl checkpoints are .safetensors files written by "
                "'gatedmtl train' or 'gatedmtl prune' (plain backbone weights go to train --checkpoint)")
    if path.suffix == ".onnx" or head[:1] == b"\x08" and b"pytorch" in head.lower():
        return "an ONNX model; run it with 'python export/run.py MODEL.onnx IMAGE', gatedmtl commands read .safetensors checkpoints"
    return None


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(tensors, meta)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        raw = _raw_meta(path)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        foreign = _describe_foreign(path)
        if foreign is not None:
            raise CheckpointError(f"{path} is {foreign}") from e
        previous = path.with_name("prev" + path.suffix)
        hint = (f"{previous} holds the save before it" if previous.is_file() and previous != path
                else "retrain, or restore it from a backup")
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({e}); {hint}") from e
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a gatedmtl checkpoint (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path} has corrupted metadata: {e}") from e
    return tensors, meta


def _raw_meta(path: Path) -> str | None:
    """The JSON text under :data:`META_KEY` in a safetensors file's header (``None``: absent)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get(META_KEY)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata record of a checkpoint without reading its tensors."""
    path = Path(path)
    try:
        raw = _raw_meta(path)
        return json.loads(raw) if raw is not None else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read the metadata of {path}: {e}") from e


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """Backbone weights from a ``.safetensors`` file or a ``.pt``/``.pth`` state dict (never unpickled).

    A state dict nested under ``"state_dict"`` or ``"model"`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path} is truncated or corrupted: {e}") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} needs unpickling of arbitrary Python objects, which gatedmtl refuses (it can run code). "
            "Save a plain state dict (torch.save(model.state_dict(), ...)) or a .safetensors file."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is truncated or corrupted: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state
