"""GO4Align: group optimisation for multi-task alignment (loss-level)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ._base import LossStrategy, check_int, check_real, weighted_sum
from ._kmeans1d import kmeans_1d
from ._registry import register

__all__ = ["GO4Align"]


@register
class GO4Align(LossStrategy):
    r"""GO4Align (Shen et al., *GO4Align: Group Optimization for Multi-Task Alignment*,
    NeurIPS 2024), as in the official code (``methods/cluster_methods.py``, class ``GO4ALIGN``).

    With detached losses :math:`L` and a probability vector :math:`p` (init :math:`1/T`),
    each step:

    .. math::
        \mathrm{scale}_t &= \frac{\sum_j L_j}{L_t} && \text{(scale balance)}\\
        p_t &\leftarrow \frac{p_t e^{-\eta L_t}}{\sum_j p_j e^{-\eta L_j}}
            && \text{(smooth alignment; } p_t \propto e^{-\eta\sum_{\tau\le k} L_t(\tau)})\\
        \gamma_t &= \mathrm{scale}_t\, p_t && \text{(risk-guided group indicator)}\\
        w_t &= \text{centroid of } t\text{'s cluster in a } K\text{-means of } \{\gamma_t\}
            && (K = 1:\ w_t = \mathrm{mean}(\gamma))\\
        \mathcal{L} &= \sum_t w_t L_t.

    ``K = 1`` (the official default) needs no clustering: :math:`w_t = \mathrm{mean}(\gamma)`,
    the reference formula (``tests/test_balancing.py`` checks it step by step). For ``K >= 2``
    the clustering is an *exact* 1-D k-means (:func:`~gatedmtl.balancing.kmeans_1d`, dynamic
    programming, deterministic), where the reference runs Lloyd's algorithm
    (``kmeans_pytorch``, Euclidean, random initial centres, until the centres move less than
    1e-4). Both minimise the same within-cluster sum of squares; Lloyd's can stop in a local
    optimum and its result depends on the random start, ours is the global optimum and depends
    on :math:`\gamma` only, so the weights agree whenever Lloyd's finds the optimal partition
    (for instance for well-separated groups). Scale: with equal losses and
    :math:`p = 1/T`, :math:`\gamma = 1` and the update equals EW's. Losses must be strictly
    positive. :math:`p` (float64) is the state.

    :param eta: step size :math:`\eta` of the smooth alignment (default 1e-4).
    :param groups: number of groups :math:`K`, ``1 <= K <= T`` (default 1, as in the official
        code).
    """

    name = "go4align"
    description = "GO4Align: w = K-means centroid of (sum L / L_t) * p_t, p <- p*exp(-eta L)"

    def __init__(self, tasks: Sequence[str], *, eta: float = 1e-4, groups: int = 1) -> None:
        super().__init__(tasks)
        self.eta = check_real(self.name, "eta", eta, ge=0.0)
        self.groups = check_int(self.name, "groups", groups, ge=1)
        if self.groups > len(self.tasks):
            raise ValueError(
                f"{self.name}: groups ({self.groups}) must not exceed the number of tasks "
                f"({len(self.tasks)})"
            )
        self._p = torch.full((len(self.tasks),), 1.0 / len(self.tasks), dtype=torch.float64)

    @property
    def p(self) -> Tensor:
        """A copy of the alignment probabilities :math:`p` (float64)."""
        return self._p.clone()

    def compute_weights(self, values: Tensor) -> Tensor:
        """Advances :math:`p` with the losses ``values`` and returns the weights (float64)."""
        self._require_positive(values)
        values = values.to(torch.float64)
        scale = values.sum() / values
        p = self._p * torch.exp(-self.eta * values)
        self._p = p / p.sum()
        gamma = scale * self._p
        if self.groups == 1:
            return torch.full_like(gamma, gamma.mean().item())
        labels, centroids = kmeans_1d(gamma.tolist(), self.groups)
        return torch.tensor([centroids[c] for c in labels], dtype=torch.float64)

    def objective(self, losses: list[Tensor], values: Tensor) -> tuple[Tensor, list[float]]:
        weights = self.compute_weights(values).tolist()
        return weighted_sum(losses, weights), weights

    def state_dict(self) -> dict[str, Tensor]:
        return {"p": self._p.clone()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        st = self._check_state(state, required={"p": (len(self.tasks),)}, optional={})
        self._p = st["p"].to(torch.float64)
