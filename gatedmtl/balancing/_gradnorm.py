"""GradNorm: gradient normalisation for adaptive loss balancing (gradient-level)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ._base import GradientStrategy, check_real, task_vector
from ._registry import register

__all__ = ["GradNorm"]


@register
class GradNorm(GradientStrategy):
    r"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, *GradNorm: Gradient Normalization for
    Adaptive Loss Balancing in Deep Multitask Networks*, ICML 2018), as in LibMTL
    ``weighting/GradNorm.py`` (norms over *all* shared parameters, not only the last layer).

    Weights :math:`w = T\,\mathrm{softmax}(\ell)` with learnable logits :math:`\ell` (init 1;
    returned by :meth:`extra_parameters`, the trainer's optimizer steps them). Until the
    initial losses :math:`L_t(0)` are known (the epoch means passed to the first
    :meth:`end_epoch`, LibMTL: epoch 0), the update is EW's :math:`\sum_t g_t`. Afterwards:

    .. math::
        G_t &= \|w_t g_t\|, \quad \bar G = \mathrm{mean}_t G_t, \quad
        r_t = \frac{L_t / L_t(0)}{\mathrm{mean}_s L_s / L_s(0)}\\
        \mathcal{L}_{grad} &= \sum_t \left| G_t - \mathrm{sg}(\bar G\, r_t^{\alpha}) \right|
            \quad\Rightarrow\quad \ell.\mathrm{grad} \mathrel{+}= \nabla_\ell \mathcal{L}_{grad}\\
        d &= \sum_t \mathrm{sg}(w_t)\, g_t.

    Weights sum to :math:`T`: EW scale. Task-specific parameters receive
    :math:`\nabla\sum_t L_t` (LibMTL). State: :math:`\ell` and :math:`L(0)`.

    :param alpha: restoring-force exponent :math:`\alpha` (default 1.5).
    """

    name = "gradnorm"
    description = "GradNorm: w = T*softmax(l), l learned to equalise ||w_t g_t|| * training rates"

    def __init__(self, tasks: Sequence[str], *, alpha: float = 1.5) -> None:
        super().__init__(tasks)
        self.alpha = check_real(self.name, "alpha", alpha, ge=0.0)
        self.loss_scale = nn.Parameter(torch.ones(len(self.tasks)))
        self._initial: Tensor | None = None

    def extra_parameters(self) -> list[nn.Parameter]:
        return [self.loss_scale]

    def aggregate(self, jacobian: Tensor, values: Tensor) -> tuple[Tensor, list[float]]:
        n = len(self.tasks)
        if self._initial is None:
            return jacobian.sum(dim=0), [1.0] * n
        with torch.enable_grad():
            w = n * torch.softmax(self.loss_scale.to(jacobian.device), dim=0)
            norms = jacobian.norm(dim=1).to(w.dtype)
            g_norms = w * norms  # = ||w_t g_t|| since w_t > 0
            ratio = (values / self._initial).to(device=w.device, dtype=w.dtype)
            rate = ratio / ratio.mean()
            target = (g_norms.mean() * rate**self.alpha).detach()
            loss_grad = (g_norms - target).abs().sum()
            (d_scale,) = torch.autograd.grad(loss_grad, self.loss_scale)
        if self.loss_scale.grad is None:
            self.loss_scale.grad = d_scale
        else:
            self.loss_scale.grad += d_scale
        weights = w.detach()
        return weights.to(jacobian.dtype) @ jacobian, weights.tolist()

    def end_epoch(self, epoch: int, mean_losses: Mapping[str, float]) -> None:
        vec = task_vector(self.name, self.tasks, mean_losses, "mean_losses")
        if self._initial is None:
            if (vec <= 0).any():
                raise ValueError(f"{self.name}: initial epoch-mean losses must be > 0, got {dict(mean_losses)}")
            self._initial = vec

    def state_dict(self) -> dict[str, Tensor]:
        n = len(self.tasks)
        return {
            "loss_scale": self.loss_scale.detach().clone(),
            "initial_losses": self._initial.clone() if self._initial is not None else torch.zeros(n, dtype=torch.float64),
            "has_initial": torch.tensor(self._initial is not None),
        }

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        n = (len(self.tasks),)
        st = self._check_state(
            state, required={"loss_scale": n, "initial_losses": n, "has_initial": ()}, optional={}
        )
        with torch.no_grad():  # in place: the optimizer keeps referring to the same Parameter
            self.loss_scale.copy_(st["loss_scale"])
        self._initial = st["initial_losses"].to(torch.float64) if bool(st["has_initial"].item()) else None
