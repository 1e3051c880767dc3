"""Cityscapes in the pre-processed MTAN layout (128×256 or 256×512; 2975 train / 500 val).

    root/train/image/<i>.npy      HxWx3 float in [0, 1]
    root/train/label_7/<i>.npy    HxW float, class 0..6, −1 = ignore   (also label_2, label_19)
    root/train/depth/<i>.npy      HxWx1 float inverse depth (disparity, as released), 0 = invalid
    root/val/...                  same (used for split "val" and "test")

as released with ``lorenmt/mtan`` (README: "2, 7, and 19-class semantic labels and (inverse)
depth labels"). LibMTL's copy (``examples/cityscapes``) names the 7-class folder ``label``;
it is used when ``label_7`` is absent. The task is still called ``depth``: lower abs/rel error
is better either way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import Tensor

from .base import MultiTaskDataset
from .npy_layout import (
    check_same_size,
    depth_from_npy,
    image_from_npy,
    label_from_npy,
    load_npy,
    scan_npy_layout,
    split_dir,
)
from .registry import register_dataset

__all__ = ["CityscapesDataset"]

_SPLITS = {"train": "train", "val": "val", "test": "val"}
_CLASSES = (2, 7, 19)


@register_dataset("cityscapes")
class CityscapesDataset(MultiTaskDataset):
    """Cityscapes (MTAN .npy layout). Items: ``image`` [3,H,W], ``seg`` long [H,W] (255 = ignore,
    ``classes`` ∈ {2, 7, 19}), ``depth`` [1,H,W] (disparity, 0 = invalid)."""

    default_tasks: tuple[str, ...] = ("seg", "depth")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        classes: int = 7,
        tasks: Sequence[str] = ("seg", "depth"),
        normalize: bool = True,
    ) -> None:
        if classes not in _CLASSES:
            raise ValueError(f"cityscapes: classes must be one of {_CLASSES}, got {classes}")
        if not tasks or set(tasks) - {"seg", "depth"}:
            raise ValueError(f"cityscapes provides tasks ['depth', 'seg'], got {list(tasks)}")
        self.dir = split_dir(root, split, _SPLITS, "cityscapes")
        self.split, self.classes, self.normalize = split, int(classes), normalize
        self.task_names = tuple(tasks)
        label = f"label_{classes}"
        if classes == 7 and not (self.dir / label).is_dir() and (self.dir / "label").is_dir():
            label = "label"  # LibMTL's copy of the 7-class set
        self.folders = {"seg": label, "depth": "depth"}
        self.length = scan_npy_layout(self.dir, ["image"] + [self.folders[t] for t in self.task_names], "cityscapes")
        kwargs: dict[str, dict[str, Any]] = {"seg": {"num_classes": self.classes}, "depth": {}}
        self.tasks = {t: kwargs[t] for t in self.task_names}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        i = self._check_index(index)
        path = self.dir / "image" / f"{i}.npy"
        item = {"image": image_from_npy(load_npy(path), path, self.normalize)}
        for task in self.task_names:
            path = self.dir / self.folders[task] / f"{i}.npy"
            arr = load_npy(path)
            item[task] = label_from_npy(arr, path, self.classes) if task == "seg" else depth_from_npy(arr, path)
        check_same_size(item, f"cityscapes sample {i} in {self.dir}")
        return item
