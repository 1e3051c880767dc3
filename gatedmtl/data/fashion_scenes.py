"""The "fashion scenes" set: real Fashion-MNIST items composited into dense multi-task scenes.

Each scene (``size`` H×W, default 64×64) is a textured background with 2–5 Fashion-MNIST items
pasted one after the other, so later items occlude earlier ones:

* background: a real item of the split, enlarged ×1.5–3 (bilinear) past the canvas, randomly
  cropped, Gaussian-blurred (radius 2) and used as the blend weight between two random colours:
  large soft shapes of real image content, never a label;
* items: side ⌊U(0.3, 0.6)·min(H, W)⌉ pixels (bilinear from 28×28), position uniform with the
  item inside the canvas, a random colour times its grey level (0.25 + 0.75·v, so colour is no
  cue to the class); pixels whose resized grey level is below :data:`MASK_THRESHOLD` (0.1) are
  transparent;
* sensor noise: uniform, std 0.015 (as the procedural scenes).

Targets, from the layer map (0 = background, k = the k-th pasted item, visible where it is on top):

* ``seg``: 0 = background, 1 + Fashion-MNIST class for item pixels (11 classes, :data:`FASHION_SCENE_CLASSES`);
* ``depth``: the layer order as relative depth, :data:`BACKGROUND_DEPTH` − k (background at
  ``MAX_ITEMS + 1`` = 6, the first item at 5, the fifth at 1; always > 0, so every pixel is valid);
* ``boundary``: occlusion boundaries, the pixels that have a 4-neighbour on a lower layer
  (the occluding side of every item outline, one pixel wide).

Scene ``i`` of a split is a pure function of (source items, ``seed``, split, ``i``); train
scenes draw their items from the Fashion-MNIST training split, val / test scenes from its test split.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import Tensor

from .base import MultiTaskDataset, image_to_tensor
from .items import FASHION_MNIST_CLASSES, ItemSet, load_fashion_mnist
from .registry import register_dataset

__all__ = [
    "FASHION_SCENE_CLASSES",
    "MAX_ITEMS",
    "MIN_ITEMS",
    "BACKGROUND_DEPTH",
    "MASK_THRESHOLD",
    "Layer",
    "composite_layers",
    "layer_targets",
    "occlusion_boundaries",
    "render_fashion_scene",
    "FashionScenesDataset",
]

#: Segmentation classes of the fashion scenes: background, then the Fashion-MNIST classes.
FASHION_SCENE_CLASSES: tuple[str, ...] = ("background",) + FASHION_MNIST_CLASSES
MIN_ITEMS, MAX_ITEMS = 2, 5
BACKGROUND_DEPTH = float(MAX_ITEMS + 1)
MASK_THRESHOLD = 0.1  # grey level (0..1) below which an item pixel is transparent
ITEM_SCALE = (0.3, 0.6)  # item side as a fraction of min(H, W)
BACKGROUND_ZOOM = (1.5, 3.0)  # background item enlarged past the canvas by this factor
BACKGROUND_BLUR = 2.0  # PIL GaussianBlur radius, pixels
NOISE = 0.015
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 1}


@dataclass(frozen=True)
class Layer:
    """One pasted item: ``pixels`` [h,w,3] float in [0,1], ``mask`` [h,w] bool (opaque), its top-left
    corner (``top``, ``left``) on the canvas, and its class ``label`` (0-based Fashion-MNIST class)."""

    pixels: np.ndarray
    mask: np.ndarray
    top: int
    left: int
    label: int


def composite_layers(background: np.ndarray, layers: Sequence[Layer]) -> tuple[np.ndarray, np.ndarray]:
    """Paste ``layers`` in order onto ``background`` [H,W,3] -> (image [H,W,3] float32, layer map
    [H,W] uint8: 0 = background, k = ``layers[k-1]`` where it is visible)."""
    if background.ndim != 3 or background.shape[2] != 3:
        raise ValueError(f"background must be [H,W,3], got {background.shape}")
    if len(layers) > 254:
        raise ValueError(f"at most 254 layers, got {len(layers)}")
    H, W = background.shape[:2]
    image = background.astype(np.float32, copy=True)
    layer_map = np.zeros((H, W), np.uint8)
    for k, layer in enumerate(layers, start=1):
        h, w = layer.mask.shape
        if layer.pixels.shape != (h, w, 3):
            raise ValueError(f"layer {k}: pixels {layer.pixels.shape} do not match mask {layer.mask.shape}")
        if not (0 <= layer.top <= H - h and 0 <= layer.left <= W - w):
            raise ValueError(f"layer {k}: a {h}x{w} item at ({layer.top}, {layer.left}) leaves the {H}x{W} canvas")
        rows, cols = slice(layer.top, layer.top + h), slice(layer.left, layer.left + w)
        image[rows, cols][layer.mask] = layer.pixels[layer.mask]
        layer_map[rows, cols][layer.mask] = k
    return image, layer_map


def occlusion_boundaries(layer_map: np.ndarray) -> np.ndarray:
    """[H,W] uint8 {0,1}: pixels with a 4-neighbour on a lower layer (the occluding side of each outline)."""
    m = layer_map.astype(np.int16)
    out = np.zeros(m.shape, bool)
    out[1:, :] |= m[:-1, :] < m[1:, :]
    out[:-1, :] |= m[1:, :] < m[:-1, :]
    out[:, 1:] |= m[:, :-1] < m[:, 1:]
    out[:, :-1] |= m[:, 1:] < m[:, :-1]
    return out.astype(np.uint8)


def layer_targets(layer_map: np.ndarray, labels: Sequence[int]) -> dict[str, np.ndarray]:
    """``seg`` uint8 (0 = background, 1 + label), ``depth`` float32 (:data:`BACKGROUND_DEPTH` − layer)
    and ``boundary`` uint8 maps of a layer map whose layer k holds an item of class ``labels[k-1]``."""
    if len(labels) > MAX_ITEMS:
        raise ValueError(f"at most {MAX_ITEMS} layers have a depth > 0, got {len(labels)}")
    lut = np.array([0] + [1 + int(c) for c in labels], np.uint8)
    if layer_map.max(initial=0) > len(labels):
        raise ValueError(f"layer map has layer {layer_map.max()} but only {len(labels)} labels")
    return {
        "seg": lut[layer_map],
        "depth": (BACKGROUND_DEPTH - layer_map.astype(np.float32)).astype(np.float32),
        "boundary": occlusion_boundaries(layer_map),
    }


def _resize(item: np.ndarray, h: int, w: int) -> np.ndarray:
    """uint8 [28,28] -> float32 [h,w] in [0,1] (PIL bilinear)."""
    return np.asarray(Image.fromarray(item).resize((w, h), Image.BILINEAR), np.float32) / 255.0


def _background(rng: np.random.Generator, item: np.ndarray, H: int, W: int) -> np.ndarray:
    zoom = rng.uniform(*BACKGROUND_ZOOM)
    bh, bw = int(np.ceil(H * zoom)), int(np.ceil(W * zoom))
    big = Image.fromarray(item).resize((bw, bh), Image.BILINEAR).filter(ImageFilter.GaussianBlur(BACKGROUND_BLUR))
    y, x = int(rng.integers(0, bh - H + 1)), int(rng.integers(0, bw - W + 1))
    t = np.asarray(big, np.float32)[y:y + H, x:x + W, None] / 255.0
    if rng.random() < 0.5:
        t = t[:, ::-1]
    a, b = rng.uniform(0.05, 0.95, 3).astype(np.float32), rng.uniform(0.05, 0.95, 3).astype(np.float32)
    return (1 - t) * a + t * b


def render_fashion_scene(items: ItemSet, seed: int, size: tuple[int, int] = (64, 64)) -> dict[str, np.ndarray]:
    """One scene from the item pool ``items``, deterministic from ``seed``.

    Returns ``image`` [H,W,3] float32 in [0,1], ``seg`` [H,W] uint8, ``depth`` [H,W] float32,
    ``boundary`` [H,W] uint8, ``layers`` [H,W] uint8 (layer map) and ``item_index`` [n] int64
    (indices into ``items`` of the pasted items, in paste order).
    """
    H, W = int(size[0]), int(size[1])
    side_lo, side_hi = ITEM_SCALE[0] * min(H, W), ITEM_SCALE[1] * min(H, W)
    if side_lo < 4:
        raise ValueError(f"size {size} is too small for items (need min(H, W) >= {int(np.ceil(4 / ITEM_SCALE[0]))})")
    if len(items) == 0:
        raise ValueError("the item pool is empty")
    rng = np.random.default_rng(seed)
    background = _background(rng, items.images[int(rng.integers(len(items)))], H, W)
    n = int(rng.integers(MIN_ITEMS, MAX_ITEMS + 1))
    index = rng.integers(0, len(items), n)
    layers = []
    for i in index:
        side = int(round(rng.uniform(side_lo, side_hi)))
        grey = _resize(items.images[i], side, side)
        colour = rng.uniform(0.3, 1.0, 3).astype(np.float32)
        top, left = int(rng.integers(0, H - side + 1)), int(rng.integers(0, W - side + 1))
        layers.append(Layer(colour * (0.25 + 0.75 * grey[..., None]), grey >= MASK_THRESHOLD, top, left,
                            int(items.labels[i])))
    image, layer_map = composite_layers(background, layers)
    image += (rng.random(image.shape, dtype=np.float32) - 0.5) * np.float32(NOISE * 12**0.5)  # uniform, std = NOISE
    np.clip(image, 0.0, 1.0, out=image)
    out = layer_targets(layer_map, [layer.label for layer in layers])
    return {"image": image, **out, "layers": layer_map, "item_index": index.astype(np.int64)}


@register_dataset("fashion-scenes")
class FashionScenesDataset(MultiTaskDataset):
    """Fashion scenes (see the module doc). Items: ``image`` [3,H,W] (ImageNet-normalised unless
    ``normalize=False``), ``seg`` long [H,W] (11 classes), ``depth`` [1,H,W] (layer units),
    ``boundary`` float {0,1} [1,H,W].

    ``root``: a folder with the Fashion-MNIST IDX files (default: Debian's
    ``/usr/share/datasets/fashion-mnist``). ``cache=True`` keeps rendered items in memory.
    """

    default_tasks: tuple[str, ...] = ("seg", "depth", "boundary")

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        size: tuple[int, int] = (64, 64),
        length: int = 512,
        seed: int = 0,
        tasks: Sequence[str] = ("seg", "depth", "boundary"),
        normalize: bool = True,
        cache: bool = False,
    ) -> None:
        if split not in _SPLIT_STREAM:
            raise ValueError(f"fashion-scenes: split must be one of {sorted(_SPLIT_STREAM)}, got {split!r}")
        known = ("seg", "depth", "boundary")
        if not tasks or set(tasks) - set(known) or len(set(tasks)) != len(tasks):
            raise ValueError(f"fashion-scenes provides tasks {list(known)}, got {list(tasks)}")
        if int(length) < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.items = load_fashion_mnist(root, split)
        self.split, self.size, self.length, self.seed = split, (int(size[0]), int(size[1])), int(length), int(seed)
        self.normalize = normalize
        self.task_names = tuple(tasks)
        self.classes = FASHION_SCENE_CLASSES
        all_tasks: dict[str, dict[str, Any]] = {"seg": {"num_classes": len(FASHION_SCENE_CLASSES)}, "depth": {},
                                                "boundary": {}}
        self.tasks = {t: all_tasks[t] for t in self.task_names}
        self._cache: dict[int, dict[str, Tensor]] | None = {} if cache else None
        render_fashion_scene(self.items, 0, self.size)  # a size too small fails here, not in the loader

    def __len__(self) -> int:
        return self.length

    def sample_seed(self, index: int) -> int:
        """The :func:`render_fashion_scene` seed of item ``index``."""
        ss = np.random.SeedSequence([self.seed, _SPLIT_STREAM[self.split], self._check_index(index)])
        return int(ss.generate_state(1)[0])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        index = self._check_index(index)
        if self._cache is not None and index in self._cache:
            return dict(self._cache[index])
        s = render_fashion_scene(self.items, self.sample_seed(index), self.size)
        item = {"image": image_to_tensor(s["image"], self.normalize)}
        if "seg" in self.tasks:
            item["seg"] = torch.from_numpy(s["seg"].astype(np.int64))
        if "depth" in self.tasks:
            item["depth"] = torch.from_numpy(s["depth"])[None]
        if "boundary" in self.tasks:
            item["boundary"] = torch.from_numpy(s["boundary"].astype(np.float32))[None]
        if self._cache is not None:
            self._cache[index] = item
        return dict(item)
