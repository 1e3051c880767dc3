"""Loss weightings that adapt from loss values: uncertainty weighting (UW) and DWA."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ._base import LossStrategy, check_real, task_vector, weighted_sum
from ._registry import register

__all__ = ["UW", "DWA"]


@register
class UW(LossStrategy):
    r"""Uncertainty weighting (Kendall, Gal & Cipolla, *Multi-Task Learning Using Uncertainty to
    Weigh Losses for Scene Geometry and Semantics*, CVPR 2018), in the form used by nash-mtl,
    FAMO and GO4Align:

    .. math:: \mathcal{L} = \sum_t \tfrac12\left(e^{-s_t} L_t + s_t\right),

    with learnable log-variances :math:`s` (initialised to 0) returned by
    :meth:`extra_parameters`: the trainer adds them to its optimizer in their own parameter
    group, at the learning rate ``lr`` (:attr:`extra_lr`; nash-mtl's ``--method-params-lr``,
    0.025, as in the nash-mtl, FAMO and GO4Align experiments), without weight decay and on the
    same schedule as the model. The returned weights are :math:`\tfrac12 e^{-s_t}`; at
    initialisation the update is half of EW's.

    ``s`` is created on the CPU (float32); it is moved to the losses' device inside the graph,
    so its gradient still lands on the CPU parameter (PyTorch optimizers accept that).

    :param lr: learning rate of the log-variances (default 0.025).
    """

    name = "uw"
    description = "Uncertainty weighting: sum_t 0.5*(exp(-s_t) L_t + s_t), s learnable (init 0)"

    def __init__(self, tasks: Sequence[str], *, lr: float = 0.025) -> None:
        super().__init__(tasks)
        self.lr = check_real(self.name, "lr", lr, gt=0.0)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))

    def extra_parameters(self) -> list[nn.Parameter]:
        return [self.log_vars]

    @property
    def extra_lr(self) -> float | None:
        return self.lr

    def objective(self, losses: list[Tensor], values: Tensor) -> tuple[Tensor, list[float]]:
        s = self.log_vars.to(losses[0].device)
        terms = [0.5 * (torch.exp(-s[i]) * l + s[i]) for i, l in enumerate(losses)]
        weights = (0.5 * torch.exp(-self.log_vars.detach().double())).tolist()
        return weighted_sum(terms, [1.0] * len(terms)), weights

    def state_dict(self) -> dict[str, Tensor]:
        return {"log_vars": self.log_vars.detach().clone()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        st = self._check_state(state, required={"log_vars": (len(self.tasks),)}, optional={})
        with torch.no_grad():  # in place: the optimizer keeps referring to the same Parameter
            self.log_vars.copy_(st["log_vars"])


@register
class DWA(LossStrategy):
    r"""Dynamic Weight Average (Liu, Johns & Davison, *End-to-End Multi-Task Learning with
    Attention*, CVPR 2019), epoch-level as in LibMTL:

    .. math:: w_t = T \cdot \mathrm{softmax}_t\!\left(\frac{r_t}{\tau}\right),\quad
              r_t = \frac{\bar L_t(e-1)}{\bar L_t(e-2)}, \qquad \mathcal{L} = \sum_t w_t L_t,

    where :math:`\bar L_t(e)` are the epoch-mean training losses passed to :meth:`end_epoch`.
    Until two epochs have been reported, :math:`w = 1` (LibMTL: epochs 0 and 1). Weights sum
    to :math:`T`: EW scale.

    :param temperature: :math:`\tau` (default 2.0).
    """

    name = "dwa"
    description = "Dynamic Weight Average: w = T*softmax(r/temp), r = ratio of last two epoch means"

    def __init__(self, tasks: Sequence[str], *, temperature: float = 2.0) -> None:
        super().__init__(tasks)
        self.temperature = check_real(self.name, "temperature", temperature, gt=0.0)
        self._history = torch.zeros(2, len(self.tasks), dtype=torch.float64)  # [older, newer]
        self._history_len = 0

    def current_weights(self) -> Tensor:
        """The weights that the next :meth:`backward` will use (float64)."""
        n = len(self.tasks)
        if self._history_len < 2:
            return torch.ones(n, dtype=torch.float64)
        ratio = self._history[1] / self._history[0]
        return n * torch.softmax(ratio / self.temperature, dim=0)

    def objective(self, losses: list[Tensor], values: Tensor) -> tuple[Tensor, list[float]]:
        weights = self.current_weights().tolist()
        return weighted_sum(losses, weights), weights

    def end_epoch(self, epoch: int, mean_losses: Mapping[str, float]) -> None:
        vec = task_vector(self.name, self.tasks, mean_losses, "mean_losses")
        if (vec == 0).any():
            raise ValueError(f"{self.name}: epoch-mean losses must be non-zero, got {dict(mean_losses)}")
        self._history = torch.stack([self._history[1], vec])
        self._history_len = min(self._history_len + 1, 2)

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "history": self._history.clone(),
            "history_len": torch.tensor(self._history_len, dtype=torch.int64),
        }

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        st = self._check_state(
            state, required={"history": (2, len(self.tasks)), "history_len": ()}, optional={}
        )
        n = int(st["history_len"].item())
        if not 0 <= n <= 2:
            raise ValueError(f"{self.name}: history_len must be 0, 1 or 2, got {n}")
        self._history = st["history"].to(torch.float64)
        self._history_len = n
