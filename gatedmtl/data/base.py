"""Common pieces of the data sets: base class, image conversion, layout checks."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "MultiTaskDataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "image_to_tensor",
    "require_dir",
    "require_file",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class MultiTaskDataset(Dataset):
    """A map-style data set whose items are ``{"image": [C,H,W] float, <task>: target, ...}``
    (C = 3, or 1 for the grey MultiMNIST-style sets).

    ``tasks`` maps every task name the set provides to the kwargs of
    :func:`gatedmtl.tasks.create_task` (e.g. ``{"seg": {"num_classes": 7}, "depth": {}}``); a
    ``"task"`` entry names the task type when the name differs
    (``{"left": {"task": "classify", "num_classes": 10}}``). ``default_tasks`` are the tasks a
    run trains when none are given.
    """

    tasks: dict[str, dict[str, Any]]
    default_tasks: tuple[str, ...] = ()

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_index(self, index: int) -> int:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {n}")
        return int(index)


def image_to_tensor(image: np.ndarray, normalize: bool = True) -> Tensor:
    """HxWx3 image (uint8 0..255 or float 0..1) -> float tensor [3,H,W], ImageNet-normalised if asked."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    arr = np.ascontiguousarray(image)
    if not arr.flags.writeable:  # e.g. np.asarray(PIL image)
        arr = arr.copy()
    x = torch.from_numpy(arr).permute(2, 0, 1)
    x = x.float() / 255.0 if image.dtype == np.uint8 else x.float()
    if normalize:
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        x = (x - mean) / std
    return x


def require_dir(path: str | os.PathLike[str], what: str) -> Path:
    """``Path(path)`` if it is a directory, else ``FileNotFoundError`` naming ``what`` was expected there."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: expected a directory at {p}")
    return p


def require_file(path: str | os.PathLike[str], what: str) -> Path:
    """``Path(path)`` if it is a file, else ``FileNotFoundError`` naming ``what`` was expected there."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what}: expected a file at {p}")
    return p
