"""Dense tasks: semantic segmentation, depth, surface normals, boundaries."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Task
from .heads import DenseHead
from .losses import boundary_loss, depth_l1_loss, normal_cosine_loss, seg_loss
from .metrics import BoundaryMetric, DepthMetric, Metric, NormalMetric, SegMetric
from .registry import register_task

__all__ = ["SegTask", "DepthTask", "NormalsTask", "BoundaryTask"]


class _DenseTask(Task):
    dense = True
    out_channels: int = 1

    def __init__(self, head_channels: int | None = None) -> None:
        self.head_channels = head_channels

    def make_head(self, feature_channels: Sequence[int], input_size: tuple[int, int]) -> nn.Module:
        return DenseHead(feature_channels, self.out_channels, input_size, hidden_channels=self.head_channels)


@register_task("seg")
class SegTask(_DenseTask):
    """Semantic segmentation. Head -> logits [B,K,H,W]; target long [B,H,W] (``ignore_index`` skipped).

    Loss: cross-entropy. Metrics: ``miou`` (primary), ``pixel_acc`` — both %, higher is better.
    """

    name = "seg"
    metric_directions = (("miou", True), ("pixel_acc", True))
    primary_metric = "miou"

    def __init__(self, num_classes: int, ignore_index: int = 255, head_channels: int | None = None) -> None:
        super().__init__(head_channels)
        if int(num_classes) < 2:
            raise ValueError(f"seg needs num_classes >= 2, got {num_classes}")
        self.num_classes = self.out_channels = int(num_classes)
        self.ignore_index = int(ignore_index)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return seg_loss(pred, target, self.ignore_index)

    def metrics(self) -> Metric:
        return SegMetric(self.num_classes, self.ignore_index)

    def postprocess(self, pred: Tensor) -> Tensor:
        return pred.argmax(dim=1)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, ignore_index={self.ignore_index}"


@register_task("depth")
class DepthTask(_DenseTask):
    """Depth (or disparity) regression. Head -> [B,1,H,W]; target float [B,1,H,W], 0 = invalid.

    Loss: L1 over valid pixels. Metrics: ``abs_err``, ``rel_err``, ``rmse`` (primary, as in
    Vandenhende et al. / GatedMTL) — all lower is better.
    """

    name = "depth"
    metric_directions = (("abs_err", False), ("rel_err", False), ("rmse", False))
    primary_metric = "rmse"
    out_channels = 1

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return depth_l1_loss(pred, target)

    def metrics(self) -> Metric:
        return DepthMetric()


@register_task("normals")
class NormalsTask(_DenseTask):
    """Surface normals. Head -> [B,3,H,W] (any length); target unit vectors [B,3,H,W], 0 = invalid.

    Loss: 1 − mean cosine over valid pixels. Metrics (degrees / %): ``mean_angle`` (primary),
    ``median_angle`` (lower is better), ``within_11.25``, ``within_22.5``, ``within_30`` (higher).
    """

    name = "normals"
    metric_directions = (
        ("mean_angle", False),
        ("median_angle", False),
        ("within_11.25", True),
        ("within_22.5", True),
        ("within_30", True),
    )
    primary_metric = "mean_angle"
    out_channels = 3

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return normal_cosine_loss(pred, target)

    def metrics(self) -> Metric:
        return NormalMetric()

    def postprocess(self, pred: Tensor) -> Tensor:
        return F.normalize(pred, dim=1)


@register_task("boundary")
class BoundaryTask(_DenseTask):
    """Binary boundary (edge) detection. Head -> logits [B,1,H,W]; target {0,1} [B,1,H,W] or [B,H,W].

    Loss: class-balanced BCE (:func:`~gatedmtl.tasks.losses.boundary_loss`; ``pos_weight=None``:
    HED's per-batch balance). Metrics (%, all higher is better, :class:`BoundaryMetric` with
    ``tolerance`` pixels): ``odsf`` (primary), ``f1``, ``precision``, ``recall``.
    """

    name = "boundary"
    metric_directions = (("odsf", True), ("f1", True), ("precision", True), ("recall", True))
    primary_metric = "odsf"
    out_channels = 1

    def __init__(self, pos_weight: float | None = None, tolerance: int = 0, head_channels: int | None = None) -> None:
        super().__init__(head_channels)
        if pos_weight is not None and not 0.0 < float(pos_weight) < 1.0:
            raise ValueError(f"pos_weight must be in (0, 1) or None (per-batch balance), got {pos_weight}")
        self.pos_weight = None if pos_weight is None else float(pos_weight)
        self.tolerance = int(tolerance)
        BoundaryMetric(self.tolerance)  # validates the tolerance now rather than at the first evaluation

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return boundary_loss(pred, target, self.pos_weight)

    def metrics(self) -> Metric:
        return BoundaryMetric(self.tolerance)

    def postprocess(self, pred: Tensor) -> Tensor:
        return (pred > 0).float()

    def extra_repr(self) -> str:
        return f"pos_weight={self.pos_weight}, tolerance={self.tolerance}"
