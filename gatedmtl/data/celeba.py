"""CelebA (aligned & cropped faces, 40 binary attributes), from the official files:

    root/img_align_celeba/000001.jpg ...   178×218 JPEGs
    root/list_attr_celeba.txt              line 1: N; line 2: 40 names; then "<file> ±1 × 40"
    root/list_eval_partition.txt           "<file> <0|1|2>"  (0 train, 1 val, 2 test)

``root`` may also be the parent of a ``celeba/`` folder holding these (torchvision layout).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .base import MultiTaskDataset, image_to_tensor, require_dir, require_file
from .registry import register_dataset

__all__ = ["CelebADataset", "read_attr_file", "read_partition_file"]

_SPLITS = {"train": 0, "val": 1, "test": 2}
_ATTR_FILE, _PART_FILE, _IMG_DIR = "list_attr_celeba.txt", "list_eval_partition.txt", "img_align_celeba"


def read_attr_file(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Parse ``list_attr_celeba.txt`` -> (attribute names, file names, {0,1} uint8 [N, A])."""
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    if len(lines) < 2 or len(lines[0]) != 1 or not lines[0][0].isdigit():
        raise ValueError(f"{path}: expected a count on line 1 and attribute names on line 2")
    n, names, rows = int(lines[0][0]), lines[1], lines[2:]
    if len(rows) != n:
        raise ValueError(f"{path}: header says {n} images but {len(rows)} rows follow")
    files, values = [], np.empty((n, len(names)), np.int8)
    for i, row in enumerate(rows):
        if len(row) != len(names) + 1:
            raise ValueError(f"{path}: row {i + 3} has {len(row) - 1} values, expected {len(names)}")
        files.append(row[0])
        try:
            values[i] = [int(v) for v in row[1:]]
        except ValueError:
            raise ValueError(f"{path}: row {i + 3} has non-integer attribute values") from None
    if not np.isin(values, (-1, 0, 1)).all():
        raise ValueError(f"{path}: attribute values must be -1/1 (or 0/1)")
    return names, files, (values > 0).astype(np.uint8)


def read_partition_file(path: Path) -> dict[str, int]:
    """Parse ``list_eval_partition.txt`` -> file name -> split id (0 train, 1 val, 2 test)."""
    out: dict[str, int] = {}
    for i, ln in enumerate(path.read_text().splitlines()):
        if not ln.strip():
            continue
        parts = ln.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise ValueError(f"{path}: line {i + 1} should be '<file> <0|1|2>', got {ln!r}")
        out[parts[0]] = int(parts[1])
    return out


@register_dataset("celeba")
class CelebADataset(MultiTaskDataset):
    """CelebA. Items: ``image`` [3,H,W] (native 218×178, or ``size`` (H, W) bilinear) and
    ``attributes`` float {0,1} [A] for the chosen ``attributes`` (default: all 40, file order)."""

    default_tasks: tuple[str, ...] = ("attributes",)

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        attributes: Sequence[str] | None = None,
        size: tuple[int, int] | None = None,
        normalize: bool = True,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"celeba: split must be one of {sorted(_SPLITS)}, got {split!r}")
        base = require_dir(root, "celeba root")
        if not (base / _ATTR_FILE).exists() and (base / "celeba" / _ATTR_FILE).exists():
            base = base / "celeba"
        attr_path = require_file(base / _ATTR_FILE, "celeba attribute list")
        part_path = require_file(base / _PART_FILE, "celeba partition list")
        self.img_dir = require_dir(base / _IMG_DIR, "celeba images")
        names, files, values = read_attr_file(attr_path)
        partition = read_partition_file(part_path)
        unlisted = [f for f in files if f not in partition]
        if unlisted or len(partition) != len(files):
            raise ValueError(
                f"celeba: {attr_path.name} lists {len(files)} images and {part_path.name} {len(partition)}; "
                f"{len(unlisted)} images have no partition (e.g. {unlisted[:3]})"
            )
        if attributes is None:
            cols = list(range(len(names)))
        else:
            unknown = [a for a in attributes if a not in names]
            if unknown or not attributes:
                raise ValueError(f"celeba: unknown attributes {unknown}; available: {', '.join(names)}")
            cols = [names.index(a) for a in attributes]
        keep = [i for i, f in enumerate(files) if partition[f] == _SPLITS[split]]
        present = set(os.listdir(self.img_dir))
        missing = [files[i] for i in keep if files[i] not in present]
        if missing:
            raise FileNotFoundError(
                f"celeba: {len(missing)} images of split {split!r} missing from {self.img_dir} (e.g. {missing[:3]})"
            )
        self.split, self.size, self.normalize = split, size, normalize
        self.attribute_names = [names[c] for c in cols]
        self.files = [files[i] for i in keep]
        self.targets = torch.from_numpy(values[keep][:, cols].astype(np.float32))
        self.tasks = {"attributes": {"num_attributes": len(cols)}}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        i = self._check_index(index)
        with Image.open(self.img_dir / self.files[i]) as im:
            im = im.convert("RGB")
            if self.size is not None:
                im = im.resize((int(self.size[1]), int(self.size[0])), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
        return {"image": image_to_tensor(arr, self.normalize), "attributes": self.targets[i].clone()}
