"""Fixed-form loss scalarisations: equal weighting, scale-invariant (log) sum, random weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ._base import LossStrategy, check_int, weighted_sum
from ._registry import register

__all__ = ["EW", "SI", "RLW"]


@register
class EW(LossStrategy):
    r"""Equal weighting (linear scalarisation, "LS"/"uniform MTL").

    .. math:: \mathcal{L} = \sum_t L_t, \qquad w_t = 1.

    This is the reference scale of every other strategy. No options, no state.
    """

    name = "ew"
    description = "Equal weighting: sum_t L_t"

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)

    def objective(self, losses: list[Tensor], values: Tensor) -> tuple[Tensor, list[float]]:
        return weighted_sum(losses, [1.0] * len(losses)), [1.0] * len(losses)


@register
class SI(LossStrategy):
    r"""Scale-invariant scalarisation (Navon et al., *Multi-Task Learning as a Bargaining Game*,
    ICML 2022, baseline "SI"; nash-mtl ``ScaleInvariantLinearScalarization``).

    .. math:: \mathcal{L} = \sum_t \log L_t, \qquad \nabla\mathcal{L} = \sum_t \frac{1}{L_t}\nabla L_t.

    The returned weights are the effective gradient weights :math:`1/L_t`. Multiplying a task's
    loss by a constant leaves the update unchanged. Losses must be strictly positive.
    """

    name = "si"
    description = "Scale-invariant: sum_t log L_t (weights 1/L_t)"

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)

    def objective(self, losses: list[Tensor], values: Tensor) -> tuple[Tensor, list[float]]:
        self._require_positive(values)
        total = weighted_sum([torch.log(l) for l in losses], [1.0] * len(losses))
        return total, (1.0 / values).tolist()


@register
class RLW(LossStrategy):
    r"""Random loss weighting (Lin et al., *Reasonable Effectiveness of Random Weighting: A
    Litmus Test for Multi-Task Learning*, TMLR 2022).

    .. math:: w = \mathrm{softmax}(\xi),\ \xi \sim \mathcal{N}(0, I_T)\ \text{each step}, \qquad
              \mathcal{L} = \sum_t w_t L_t.

    The weights lie on the simplex (:math:`\sum_t w_t = 1`), so the update is on the *mean*
    scale: :math:`1/T` of EW's on average. :math:`\xi` is drawn from a ``torch.Generator`` owned
    by the strategy (never the global RNG), seeded with ``seed``; its state is part of
    :meth:`state_dict`, so a resumed run draws the same weights.

    :param seed: seed of the strategy's own generator (default 0).
    """

    name = "rlw"
    description = "Random loss weighting: w = softmax(N(0, I)) each step (sum w = 1)"

    def __init__(self, tasks: Sequence[str], *, seed: int = 0) -> None:
        super().__init__(tasks)
        self.seed = check_int(self.name, "seed", seed, ge=0)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)

    def objective(self, losses: list[Tensor], values: Tensor) -> tuple[Tensor, list[float]]:
        xi = torch.randn(len(losses), generator=self._generator, dtype=torch.float64)
        weights = torch.softmax(xi, dim=0).tolist()
        total = weighted_sum(losses, weights)
        return total, weights

    def state_dict(self) -> dict[str, Tensor]:
        return {"rng_state": self._generator.get_state().clone()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        st = self._check_state(state, required={"rng_state": None}, optional={})
        self._generator.set_state(st["rng_state"].to(torch.uint8))
