"""scikit-image's bundled Middlebury stereo pair "motorcycle" as a real depth example.

``skimage.data.stereo_motorcycle()`` ships inside the scikit-image wheel (no download): left and
right 500×741 RGB views and the left view's ground-truth disparity in pixels, ``inf`` where it is
unknown (occlusions, 27,226 of 370,500 pixels). Install with ``pip install 'gatedmtl[data]'``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import image_to_tensor

__all__ = ["load_stereo_motorcycle", "motorcycle_left_path"]


def _skimage_data():  # type: ignore[no-untyped-def]
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError("the motorcycle stereo pair needs scikit-image: pip install 'gatedmtl[data]' "
                          "(or pip install scikit-image)") from e
    return skimage.data


def motorcycle_left_path() -> str:
    """Path of the bundled left view PNG (an ``--input`` for ``export/run.py``)."""
    return str(Path(_skimage_data().data_dir) / "motorcycle_left.png")


def load_stereo_motorcycle(size: tuple[int, int] | None = None, normalize: bool = True) -> dict[str, Tensor]:
    """``{"image": [3,H,W] float (left view, ImageNet-normalised if asked), "right": [3,H,W],
    "depth": [1,H,W] float32 disparity in pixels of the full-size pair, 0 = invalid}``.

    The ``inf`` of unknown disparity becomes 0, the invalid value of the depth task's loss and
    metric. ``size`` (H, W) resizes: bilinear images, nearest disparity.
    """
    left, right, disparity = _skimage_data().stereo_motorcycle()
    disp = torch.from_numpy(np.where(np.isfinite(disparity), disparity, 0.0).astype(np.float32))[None]
    item = {"image": image_to_tensor(left, normalize), "right": image_to_tensor(right, normalize), "depth": disp}
    if size is not None:
        hw = (int(size[0]), int(size[1]))
        for key in ("image", "right"):
            item[key] = F.interpolate(item[key][None], size=hw, mode="bilinear", align_corners=False)[0]
        item["depth"] = F.interpolate(item["depth"][None], size=hw, mode="nearest")[0]
    return item
