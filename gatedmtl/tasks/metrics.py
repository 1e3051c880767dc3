"""Metric accumulators pooled over a whole data set (LibMTL / Vandenhende conventions).

Every metric is a small object with ``update(pred, target)``, ``compute() -> dict[str, float]``,
``reset()`` and ``merge(other)`` (to combine the accumulators of several workers).
Percentages (mIoU, accuracies, % within a threshold) are reported in 0..100.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from .losses import match_size, normal_valid_mask

__all__ = [
    "Metric",
    "SegMetric",
    "DepthMetric",
    "NormalMetric",
    "ClassifyMetric",
    "AttributeMetric",
    "BoundaryMetric",
    "NORMAL_THRESHOLDS",
    "BOUNDARY_THRESHOLDS",
]

NORMAL_THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)
#: Probability thresholds over which :class:`BoundaryMetric` takes the best (ODS) F-score.
BOUNDARY_THRESHOLDS: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(1, 10))


class Metric:
    """Base accumulator. Subclasses keep plain CPU state so that they pickle and merge."""

    def update(self, pred: Tensor, target: Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def merge(self, other: "Metric") -> "Metric":
        """Add the state of ``other`` (same type and settings) into ``self``; returns ``self``."""
        raise NotImplementedError

    def _check_other(self, other: "Metric") -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")


class SegMetric(Metric):
    """Confusion-matrix segmentation metrics: ``miou`` and ``pixel_acc`` (both %).

    ``conf[g, p]`` counts pixels of ground-truth class g predicted as p, over every pixel whose
    label is not ``ignore_index``. IoU_c = conf[c,c] / (row_c + col_c - conf[c,c]) (LibMTL
    ``SegMetric``); the mean skips classes that never occur in gt nor prediction (0/0).
    ``pred`` is logits [B,K,h,w] (resized to the label size, argmax over K) or labels [B,H,W].
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reset()

    def reset(self) -> None:
        self.conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.dim() == target.dim() + 1:
            pred = match_size(pred, target.shape[-2:]).argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} does not match target {tuple(target.shape)}")
        target = target.long()
        valid = target != self.ignore_index
        t = target[valid]
        p = pred.long()[valid]
        k = self.num_classes
        if t.numel() and (t.min() < 0 or t.max() >= k):
            raise ValueError(
                f"segmentation target has labels outside [0, {k}) other than ignore_index={self.ignore_index}"
            )
        if p.numel() and (p.min() < 0 or p.max() >= k):
            raise ValueError(f"predicted labels outside [0, {k})")
        self.conf += torch.bincount(t * k + p, minlength=k * k).reshape(k, k).cpu()

    def compute(self) -> dict[str, float]:
        conf = self.conf.double()
        diag = conf.diag()
        union = conf.sum(0) + conf.sum(1) - diag
        present = union > 0
        total = conf.sum()
        miou = (diag[present] / union[present]).mean().item() if present.any() else math.nan
        acc = (diag.sum() / total).item() if total > 0 else math.nan
        return {"miou": 100.0 * miou, "pixel_acc": 100.0 * acc}

    def merge(self, other: Metric) -> "SegMetric":
        self._check_other(other)
        assert isinstance(other, SegMetric)
        self.conf += other.conf
        return self


def _as_maps(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, H, W]`` or ``[B, 1, H, W]`` maps -> ``[B, 1, H, W]``, ``pred`` resized to the target's H x W."""
    if target.dim() == 3:
        target = target.unsqueeze(1)
    if pred.dim() == 3:
        pred = pred.unsqueeze(1)
    return match_size(pred, target.shape[-2:]), target


