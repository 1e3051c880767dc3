"""NYUD-v2 frames stored as PNG files (the layout of multi-task-refinenet's examples):

    root/<prefix>_<id>.png              RGB image, uint8 (640×480)
    root/<prefix>_segm_gt_<id>.png      label map, uint8: 40 NYUD classes as 0..39, 255 = ignore
    root/<prefix>_depth_gt_<id>.png     depth, uint16: metres = value / 5000, 0 = invalid
    root/<prefix>_norm_gt_<id>.png      surface normals as RGB (optional)

``root/train`` and ``root/val`` (``test`` reads ``val``) are used when they exist; otherwise the
frames directly in ``root`` form every split (a fixture or demo folder, not a benchmark).

Normals: n = rgb / 255 · 2 − 1 stores (x, z, −y) of a camera-frame normal; the loader returns
(x right, y down, z forward), facing the camera, the convention of :mod:`gatedmtl.data.scenes`.
That axis order was found against normals computed from the depth of frame 000433 (NYU-v2
intrinsics): median cosine 0.95, against 0.85 for the next best of the 48 axis orders and
signs (a test checks it).
Pixels whose decoded normal is shorter than 0.5 (the grey of "no normal") are invalid (0).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .base import MultiTaskDataset, image_to_tensor, require_dir
from .registry import register_dataset

__all__ = ["NYUDPngDataset", "NYUD_DEPTH_SCALE", "decode_nyud_normals", "find_nyud_frames"]

NYUD_DEPTH_SCALE = 5000.0  # uint16 depth PNG value per metre
_TARGETS = {"seg": "segm_gt", "depth": "depth_gt", "normals": "norm_gt"}
_FRAME = re.compile(r"^(?P<prefix>.+)_(?P<id>\d+)\.png$")
_SPLITS = {"train": "train", "val": "val", "test": "val"}


def find_nyud_frames(folder: Path) -> list[tuple[str, str]]:
    """(prefix, id) of every RGB frame in ``folder`` (files that are not ``*_<kind>_gt_<id>.png``), sorted."""
    frames = []
    for p in sorted(folder.iterdir()):
        m = _FRAME.match(p.name)
        if m and not any(m["prefix"].endswith("_" + kind) for kind in _TARGETS.values()):
            frames.append((m["prefix"], m["id"]))
    return frames


def decode_nyud_normals(rgb: np.ndarray) -> np.ndarray:
    """RGB normal PNG [H,W,3] uint8 -> camera-frame unit normals [H,W,3] float32 (x right, y down,
    z forward); 0 where the stored normal is shorter than 0.5."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"normals PNG must be RGB [H,W,3], got {rgb.shape}")
    n = rgb.astype(np.float32) / 255.0 * 2.0 - 1.0
    n = np.stack([n[..., 0], -n[..., 2], n[..., 1]], -1)
    length = np.linalg.norm(n, axis=-1, keepdims=True)
    valid = length >= 0.5
    return np.where(valid, n / np.maximum(length, 1e-6), 0.0).astype(np.float32)


@register_dataset("nyud-png")
class NYUDPngDataset(MultiTaskDataset):
    """NYUD-v2 PNG frames. Items: ``image`` [3,H,W], ``seg`` long [H,W] (40 classes, 255 = ignore),
    ``depth`` [1,H,W] metres (0 = invalid), ``normals`` [3,H,W] (0 = invalid). ``size`` (H, W)
    resizes (bilinear image, nearest targets). Every requested task needs its file for every frame."""

    default_tasks: tuple[str, ...] = ("seg", "depth")

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        tasks: Sequence[str] = ("seg", "depth"),
        size: tuple[int, int] | None = None,
        normalize: bool = True,
        num_classes: int = 40,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"nyud-png: split must be one of {sorted(_SPLITS)}, got {split!r}")
        if not tasks or set(tasks) - set(_TARGETS) or len(set(tasks)) != len(tasks):
            raise ValueError(f"nyud-png provides tasks {sorted(_TARGETS)}, got {list(tasks)}")
        base = require_dir(root, "nyud-png root")
        self.dir = base / _SPLITS[split] if (base / _SPLITS[split]).is_dir() else base
        self.frames = find_nyud_frames(self.dir)
        if not self.frames:
            raise ValueError(f"nyud-png: no frames <prefix>_<id>.png in {self.dir}")
        for task in tasks:
            missing = [self._path(f, task).name for f in self.frames if not self._path(f, task).is_file()]
            if missing:
                raise FileNotFoundError(f"nyud-png: task {task!r} needs {len(missing)} files missing from {self.dir}, "
                                        f"e.g. {missing[:3]}")
        self.split, self.size, self.normalize, self.num_classes = split, size, normalize, int(num_classes)
        self.task_names = tuple(tasks)
        kwargs: dict[str, dict[str, Any]] = {"seg": {"num_classes": self.num_classes}, "depth": {}, "normals": {}}
        self.tasks = {t: kwargs[t] for t in self.task_names}

    def _path(self, frame: tuple[str, str], task: str | None = None) -> Path:
        prefix, idx = frame
        return self.dir / (f"{prefix}_{idx}.png" if task is None else f"{prefix}_{_TARGETS[task]}_{idx}.png")

    def __len__(self) -> int:
        return len(self.frames)

    def _read(self, path: Path, resample: int) -> np.ndarray:
        with Image.open(path) as im:
            if self.size is not None:
                im = im.resize((int(self.size[1]), int(self.size[0])), resample)
            return np.asarray(im)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        frame = self.frames[self._check_index(index)]
        rgb = self._read(self._path(frame), Image.BILINEAR)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"{self._path(frame)}: expected an RGB image, got shape {rgb.shape}")
        item = {"image": image_to_tensor(rgb, self.normalize)}
        for task in self.task_names:
            path = self._path(frame, task)
            arr = self._read(path, Image.NEAREST)
            if arr.shape[:2] != rgb.shape[:2]:
                raise ValueError(f"{path}: size {arr.shape[:2]} differs from the image's {rgb.shape[:2]}")
            if task == "seg":
                lab = arr.astype(np.int64)
                bad = (lab != 255) & (lab >= self.num_classes)
                if arr.ndim != 2 or bad.any():
                    raise ValueError(f"{path}: expected a label map with values 0..{self.num_classes - 1} or 255")
                item[task] = torch.from_numpy(lab)
            elif task == "depth":
                if arr.ndim != 2:
                    raise ValueError(f"{path}: expected a one-channel depth PNG, got shape {arr.shape}")
                item[task] = torch.from_numpy(arr.astype(np.float32) / NYUD_DEPTH_SCALE)[None]
            else:
                item[task] = torch.from_numpy(np.ascontiguousarray(decode_nyud_normals(arr).transpose(2, 0, 1)))
        return item
