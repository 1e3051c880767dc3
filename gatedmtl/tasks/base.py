"""The :class:`Task` interface: name + head factory + loss + metric accumulator."""
from __future__ import annotations

import copy
from typing import Sequence

from torch import Tensor, nn

from .metrics import Metric

__all__ = ["Task"]


class Task:
    """One task of a multi-task network.

    Subclasses set ``name`` (the key of the task in batch and output dicts),
    ``metric_directions`` (read as the ``higher_is_better`` dict), ``primary_metric`` and implement
    :meth:`make_head`, :meth:`loss`, :meth:`metrics`.
    """

    name: str = ""
    #: (metric, higher is better) pairs; exposed as the ``higher_is_better`` dict
    metric_directions: tuple[tuple[str, bool], ...] = ()
    primary_metric: str = ""
    dense: bool = False  # True: per-pixel output upsampled to the input size

    @property
    def higher_is_better(self) -> dict[str, bool]:
        """Metric name -> True when a larger value is better (a fresh dict)."""
        return dict(self.metric_directions)

    def make_head(self, feature_channels: Sequence[int], input_size: tuple[int, int]) -> nn.Module:
        """Head mapping the backbone output for this task (list of [B,C_i,H_i,W_i], or [B,C] / [B,C,H,W])."""
        raise NotImplementedError

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Scalar training loss of a head output ``pred`` against a batch ``target``."""
        raise NotImplementedError

    def metrics(self) -> Metric:
        """A fresh metric accumulator (``update(pred, target)`` then ``compute()``)."""
        raise NotImplementedError

    def postprocess(self, pred: Tensor) -> Tensor:
        """Head output -> prediction in target units (e.g. argmax labels, unit normals)."""
        return pred

    def renamed(self, name: str) -> "Task":
        """A copy of this task under another key, e.g. two classification tasks ``left`` and ``right``."""
        if not name or not isinstance(name, str):
            raise ValueError(f"a task name must be a non-empty string, got {name!r}")
        task = copy.copy(self)
        task.name = name
        return task

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}{', ' + self.extra_repr() if self.extra_repr() else ''})"