class DepthMetric(Metric):
    """Depth errors over valid pixels (gt > 0 and finite, so that an ``inf`` disparity counts as
    invalid), pooled over all pixels of the data set.

    ``abs_err`` = Σ|p−g|/N, ``rel_err`` = Σ(|p−g|/g)/N (LibMTL/MTAN), ``rmse`` = sqrt(Σ(p−g)²/N)
    (Vandenhende). pred [B,1,h,w] (resized to the target); target [B,1,H,W] or [B,H,W].
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.abs_sum = 0.0
        self.rel_sum = 0.0
        self.sq_sum = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        pred, target = _as_maps(pred, target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} does not match target {tuple(target.shape)}")
        valid = (target > 0) & torch.isfinite(target)
        g = target[valid].double()
        p = pred[valid].double()
        diff = (p - g).abs()
        self.abs_sum += diff.sum().item()
        self.rel_sum += (diff / g).sum().item()
        self.sq_sum += diff.square().sum().item()
        self.count += int(g.numel())

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            return {"abs_err": math.nan, "rel_err": math.nan, "rmse": math.nan}
        n = self.count
        return {"abs_err": self.abs_sum / n, "rel_err": self.rel_sum / n, "rmse": math.sqrt(self.sq_sum / n)}

    def merge(self, other: Metric) -> "DepthMetric":
        self._check_other(other)
        assert isinstance(other, DepthMetric)
        self.abs_sum += other.abs_sum
        self.rel_sum += other.rel_sum
        self.sq_sum += other.sq_sum
        self.count += other.count
        return self


class NormalMetric(Metric):
    """Angular error of surface normals, in degrees, pooled over every valid pixel of the set.

    The prediction [B,3,h,w] is L2-normalised; error = degrees(acos(clamp(<p,g>, −1, 1))) on
    pixels whose gt is non-zero. Reports ``mean_angle``, ``median_angle`` (numpy median of all
    pixel errors) and ``within_11.25``, ``within_22.5``, ``within_30`` (% of pixels below).
    Keeps every pixel error (float32, CPU) so the median is exact.
    """

    def __init__(self, thresholds: Iterable[float] = NORMAL_THRESHOLDS, eps: float = 1e-8) -> None:
        self.thresholds = tuple(float(t) for t in thresholds)
        self.eps = eps
        self.reset()

    def reset(self) -> None:
        self.errors: list[np.ndarray] = []

    @staticmethod
    def angle_errors(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
        """Per-valid-pixel angles (degrees, 1-D) between normalised pred [B,3,H,W] and gt."""
        pred = match_size(pred, target.shape[-2:]).double()
        pred = pred / pred.norm(dim=1, keepdim=True).clamp_min(eps)
        cos = (pred * target.double()).sum(dim=1).clamp(-1.0, 1.0)
        return torch.rad2deg(torch.acos(cos[normal_valid_mask(target)]))

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape[:2] != target.shape[:2] or pred.shape[1] != 3:
            raise ValueError(f"normals must be [B,3,H,W]; got pred {tuple(pred.shape)}, target {tuple(target.shape)}")
        err = self.angle_errors(pred, target, self.eps)
        self.errors.append(err.float().cpu().numpy())

    def compute(self) -> dict[str, float]:
        err = np.concatenate(self.errors) if self.errors else np.zeros(0, np.float32)
        if err.size == 0:
            out = {"mean_angle": math.nan, "median_angle": math.nan}
            out.update({_within_key(t): math.nan for t in self.thresholds})
            return out
        err64 = err.astype(np.float64)
        out = {"mean_angle": float(err64.mean()), "median_angle": float(np.median(err64))}
        out.update({_within_key(t): 100.0 * float((err64 < t).mean()) for t in self.thresholds})
        return out

    def merge(self, other: Metric) -> "NormalMetric":
        self._check_other(other)
        assert isinstance(other, NormalMetric)
        self.errors.extend(other.errors)
        return self


def _within_key(t: float) -> str:
    return f"within_{t:g}"


class ClassifyMetric(Metric):
    """Top-1 accuracy (%) of logits [B,K] (or labels [B]) against labels [B]."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.total = 0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.dim() == 2:
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} does not match target {tuple(target.shape)}")
        self.correct += int((pred.long() == target.long()).sum().item())
        self.total += int(target.numel())

    def compute(self) -> dict[str, float]:
        return {"acc": 100.0 * self.correct / self.total if self.total else math.nan}

    def merge(self, other: Metric) -> "ClassifyMetric":
        self._check_other(other)
        assert isinstance(other, ClassifyMetric)
        self.correct += other.correct
        self.total += other.total
        return self


