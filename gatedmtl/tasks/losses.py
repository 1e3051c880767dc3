"""Task losses (LibMTL / MTAN conventions). All return a scalar tensor."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "match_size",
    "seg_loss",
    "depth_l1_loss",
    "normal_cosine_loss",
    "classify_loss",
    "attributes_loss",
    "boundary_loss",
    "normal_valid_mask",
]


def match_size(pred: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinearly resize a dense prediction [B,C,h,w] to ``size`` (no-op when equal)."""
    if tuple(pred.shape[-2:]) == tuple(size):
        return pred
    return F.interpolate(pred, size=tuple(size), mode="bilinear", align_corners=False)


def _as_map(target: Tensor) -> Tensor:
    """[B,H,W] -> [B,1,H,W]; [B,C,H,W] unchanged."""
    return target.unsqueeze(1) if target.dim() == 3 else target


def seg_loss(pred: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """Cross-entropy of logits [B,K,H,W] against labels [B,H,W]; ``ignore_index`` pixels skipped.

    Returns 0 (with gradient graph) when every pixel is ignored.
    """
    pred = match_size(pred, target.shape[-2:])
    target = target.long()
    if not (target != ignore_index).any():
        return pred.sum() * 0.0
    return F.cross_entropy(pred, target, ignore_index=ignore_index)


def depth_l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean |pred - gt| over valid pixels (gt > 0 and finite: an ``inf`` disparity is invalid too).
    pred [B,1,H,W]; target [B,1,H,W] or [B,H,W]."""
    target = _as_map(target).float()
    pred = match_size(pred, target.shape[-2:]).float()  # float32 also under autocast
    valid = (target > 0) & torch.isfinite(target)
    diff = torch.where(valid, pred - torch.where(valid, target, 0.0), 0.0).abs()
    return diff.sum() / valid.sum().clamp_min(1).to(pred.dtype)


def normal_valid_mask(target: Tensor) -> Tensor:
    """Valid pixels of a normal map [B,3,H,W]: any component non-zero -> [B,H,W] bool."""
    return (target != 0).any(dim=1)


def normal_cosine_loss(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """1 - mean cosine between L2-normalised pred [B,3,H,W] and unit gt normals over valid pixels (gt != 0)."""
    pred = match_size(pred, target.shape[-2:]).float()  # float32 also under autocast
    target = target.float()
    pred = pred / pred.norm(p=2, dim=1, keepdim=True).clamp_min(eps)
    mask = normal_valid_mask(target).to(pred.dtype)
    cos = (pred * target).sum(dim=1)
    return 1.0 - (cos * mask).sum() / mask.sum().clamp_min(1.0)


def classify_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of logits [B,K] against class indices [B]."""
    return F.cross_entropy(pred, target.long())


def attributes_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy with logits [B,A] against {0,1} targets [B,A], mean over all entries."""
    return F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype))


def boundary_loss(pred: Tensor, target: Tensor, pos_weight: float | None = None) -> Tensor:
    """Class-balanced binary cross-entropy of boundary logits [B,1,H,W] against {0,1} maps.

    L = (w Σ_{y=1} bce + (1 − w) Σ_{y=0} bce) / N over all N pixels. ``pos_weight=None``: w is the
    fraction of non-boundary pixels in the batch (HED, Xie & Tu, ICCV 2015, Eq. 2); a number
    fixes it (Vandenhende et al. use 0.95 for PASCAL-Context edges). target [B,1,H,W] or [B,H,W].
    """
    target = _as_map(target).float()
    pred = match_size(pred, target.shape[-2:]).float()
    pos = (target > 0.5).to(pred.dtype)
    w = (1.0 - pos.mean()) if pos_weight is None else torch.as_tensor(float(pos_weight), dtype=pred.dtype)
    bce = F.binary_cross_entropy_with_logits(pred, pos, reduction="none")
    return (w * (bce * pos).sum() + (1.0 - w) * (bce * (1.0 - pos)).sum()) / pos.numel()
