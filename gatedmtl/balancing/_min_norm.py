"""Exact min-norm point of the convex hull of a few vectors, from their Gramian.

:func:`min_norm_weights` solves :math:`\\min_{\\lambda \\in \\Delta_T} \\lambda^\\top G \\lambda`
(the MGDA problem) with Wolfe's algorithm (P. Wolfe, *Finding the nearest point in a polytope*,
Math. Programming 11, 1976): an active-set method that keeps an affinely independent support
and, at each minor step, the exact affine minimiser over it, so it ends at the exact optimum
after finitely many steps (up to float64 rounding), unlike Frank-Wolfe, whose iterates approach
it at rate :math:`O(1/k)`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["min_norm_weights"]

_OPTIMALITY_TOL = 1e-12  # relative to the largest squared norm (Wolfe's Z1)
_POSITIVE_TOL = 1e-12  # affine weights at or below it leave the support (Wolfe's Z2)


def _affine_minimizer(gram: Tensor, support: list[int]) -> Tensor:
    """Weights ``mu`` (summing to 1) of the point of least norm in the affine hull of ``support``."""
    k = len(support)
    g = gram[support][:, support]
    kkt = torch.zeros(k + 1, k + 1, dtype=gram.dtype)
    kkt[:k, :k] = g
    kkt[:k, k] = 1.0
    kkt[k, :k] = 1.0
    rhs = torch.zeros(k + 1, dtype=gram.dtype)
    rhs[k] = 1.0
    solution = torch.linalg.lstsq(kkt, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    return solution[:k]


def min_norm_weights(gram: Tensor, max_iters: int = 1000) -> Tensor:
    """``argmin_{lambda in simplex} lambda^T gram lambda`` for a ``[T, T]`` PSD Gramian (float64).

    Returns the weights (on the simplex). All-zero vectors give uniform weights.
    """
    gram = gram.to(device="cpu", dtype=torch.float64)
    n = gram.shape[0]
    if gram.shape != (n, n) or n == 0:
        raise ValueError(f"min_norm_weights: expected a square [T, T] Gramian, got {tuple(gram.shape)}")
    scale = float(gram.diagonal().max())
    if not scale > 0.0:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    gram = gram / scale
    diag = gram.diagonal()
    first = int(torch.argmin(diag))
    support = [first]
    lam = torch.zeros(n, dtype=torch.float64)
    lam[first] = 1.0
    for _ in range(max_iters):
        gx = gram @ lam
        xx = float(lam @ gx)
        j = int(torch.argmin(gx))
        if xx - float(gx[j]) <= _OPTIMALITY_TOL or j in support:
            break
        support.append(j)
        while True:  # minor cycle: move towards the affine minimiser, dropping vanished points
            mu = _affine_minimizer(gram, support)
            if bool((mu > _POSITIVE_TOL).all()):
                lam.zero_()
                lam[support] = mu
                break
            current = lam[support]
            shrinking = mu <= _POSITIVE_TOL
            gap = current[shrinking] - mu[shrinking]
            steps = torch.where(gap > 0, current[shrinking] / gap.clamp_min(1e-300), torch.zeros_like(gap))
            theta = float(steps.min().clamp(0.0, 1.0))
            new = (current + theta * (mu - current)).clamp_min(0.0)
            new[shrinking.nonzero()[int(torch.argmin(steps))]] = 0.0  # the point that vanished
            lam.zero_()
            support = [s for s, v in zip(support, new.tolist()) if v > _POSITIVE_TOL]
            lam[support] = new[new > _POSITIVE_TOL]
            lam /= lam.sum()
    return lam
