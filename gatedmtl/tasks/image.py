"""Image-level tasks: single-label classification and multi-label attributes."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from .base import Task
from .heads import ImageHead
from .losses import attributes_loss, classify_loss
from .metrics import AttributeMetric, ClassifyMetric, Metric
from .registry import register_task

__all__ = ["ClassifyTask", "AttributesTask"]


@register_task("classify")
class ClassifyTask(Task):
    """Classification. Head -> logits [B,K]; target long [B]. Loss CE; metric ``acc`` (%)."""

    name = "classify"
    metric_directions = (("acc", True),)
    primary_metric = "acc"

    def __init__(self, num_classes: int) -> None:
        if int(num_classes) < 2:
            raise ValueError(f"classify needs num_classes >= 2, got {num_classes}")
        self.num_classes = int(num_classes)

    def make_head(self, feature_channels: Sequence[int], input_size: tuple[int, int]) -> nn.Module:
        return ImageHead(feature_channels, self.num_classes)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return classify_loss(pred, target)

    def metrics(self) -> Metric:
        return ClassifyMetric()

    def postprocess(self, pred: Tensor) -> Tensor:
        return pred.argmax(dim=1)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


@register_task("attributes")
class AttributesTask(Task):
    """Multi-label attributes. Head -> logits [B,A]; target float {0,1} [B,A].

    Loss BCE-with-logits; metric ``mean_acc`` (% mean over attributes of per-attribute accuracy).
    """

    name = "attributes"
    metric_directions = (("mean_acc", True),)
    primary_metric = "mean_acc"

    def __init__(self, num_attributes: int) -> None:
        if int(num_attributes) < 1:
            raise ValueError(f"attributes needs num_attributes >= 1, got {num_attributes}")
        self.num_attributes = int(num_attributes)

    def make_head(self, feature_channels: Sequence[int], input_size: tuple[int, int]) -> nn.Module:
        return ImageHead(feature_channels, self.num_attributes)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return attributes_loss(pred, target)

    def metrics(self) -> Metric:
        return AttributeMetric(self.num_attributes)

    def postprocess(self, pred: Tensor) -> Tensor:
        return (pred > 0).float()

    def extra_repr(self) -> str:
        return f"num_attributes={self.num_attributes}"
