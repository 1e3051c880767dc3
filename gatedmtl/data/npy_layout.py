"""Reader for the MTAN / LibMTL pre-processed ``.npy`` layout (NYUv2, Cityscapes).

    root/<split>/<folder>/<i>.npy      i = 0 .. N-1, the same N in every folder

Images are HxWx3 float in [0, 1]; label maps HxW with −1 = ignore; depth HxW or HxWx1 with
0 = invalid; normals HxWx3 with 0 = invalid.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .base import image_to_tensor, require_dir

__all__ = [
    "scan_npy_layout",
    "split_dir",
    "load_npy",
    "image_from_npy",
    "label_from_npy",
    "depth_from_npy",
    "normals_from_npy",
    "check_same_size",
]


def scan_npy_layout(split_dir: Path, folders: Sequence[str], dataset: str) -> int:
    """Check ``split_dir/<folder>/{0..N-1}.npy`` for every folder and return N.

    ``FileNotFoundError`` for a missing folder; ``ValueError`` for no files, names that are not
    0..N-1, or folders with different counts.
    """
    layout = ", ".join(f"{split_dir}/{f}/<i>.npy" for f in folders)
    counts: dict[str, int] = {}
    for folder in folders:
        d = split_dir / folder
        if not d.is_dir():
            raise FileNotFoundError(f"{dataset}: expected a directory {d} (layout: {layout})")
        stems = [p.stem for p in d.iterdir() if p.suffix == ".npy"]
        if not stems:
            raise ValueError(f"{dataset}: no .npy files in {d} (layout: {layout})")
        try:
            idx = sorted(int(s) for s in stems)
        except ValueError:
            bad = next(s for s in stems if not s.lstrip("-").isdigit())
            raise ValueError(f"{dataset}: file {d / (bad + '.npy')} is not named <index>.npy") from None
        if idx != list(range(len(idx))):
            missing = sorted(set(range(len(idx))) - set(idx))[:5]
            raise ValueError(f"{dataset}: files in {d} must be 0.npy .. {len(idx) - 1}.npy; missing e.g. {missing}")
        counts[folder] = len(idx)
    if len(set(counts.values())) != 1:
        raise ValueError(f"{dataset}: folders under {split_dir} hold different numbers of samples: {counts}")
    return next(iter(counts.values()))


def load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"expected a file at {path}")
    return np.load(path, allow_pickle=False)


def image_from_npy(arr: np.ndarray, path: Path, normalize: bool) -> Tensor:
    """HxWx3 float [0,1] (or uint8) -> [3,H,W]."""
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image {path}: expected HxWx3, got shape {arr.shape}")
    return image_to_tensor(arr if arr.dtype == np.uint8 else arr.astype(np.float32), normalize)


def label_from_npy(arr: np.ndarray, path: Path, num_classes: int, ignore_index: int = 255) -> Tensor:
    """HxW label map, −1 (or ``ignore_index``) = ignore -> long [H,W] with ``ignore_index``."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"label {path}: expected HxW, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
        raise ValueError(f"label {path}: values must be integers")
    lab = arr.astype(np.int64)
    ignore = (lab == -1) | (lab == ignore_index)
    bad = ~ignore & ((lab < 0) | (lab >= num_classes))
    if bad.any():
        vals = np.unique(lab[bad])[:10].tolist()
        raise ValueError(
            f"label {path}: values {vals} outside [0, {num_classes}) (−1 or {ignore_index} = ignore); "
            f"wrong number of classes?"
        )
    lab[ignore] = ignore_index
    return torch.from_numpy(lab)


def depth_from_npy(arr: np.ndarray, path: Path) -> Tensor:
    """HxW or HxWx1 -> float [1,H,W] (0 = invalid)."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"depth {path}: expected HxW or HxWx1, got shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]


def normals_from_npy(arr: np.ndarray, path: Path) -> Tensor:
    """HxWx3 -> float [3,H,W] (0 = invalid)."""
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"normals {path}: expected HxWx3, got shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32))


def split_dir(root: str | Path, split: str, splits: dict[str, str], dataset: str) -> Path:
    """``root/<folder of split>`` after checking ``root`` and the split folder exist."""
    if split not in splits:
        raise ValueError(f"{dataset}: split must be one of {sorted(splits)}, got {split!r}")
    base = require_dir(root, f"{dataset} root")
    return require_dir(base / splits[split], f"{dataset} split {split!r}")


def check_same_size(item: dict[str, Tensor], where: str) -> None:
    """All maps of one sample must share H, W."""
    sizes = {k: tuple(v.shape[-2:]) for k, v in item.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{where}: image and targets differ in size: {sizes}")