class AttributeMetric(Metric):
    """Multi-label accuracy: per-attribute accuracy of ``logit > 0`` vs {0,1} targets, averaged (%).

    ``compute`` gives ``mean_acc``; ``per_attribute()`` gives the A accuracies.
    """

    def __init__(self, num_attributes: int) -> None:
        self.num_attributes = int(num_attributes)
        self.reset()

    def reset(self) -> None:
        self.correct = torch.zeros(self.num_attributes, dtype=torch.int64)
        self.total = 0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape != target.shape or pred.dim() != 2 or pred.shape[1] != self.num_attributes:
            raise ValueError(
                f"expected pred and target [B,{self.num_attributes}], got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        hit = (pred > 0) == (target > 0.5)
        self.correct += hit.sum(dim=0).cpu()
        self.total += int(target.shape[0])

    def per_attribute(self) -> list[float]:
        if not self.total:
            return [math.nan] * self.num_attributes
        return (100.0 * self.correct.double() / self.total).tolist()

    def compute(self) -> dict[str, float]:
        return {"mean_acc": float(np.mean(self.per_attribute()))}

    def merge(self, other: Metric) -> "AttributeMetric":
        self._check_other(other)
        assert isinstance(other, AttributeMetric)
        self.correct += other.correct
        self.total += other.total
        return self


class BoundaryMetric(Metric):
    """Boundary detection: precision, recall and F-score (%), pooled over every pixel of the set.

    A predicted boundary pixel is correct when a ground-truth boundary pixel lies within
    ``tolerance`` pixels (chessboard distance; default 0: the same pixel), and a ground-truth
    pixel is recalled when a predicted one lies within ``tolerance`` of it: with a tolerance, a
    dilation-based stand-in for the one-to-one matching of the BSDS benchmark (it can only
    score higher). P = correct / predicted, R = recalled / ground truth (0 when there is nothing
    to count), F = 2PR / (P + R). ``precision``, ``recall`` and ``f1`` are at probability 0.5
    (logit 0); ``odsf`` is the best F over :data:`BOUNDARY_THRESHOLDS` with one threshold for
    the whole data set (the "ODS F" of edge benchmarks); all NaN before any boundary or
    prediction was seen. ``pred`` is logits [B,1,h,w] (resized to the target); target {0,1}
    [B,1,H,W] or [B,H,W].
    """

    def __init__(self, tolerance: int = 0, thresholds: Iterable[float] = BOUNDARY_THRESHOLDS) -> None:
        if int(tolerance) < 0:
            raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
        self.tolerance = int(tolerance)
        self.thresholds = tuple(float(t) for t in thresholds)
        if not self.thresholds or not all(0.0 < t < 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds must be probabilities in (0, 1), got {self.thresholds}")
        if 0.5 not in self.thresholds:
            self.thresholds = tuple(sorted(self.thresholds + (0.5,)))
        self.reset()

    def reset(self) -> None:
        k = len(self.thresholds)
        self.predicted = torch.zeros(k, dtype=torch.int64)
        self.correct = torch.zeros(k, dtype=torch.int64)
        self.recalled = torch.zeros(k, dtype=torch.int64)
        self.truth = 0

    def _dilate(self, m: Tensor) -> Tensor:
        if self.tolerance == 0:
            return m
        k = 2 * self.tolerance + 1
        return torch.nn.functional.max_pool2d(m.float(), k, stride=1, padding=self.tolerance) > 0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        pred, target = _as_maps(pred.float(), target)
        if pred.shape != target.shape or pred.shape[1] != 1:
            raise ValueError(f"boundary maps must be [B,1,H,W]; got pred {tuple(pred.shape)}, target {tuple(target.shape)}")
        gt = target > 0.5
        gt_near = self._dilate(gt)
        self.truth += int(gt.sum())
        prob = torch.sigmoid(pred)
        for i, t in enumerate(self.thresholds):
            p = prob >= t
            self.predicted[i] += int(p.sum())
            self.correct[i] += int((p & gt_near).sum())
            self.recalled[i] += int((gt & self._dilate(p)).sum())

    def _scores(self, i: int) -> tuple[float, float, float]:
        """(P, R, F) at threshold i; 0 where a ratio has nothing to count (no prediction, no boundary)."""
        prec = self.correct[i].item() / self.predicted[i].item() if self.predicted[i] else 0.0
        rec = self.recalled[i].item() / self.truth if self.truth else 0.0
        return prec, rec, 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0

    def compute(self) -> dict[str, float]:
        if self.truth == 0 and not self.predicted.any():
            return {"odsf": math.nan, "f1": math.nan, "precision": math.nan, "recall": math.nan}
        scores = [self._scores(i) for i in range(len(self.thresholds))]
        half = scores[self.thresholds.index(0.5)]
        return {"odsf": 100.0 * max(s[2] for s in scores), "f1": 100.0 * half[2],
                "precision": 100.0 * half[0], "recall": 100.0 * half[1]}

    def merge(self, other: Metric) -> "BoundaryMetric":
        self._check_other(other)
        assert isinstance(other, BoundaryMetric)
        if other.thresholds != self.thresholds or other.tolerance != self.tolerance:
            raise ValueError("cannot merge boundary metrics with different thresholds or tolerance")
        self.predicted += other.predicted
        self.correct += other.correct
        self.recalled += other.recalled
        self.truth += other.truth
        return self
