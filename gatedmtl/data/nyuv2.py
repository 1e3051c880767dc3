"""NYUv2 in the pre-processed MTAN / LibMTL layout (288×384, 13 classes, 795 train / 654 val).

    root/train/image/<i>.npy    HxWx3 float in [0, 1]
    root/train/label/<i>.npy    HxW float, class 0..12, −1 = ignore
    root/train/depth/<i>.npy    HxWx1 (or HxW) float metres, 0 = invalid
    root/train/normal/<i>.npy   HxWx3 float unit normals in [−1, 1], 0 = invalid
    root/val/...                same (used for split "val" and "test")

as read by ``lorenmt/mtan`` ``im2im_pred/create_dataset.py`` and LibMTL
``examples/nyu/create_dataset.py`` (files ``{:d}.npy``, indices 0..N−1).
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
    normals_from_npy,
    scan_npy_layout,
    split_dir,
)
from .registry import register_dataset

__all__ = ["NYUv2Dataset"]

_SPLITS = {"train": "train", "val": "val", "test": "val"}
_FOLDERS = {"seg": "label", "depth": "depth", "normals": "normal"}


@register_dataset("nyuv2")
class NYUv2Dataset(MultiTaskDataset):
    """NYUv2 (MTAN .npy layout). Items: ``image`` [3,H,W], ``seg`` long [H,W] (255 = ignore),
    ``depth`` [1,H,W], ``normals`` [3,H,W]. ``num_classes=40`` reads 40-class label maps."""

    default_tasks: tuple[str, ...] = ("seg", "depth", "normals")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        num_classes: int = 13,
        tasks: Sequence[str] = ("seg", "depth", "normals"),
        normalize: bool = True,
    ) -> None:
        unknown = set(tasks) - set(_FOLDERS)
        if not tasks or unknown:
            raise ValueError(f"nyuv2 provides tasks {sorted(_FOLDERS)}, got {list(tasks)}")
        self.dir = split_dir(root, split, _SPLITS, "nyuv2")
        self.split, self.num_classes, self.normalize = split, int(num_classes), normalize
        self.task_names = tuple(tasks)
        self.length = scan_npy_layout(self.dir, ["image"] + [_FOLDERS[t] for t in self.task_names], "nyuv2")
        kwargs: dict[str, dict[str, Any]] = {"seg": {"num_classes": self.num_classes}, "depth": {}, "normals": {}}
        self.tasks = {t: kwargs[t] for t in self.task_names}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        i = self._check_index(index)
        path = self.dir / "image" / f"{i}.npy"
        item = {"image": image_from_npy(load_npy(path), path, self.normalize)}
        for task in self.task_names:
            path = self.dir / _FOLDERS[task] / f"{i}.npy"
            arr = load_npy(path)
            if task == "seg":
                item[task] = label_from_npy(arr, path, self.num_classes)
            elif task == "depth":
                item[task] = depth_from_npy(arr, path)
            else:
                item[task] = normals_from_npy(arr, path)
        check_same_size(item, f"nyuv2 sample {i} in {self.dir}")
        return item
