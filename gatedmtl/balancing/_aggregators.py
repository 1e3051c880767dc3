"""Gradient-level strategies backed by ``torchjd.aggregation`` weightings.

Each strategy computes the Gramian :math:`G = J J^\\top` of the per-task shared gradients (in
float64 on the CPU, it is only ``T x T``), obtains task weights :math:`w` from the matching
torchjd weighting, rescales them to the reference convention stated in each docstring and
sets the shared update to :math:`d = w^\\top J`. Nash-MTL's weighting needs :math:`J` itself.

Heads (``task_params``): each strategy follows its reference. PCGrad, UPGrad, IMTL-G and CAGrad
give them the plain :math:`\\sum_t \\nabla L_t` (LibMTL; the IMTL paper updates each task's
own parameters with its own loss gradient, the nash-mtl PCGrad/CAGrad code backpropagates the
plain losses); MGDA and Nash-MTL give them :math:`\\sum_t w_t \\nabla L_t` with the weights of
the shared update, as the official MGDA code and nash-mtl do (they backpropagate the weighted
loss).

Optional solvers: CAGrad needs ``cvxpy`` (with its default ``clarabel``), Nash-MTL ``cvxpy``
and ``ecos``, UPGrad ``qpsolvers`` and ``quadprog``. A missing one raises an ImportError
when the strategy is created.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from ._base import GradientStrategy, check_int, check_real
from ._min_norm import min_norm_weights
from ._registry import register

__all__ = ["PCGrad", "UPGrad", "MGDA", "IMTLG", "CAGrad", "NashMTL"]

_INSTALL = "pip install 'gatedmtl[solvers]'"
_T = TypeVar("_T")


def _build(owner: str, factory: Callable[[], _T], packages: str) -> _T:
    """Instantiates a torchjd object, turning a missing optional solver into a clear error."""
    try:
        return factory()
    except ImportError as err:
        raise ImportError(
            f"balancing strategy {owner!r} needs the optional solver packages {packages}; "
            f"install them with: {_INSTALL}  (original error: {err})"
        ) from err


def _gramian(jacobian: Tensor) -> Tensor:
    return (jacobian @ jacobian.T).to(device="cpu", dtype=torch.float64)


def _combine(weights: Tensor, jacobian: Tensor) -> tuple[Tensor, list[float]]:
    w = weights.to(torch.float64).cpu()
    return w.to(device=jacobian.device, dtype=jacobian.dtype) @ jacobian, w.tolist()


@register
class PCGrad(GradientStrategy):
    r"""PCGrad / gradient surgery (Yu et al., *Gradient Surgery for Multi-Task Learning*,
    NeurIPS 2020, Alg. 1), via ``torchjd.aggregation.PCGradWeighting``.

    For each task :math:`i`, in a random order of the other tasks :math:`j`: if
    :math:`g_i^{pc}\cdot g_j < 0` then :math:`g_i^{pc} \leftarrow g_i^{pc} -
    \frac{g_i^{pc}\cdot g_j}{\|g_j\|^2} g_j`; finally :math:`d = \sum_i g_i^{pc}`.

    Scale: a **sum**, like EW (:math:`d = \sum_t g_t` when no pair conflicts; nash-mtl
    ``reduction='sum'``). Returned weights: the coefficients :math:`w` with
    :math:`d = \sum_t w_t g_t`. The orders are drawn from the strategy's own generator
    (seeded by ``seed``; the global RNG is left untouched) and its state is saved.

    :param seed: seed of the permutation generator (default 0).
    """

    name = "pcgrad"
    description = "PCGrad: project conflicting task gradients onto each other's normal plane, sum"

    def __init__(self, tasks: Sequence[str], *, seed: int = 0) -> None:
        super().__init__(tasks)
        self.seed = check_int(self.name, "seed", seed, ge=0)
        from torchjd.aggregation import PCGradWeighting

        self._weighting = PCGradWeighting()
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)

    def aggregate(self, jacobian: Tensor, values: Tensor) -> tuple[Tensor, list[float]]:
        gram = _gramian(jacobian)
        draw = int(torch.randint(0, 2**62, (1,), generator=self._generator).item())
        # torchjd permutes with the global CPU generator: run it on a forked copy seeded from
        # our generator, so the result is reproducible and the caller's RNG stream is unchanged
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(draw)
            weights = self._weighting(gram)
        return _combine(weights, jacobian)

    def state_dict(self) -> dict[str, Tensor]:
        return {"rng_state": self._generator.get_state().clone()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        st = self._check_state(state, required={"rng_state": None}, optional={})
        self._generator.set_state(st["rng_state"].to(torch.uint8))


@register
class UPGrad(GradientStrategy):
    r"""UPGrad (Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024), via
    ``torchjd.aggregation.UPGradWeighting`` (quadprog).

    Each :math:`g_i` is projected onto the dual cone :math:`\{x: Jx \ge 0\}` of the rows of
    :math:`J` and the projections are averaged:
    :math:`d = \frac1T \sum_i \pi_J(g_i)`, where :math:`\pi_J(J^\top u) = J^\top v` with
    :math:`v = \arg\min_{v \ge u} v^\top G v` (Gramian normalised by its trace, plus
    ``reg_eps`` on the diagonal). :math:`d` never conflicts with any task:
    :math:`g_t\cdot d \ge 0`.

    Scale: **mean** (preference vector :math:`1/T`, torchjd and LibMTL default): without
    conflicts :math:`d = \frac1T\sum_t g_t`, i.e. EW/T.

    :param norm_eps: Gramian trace below which the weights are 0 (default 1e-4).
    :param reg_eps: diagonal regularisation of the normalised Gramian (default 1e-4).
    """

    name = "upgrad"
    description = "UPGrad (torchjd): mean of projections of each g_t onto the dual cone of J"

    def __init__(self, tasks: Sequence[str], *, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> None:
        super().__init__(tasks)
        self.norm_eps = check_real(self.name, "norm_eps", norm_eps, ge=0.0)
        self.reg_eps = check_real(self.name, "reg_eps", reg_eps, ge=0.0)
        from torchjd.linalg import QuadprogProjector
        from torchjd.aggregation import UPGradWeighting

        self._weighting = _build(
            self.name,
            lambda: UPGradWeighting(
                projector=QuadprogProjector(norm_eps=self.norm_eps, reg_eps=self.reg_eps)
            ),
            "qpsolvers, quadprog",
        )

    def aggregate(self, jacobian: Tensor, values: Tensor) -> tuple[Tensor, list[float]]:
        return _combine(self._weighting(_gramian(jacobian)), jacobian)


@register
class MGDA(GradientStrategy):
    r"""MGDA (Désidéri 2012; Sener & Koltun, *Multi-Task Learning as Multi-Objective
    Optimization*, NeurIPS 2018): the min-norm point of the convex hull of the task gradients,

    .. math:: \lambda^* = \arg\min_{\lambda \in \Delta_T} \Big\|\sum_t \lambda_t g_t\Big\|^2,
              \qquad w = T \lambda^*, \qquad d = \sum_t w_t g_t.

    ``solver="exact"`` (default) solves this small QP on the ``T x T`` Gramian exactly with
    Wolfe's min-norm-point algorithm (an active-set method; float64). ``solver="frank_wolfe"``
    runs the Frank-Wolfe iterations of Sener & Koltun Alg. 2 instead
    (``torchjd.aggregation.MGDAWeighting`` from the uniform start, stopped by ``epsilon`` /
    ``max_iters``), which on 3 tasks can end several percent away from the optimum.

    Scale and heads, as nash-mtl (``MGDA.get_weighted_loss``): the weights are multiplied by
    :math:`T` (they sum to :math:`T`, "to match the sum loss") and the weighted loss
    :math:`\sum_t w_t L_t` is backpropagated, so the heads (``task_params``) receive
    :math:`\sum_t w_t \nabla L_t` (the official MGDA code does the same with
    :math:`\lambda^*`). No gradient normalisation (reference default ``'none'``).

    *MGDA-UB* is the same solver applied to the gradients w.r.t. the shared *representation*
    (one backward through the encoder instead of T); this strategy applies MGDA to the gradients
    of the shared parameters (exact MGDA, an upper-bound-free variant), as the trainer passes no
    features.

    :param solver: ``"exact"`` (default) or ``"frank_wolfe"``.
    :param epsilon: Frank-Wolfe only: stop when the step size falls below it (default 1e-3).
    :param max_iters: Frank-Wolfe only: maximal iterations (default 100).
    """

    name = "mgda"
    description = "MGDA: T * min-norm point of the convex hull of the task gradients (exact QP)"
    weights_task_params = True

    def __init__(
        self, tasks: Sequence[str], *, solver: str = "exact", epsilon: float = 1e-3, max_iters: int = 100
    ) -> None:
        super().__init__(tasks)
        if solver not in ("exact", "frank_wolfe"):
            raise ValueError(f"{self.name}: option 'solver' must be 'exact' or 'frank_wolfe', got {solver!r}")
        self.solver = solver
        self.epsilon = check_real(self.name, "epsilon", epsilon, gt=0.0)
        self.max_iters = check_int(self.name, "max_iters", max_iters, ge=1)
        from torchjd.aggregation import MGDAWeighting

        self._weighting = MGDAWeighting(epsilon=self.epsilon, max_iters=self.max_iters)

    def aggregate(self, jacobian: Tensor, values: Tensor) -> tuple[Tensor, list[float]]:
        gram = _gramian(jacobian)
        if self.solver == "exact":
            weights = min_norm_weights(gram)
        else:
            with torch.no_grad():
                weights = self._weighting(gram)
        return _combine(weights * len(self.tasks), jacobian)


@register
class IMTLG(GradientStrategy):
    r"""IMTL-G (Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021), gradient part,
    via ``torchjd.aggregation.IMTLGWeighting`` (pseudo-inverse form, robust to linearly
    dependent gradients):

    .. math:: w = \frac{G^{+} n}{\mathbf 1^\top G^{+} n},\quad n_t = \|g_t\|, \qquad
              d = \sum_t w_t g_t,

    which for independent gradients is the unique :math:`w` with :math:`\sum_t w_t = 1` and
    equal projections :math:`d\cdot g_t/\|g_t\|` for all :math:`t` (the closed form
    :math:`\alpha_{2:T} = g_1 U^\top (D U^\top)^{-1}` of the paper).

    Scale: weights sum to 1 (paper, nash-mtl, LibMTL): **mean**-like, EW/T for equal gradients.
    Heads: the plain :math:`\sum_t \nabla L_t`, as the paper's algorithm (each task's own
    parameters descend its own loss; the scaling factors act on the shared parameters) and
    LibMTL (``IMTL``) do; nash-mtl's ``IMTLG`` backpropagates :math:`\sum_t w_t L_t` instead.
    """

    name = "imtl_g"
    description = "IMTL-G: weights summing to 1 giving equal projections of d on every u_t"

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        from torchjd.aggregation import IMTLGWeighting

        self._weighting = IMTLGWeighting()

    def aggregate(self, jacobian: Tensor, values: Tensor) -> tuple[Tensor, list[float]]:
        return _combine(self._weighting(_gramian(jacobian)), jacobian)


@register
class CAGrad(GradientStrategy):
    r"""CAGrad (Liu, Liu, Jin, Stone & Liu, *Conflict-Averse Gradient Descent for Multi-task
    Learning*, NeurIPS 2021), via ``torchjd.aggregation.CAGradWeighting`` (cvxpy/Clarabel
    instead of the reference's scipy SLSQP):

    .. math::
        \bar g &= \tfrac1T \textstyle\sum_t g_t, \quad
        w^* = \arg\min_{w\in\Delta_T} g_w^\top \bar g + c\|\bar g\|\,\|g_w\|, \quad
        g_w = \textstyle\sum_t w_t g_t\\
        d &= \frac{T}{1+c^2}\Big(\bar g + \frac{c\|\bar g\|}{\|g_w^*\|} g_w^*\Big).

    Scale: nash-mtl's reference (``rescale=1`` then ``x T`` "to match the sum loss"): for
    identical task gradients :math:`d = \frac{1+c}{1+c^2}` x EW (1.21 x EW at c = 0.4).
    Needs ``cvxpy``.

    :param c: radius factor :math:`c` of the conflict-averse ball (default 0.4).
    :param norm_eps: Gramian trace / :math:`\|g_w\|` below which the update is 0 (default 1e-4).
    """

    name = "cagrad"
    description = "CAGrad: T/(1+c^2) * (g_mean + c|g_mean|/|g_w| g_w), worst-case improvement in a ball"

    def __init__(self, tasks: Sequence[str], *, c: float = 0.4, norm_eps: float = 1e-4) -> None:
        super().__init__(tasks)
        self.c = check_real(self.name, "c", c, ge=0.0)
        self.norm_eps = check_real(self.name, "norm_eps", norm_eps, ge=0.0)
        from torchjd.aggregation import CAGradWeighting

        self._weighting = _build(
            self.name, lambda: CAGradWeighting(c=self.c, norm_eps=self.norm_eps), "cvxpy"
        )

    def aggregate(self, jacobian: Tensor, values: Tensor) -> tuple[Tensor, list[float]]:
        weights = self._weighting(_gramian(jacobian))
        return _combine(weights * (len(self.tasks) / (1.0 + self.c**2)), jacobian)


@register
class NashMTL(GradientStrategy):
    r"""Nash-MTL (Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022), via the
    weighting of ``torchjd.aggregation.NashMTL`` (an adaptation of the official code; cvxpy +
    ECOS):

    .. math::
        \text{find } \alpha > 0 \text{ with } (J J^\top)\,\alpha = 1/\alpha
        \ \Leftrightarrow\ g_t \cdot d = 1/\alpha_t \ \forall t, \qquad
        d = \sum_t \alpha_t g_t,

    solved by CCCP (at most ``optim_niter`` convex problems; the Gramian is divided by its
    Frobenius norm inside the objective only, for conditioning). The solution is recomputed
    every ``update_weights_every`` steps, warm started from the previous :math:`\alpha`.

    As both references (nash-mtl ``NashMTL.backward``, LibMTL ``Nash_MTL.backward``), the loss
    :math:`\sum_t \alpha_t L_t` is backpropagated, so the heads (``task_params``) receive
    :math:`\sum_t \alpha_t \nabla L_t`, and then only the shared gradient is clipped to norm
    ``max_norm`` (``torch.nn.utils.clip_grad_norm_``: :math:`d \leftarrow d \min(1,
    \mathrm{max\_norm} / (\|d\| + 10^{-6}))`). The returned weights are :math:`\alpha`, before
    that clipping.

    Scale: independent of the gradient scale (multiplying every :math:`g_t` by :math:`k`
    divides :math:`\alpha` by :math:`k`; orthogonal gradients give
    :math:`d = \sum_t g_t/\|g_t\|`), then capped at ``max_norm``. Needs ``cvxpy`` and
    ``ecos``. State (saved): previous :math:`\alpha` and the step counter.

    :param max_norm: cap on :math:`\|d\|`; 0 disables it (default 1.0).
    :param update_weights_every: solve every this many steps (default 1).
    :param optim_niter: maximal CCCP iterations (default 20).
    """

    name = "nash_mtl"
    description = "Nash-MTL: bargaining solution (J J^T) alpha = 1/alpha, update norm capped at max_norm"
    weights_task_params = True

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
    ) -> None:
        super().__init__(tasks)
        self.max_norm = check_real(self.name, "max_norm", max_norm, ge=0.0)
        self.update_weights_every = check_int(self.name, "update_weights_every", update_weights_every, ge=1)
        self.optim_niter = check_int(self.name, "optim_niter", optim_niter, ge=1)
        from torchjd.aggregation import NashMTL as _TorchjdNashMTL

        self._aggregator = _build(
            self.name,
            lambda: _TorchjdNashMTL(
                n_tasks=len(self.tasks),
                max_norm=0.0,  # the bargaining alpha itself; the shared update is clipped below
                update_weights_every=self.update_weights_every,
                optim_niter=self.optim_niter,
            ),
            "cvxpy, ecos",
        )

    def aggregate(self, jacobian: Tensor, values: Tensor) -> tuple[Tensor, list[float]]:
        with warnings.catch_warnings():
            # torchjd's CCCP problem is not DPP: cvxpy warns on every solve
            warnings.filterwarnings("ignore", message=".*not DPP.*")
            alpha = self._aggregator.weighting(jacobian.detach())
        update, weights = _combine(alpha, jacobian)
        if self.max_norm > 0:
            norm = float(torch.linalg.vector_norm(update.double()))
            update = update * min(1.0, self.max_norm / (norm + 1e-6))
        return update, weights

    def state_dict(self) -> dict[str, Tensor]:
        w = self._aggregator.weighting
        return {
            "prev_alpha": torch.as_tensor(w.prvs_alpha, dtype=torch.float64).clone(),
            "step": torch.tensor(int(w.step), dtype=torch.int64),
        }

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        st = self._check_state(
            state, required={"prev_alpha": (len(self.tasks),), "step": ()}, optional={}
        )
        import numpy as np

        w = self._aggregator.weighting
        w.reset()
        # torchjd keeps alpha as a numpy array (float32 initially, solver output float64 later)
        w.prvs_alpha = st["prev_alpha"].numpy().astype(np.float64)
        step = int(st["step"].item())
        if step > 0:
            # torchjd builds its cvxpy problem on the first call (step == 0); a resumed
            # aggregator is past it, so build it now, warm-started from the restored alpha
            w._init_optim_problem()
            w.step = float(step)
