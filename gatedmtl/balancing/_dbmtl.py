"""DB-MTL: dual-balancing multi-task learning (gradient-level)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ._base import LOG_EPS, GradientStrategy, check_real
from ._registry import register

__all__ = ["DBMTL"]


@register
class DBMTL(GradientStrategy):
    r"""DB-MTL (Lin, Ye, Xu, Shi & Zhang, *Dual-Balancing for Multi-Task Learning*, 2023), as in
    LibMTL ``weighting/DB_MTL.py``.

    Step :math:`k = 1, 2, \dots` (own counter), with :math:`\hat g_t` initialised to 0:

    .. math::
        g_t &= \nabla_{\theta_{sh}} \log(L_t + 10^{-8}) && \text{(loss-scale balance)}\\
        \hat g_t &\leftarrow g_t + \frac{\beta}{k^{\beta_\sigma}}(\hat g_t - g_t)
            && \text{(EMA; } = \beta\hat g_t + (1-\beta) g_t \text{ for } \beta_\sigma = 0)\\
        \alpha_t &= \frac{\max_s \|\hat g_s\|}{\|\hat g_t\| + 10^{-8}}
            && \text{(gradient-magnitude balance)}\\
        d &= \sum_t \alpha_t \hat g_t.

    Every EMA gradient is rescaled to the largest norm and the results are **summed**: the
    update has the scale of :math:`T` times the largest (EMA) log-loss gradient, which does not
    depend on the scale of any loss. Returned weights: :math:`\alpha_t`. Task-specific
    parameters receive :math:`\nabla\sum_t\log(L_t+10^{-8})` (LibMTL). Losses must be
    non-negative. State: the step counter and the ``[T, n]`` EMA buffer (on the parameters'
    device; it lives as long as the strategy and is saved in checkpoints).

    :param beta: EMA factor :math:`\beta` (default 0.9).
    :param beta_sigma: decay exponent :math:`\beta_\sigma` of the EMA factor (default 0).
    """

    name = "db_mtl"
    description = "DB-MTL: EMA of grad log L_t, each rescaled to the max norm, summed"

    def __init__(self, tasks: Sequence[str], *, beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        super().__init__(tasks)
        self.beta = check_real(self.name, "beta", beta, ge=0.0, le=1.0)
        self.beta_sigma = check_real(self.name, "beta_sigma", beta_sigma, ge=0.0)
        self._step = 0
        self._buffer: Tensor | None = None

    def task_objectives(self, losses: list[Tensor], values: Tensor) -> list[Tensor]:
        self._require_positive(values, strict=False)
        return [torch.log(l + LOG_EPS) for l in losses]

    def aggregate(self, jacobian: Tensor, values: Tensor) -> tuple[Tensor, list[float]]:
        buf = self._buffer
        if buf is None:
            buf = torch.zeros_like(jacobian)
        elif buf.shape != jacobian.shape:
            raise ValueError(
                f"{self.name}: the shared parameters changed size ({tuple(buf.shape)} -> "
                f"{tuple(jacobian.shape)}) since the EMA buffer was created"
            )
        else:
            buf = buf.to(device=jacobian.device, dtype=jacobian.dtype)
        self._step += 1
        factor = self.beta / self._step**self.beta_sigma
        # a new tensor each step (never in place), so state_dict() can hand out the buffer itself
        buf = torch.lerp(jacobian, buf, factor)  # = jacobian + factor * (buf - jacobian), one pass
        self._buffer = buf
        norms = buf.norm(dim=1)
        alpha = norms.max() / (norms + LOG_EPS)
        return alpha @ buf, alpha.tolist()

    def state_dict(self) -> dict[str, Tensor]:
        state = {"step": torch.tensor(self._step, dtype=torch.int64)}
        if self._buffer is not None:
            state["grad_buffer"] = self._buffer  # never modified in place (see aggregate)
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        st = self._check_state(state, required={"step": ()}, optional={"grad_buffer": None})
        buf = st.get("grad_buffer")
        if buf is not None and (buf.ndim != 2 or buf.shape[0] != len(self.tasks)):
            raise ValueError(
                f"{self.name}: state['grad_buffer'] must have shape [{len(self.tasks)}, n], got "
                f"{tuple(buf.shape)}"
            )
        self._step = int(st["step"].item())
        self._buffer = buf
