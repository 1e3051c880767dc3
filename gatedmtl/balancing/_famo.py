"""FAMO: fast adaptive multitask optimisation (loss-level, one extra no-grad forward)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from ._base import LOG_EPS, LossStrategy, check_real, task_vector, weighted_sum
from ._registry import register

__all__ = ["FAMO"]

_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam defaults, as in the reference


@register
class FAMO(LossStrategy):
    r"""FAMO (Liu, Liu, Jin, Stone & Liu, *FAMO: Fast Adaptive Multitask Optimization*,
    NeurIPS 2023), as in the official code and LibMTL.

    With logits :math:`w` (init 0), :math:`z = \mathrm{softmax}(w)` and
    :math:`D_t = L_t - L^{\min}_t + 10^{-8}`:

    .. math:: c = \sum_t z_t / D_t \ (\text{detached}), \qquad
              \mathcal{L} = \frac{1}{c}\sum_t z_t \log D_t, \qquad
              \nabla\mathcal{L} = \sum_t \underbrace{\frac{z_t}{c\,D_t}}_{\text{weight}} \nabla L_t.

    The weights sum to 1 (convex combination: *mean* scale, :math:`1/T` of EW when balanced).
    In :meth:`after_optimizer_step` the losses :math:`L'` of the same batch are recomputed (no
    grad), :math:`\delta = \log D(L) - \log D(L')` and the logits take one Adam step (lr
    ``w_lr``, L2 weight decay ``gamma``, betas (0.9, 0.999), eps 1e-8, exactly
    ``torch.optim.Adam``) on the gradient :math:`J_{\mathrm{softmax}}(w)^\top \delta =
    z \odot (\delta - z^\top\delta)`: tasks whose loss fell less gain weight. The Adam moments
    and step count are part of :meth:`state_dict`. The official code also clips the shared
    gradient norm to 1.0; that is left to the trainer.

    :param w_lr: learning rate of the logits (default 0.025).
    :param gamma: weight decay of the logits (default 1e-3: paper Alg. 2, LibMTL, FAMO run.sh).
    :param min_losses: :math:`L^{\min}`, a float for all tasks or a ``{task: float}`` dict
        (default 0).
    """

    name = "famo"
    description = "FAMO: sum_t z_t log(L_t - min) / c, logits z updated after each step (Adam)"

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        w_lr: float = 0.025,
        gamma: float = 1e-3,
        min_losses: float | Mapping[str, float] = 0.0,
    ) -> None:
        super().__init__(tasks)
        self.w_lr = check_real(self.name, "w_lr", w_lr, ge=0.0)
        self.gamma = check_real(self.name, "gamma", gamma, ge=0.0)
        n = len(self.tasks)
        if isinstance(min_losses, Mapping):
            self._min = task_vector(self.name, self.tasks, min_losses, "min_losses")
            self.min_losses: float | dict[str, float] = dict(zip(self.tasks, self._min.tolist()))
        elif isinstance(min_losses, numbers.Real) and not isinstance(min_losses, bool):
            value = check_real(self.name, "min_losses", min_losses)
            self._min = torch.full((n,), value, dtype=torch.float64)
            self.min_losses = value
        else:
            raise TypeError(
                f"{self.name}: option 'min_losses' must be a float or a dict task -> float, got "
                f"{type(min_losses).__name__}"
            )
        self._w = torch.zeros(n, dtype=torch.float64)
        self._exp_avg = torch.zeros(n, dtype=torch.float64)
        self._exp_avg_sq = torch.zeros(n, dtype=torch.float64)
        self._adam_step = 0
        self._prev: Tensor | None = None  # loss values of the last backward

    @property
    def logits(self) -> Tensor:
        """A copy of the task logits :math:`w` (float64)."""
        return self._w.clone()

    def _shifted(self, values: Tensor) -> Tensor:
        d = values - self._min + LOG_EPS
        if (d <= 0).any():
            raise ValueError(
                f"{self.name}: needs losses above min_losses, got losses "
                f"{dict(zip(self.tasks, values.tolist()))} with min_losses {self.min_losses}"
            )
        return d

    def objective(self, losses: list[Tensor], values: Tensor) -> tuple[Tensor, list[float]]:
        d = self._shifted(values)
        z = torch.softmax(self._w, dim=0)
        c = (z / d).sum()
        coef = (z / c).tolist()
        logs = [torch.log(l - float(m) + LOG_EPS) for l, m in zip(losses, self._min.tolist())]
        self._prev = values.clone()
        return weighted_sum(logs, coef), (z / (c * d)).tolist()

    def after_optimizer_step(self, recompute_losses: Callable[[], Mapping[str, Tensor]]) -> None:
        if self._prev is None:
            raise RuntimeError(f"{self.name}: after_optimizer_step called before backward")
        with torch.no_grad():
            new = task_vector(self.name, self.tasks, recompute_losses(), "recomputed losses")
        delta = torch.log(self._shifted(self._prev)) - torch.log(self._shifted(new))
        z = torch.softmax(self._w, dim=0)
        grad = z * (delta - (z * delta).sum())  # J_softmax(w)^T delta
        self._adam(grad)
        self._prev = None

    def _adam(self, grad: Tensor) -> None:
        # single-tensor torch.optim.Adam (amsgrad=False, maximize=False), in float64
        self._adam_step += 1
        grad = grad + self.gamma * self._w
        self._exp_avg = self._exp_avg + (1 - _BETA1) * (grad - self._exp_avg)
        self._exp_avg_sq = self._exp_avg_sq * _BETA2 + (1 - _BETA2) * grad * grad
        bc1 = 1 - _BETA1**self._adam_step
        bc2 = 1 - _BETA2**self._adam_step
        denom = self._exp_avg_sq.sqrt() / math.sqrt(bc2) + _ADAM_EPS
        self._w = self._w - (self.w_lr / bc1) * self._exp_avg / denom

    def state_dict(self) -> dict[str, Tensor]:
        n = len(self.tasks)
        return {
            "logits": self._w.clone(),
            "exp_avg": self._exp_avg.clone(),
            "exp_avg_sq": self._exp_avg_sq.clone(),
            "adam_step": torch.tensor(self._adam_step, dtype=torch.int64),
            "prev_losses": self._prev.clone() if self._prev is not None else torch.zeros(n, dtype=torch.float64),
            "has_prev": torch.tensor(self._prev is not None),
        }

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        n = (len(self.tasks),)
        st = self._check_state(
            state,
            required={"logits": n, "exp_avg": n, "exp_avg_sq": n, "adam_step": (), "prev_losses": n, "has_prev": ()},
            optional={},
        )
        self._w = st["logits"].to(torch.float64)
        self._exp_avg = st["exp_avg"].to(torch.float64)
        self._exp_avg_sq = st["exp_avg_sq"].to(torch.float64)
        self._adam_step = int(st["adam_step"].item())
        self._prev = st["prev_losses"].to(torch.float64) if bool(st["has_prev"].item()) else None
