"""Loss-balancing strategies for multi-task training.

A registry of plain classes sharing the :class:`Strategy` interface::

    from gatedmtl import balancing
    balancing.available()                     # sorted names
    balancing.describe()                      # [(name, description, {option: default})]
    s = balancing.create("db_mtl", tasks=["seg", "depth", "normals"], beta=0.9)
    weights = s.backward(losses, shared_params, task_params, step=k, epoch=e)

Loss-level (``needs_grads = False``): ``ew``, ``si``, ``dwa``, ``uw``, ``rlw``, ``famo``,
``go4align``. Gradient-level on the shared parameters (``needs_grads = True``): ``pcgrad``,
``upgrad``, ``mgda``, ``imtl_g``, ``cagrad``, ``nash_mtl``, ``gradnorm``, ``db_mtl``.

Scale of the update relative to EW's :math:`\\sum_t \\nabla L_t`; the last column is the
update when every task has the same gradient :math:`g` and the same loss :math:`L` (checked by
``tests/test_balancing.py::test_documented_scale``), EW giving :math:`T g`:

========== ======================================================== ==========================
name       scale                                                    identical gradients
========== ======================================================== ==========================
ew         sum (weights 1)                                          T g
dwa        sum (weights sum to T; 1 until two epochs are known)     T g
gradnorm   sum (weights T softmax(l) sum to T)                      T g
pcgrad     sum of the projected gradients (= EW without conflicts)  T g
mgda       T x min-norm point of the convex hull (weights sum to T) T g
go4align   cluster centroids of gamma (= 1 when losses are equal)   T g
cagrad     T/(1+c^2) x (mean + conflict-averse correction)          (1+c)/(1+c^2) T g
uw         (1/2) e^{-s_t} (s = 0 at start)                          T g / 2
rlw        mean (weights on the simplex)                            g
famo       mean (weights z_t/(c D_t) sum to 1)                      g
imtl_g     mean (weights sum to 1)                                  g
upgrad     mean (preference 1/T)                                    g
si         1/L_t per task (loss-scale invariant)                    T g / L
db_mtl     T x largest EMA log-loss gradient (loss-scale invariant) (1-beta^k) T g / L, step k
nash_mtl   alpha_t g_t.d = 1 (gradient-scale free), norm <= max_norm g/|g| (max_norm 1)
========== ======================================================== ==========================

Shared parameters in the trainer
--------------------------------

:meth:`gatedmtl.train.Trainer.train_step` passes ``net.encoder_parameters()`` as
``shared_params`` and ``net.head_parameters()`` as ``task_params``, on both archs:

* ``arch="shared"`` (hard sharing): the encoder is the one backbone every task reads, the
  usual MTL split.
* ``arch="gated"``: *every* encoder parameter, i.e. all ``T + 1`` slots (the shared slot 0 and
  each task's slot) plus the gate logits ``alpha`` and ``beta``, counts as shared. A task slot
  is not private to its task: the shared branch reads the mix
  :math:`\\psi' = \\sum_u \\mathrm{softmax}_u(\\beta) \\varphi'_u` of all task features, and
  every task reads the shared branch where its gate is closed
  (:math:`\\varphi'_t = m_t \\varphi_t + (1 - m_t) \\psi`), so task ``u``'s slot reaches
  :math:`L_t` through ``beta`` and the shared layers above, and the gates take part in every
  task's loss. Aggregating only slot 0 would miss the conflicts in those paths, and per-slot
  splitting would change with the gate pattern during training. Only the heads feed one
  task alone; they get the gradient their strategy's reference gives them: the plain sum
  :math:`\\sum_t \\nabla L_t` (LibMTL; PCGrad, UPGrad, IMTL-G, CAGrad, GradNorm, DB-MTL with
  its log-losses) or the weighted :math:`\\sum_t w_t \\nabla L_t` where the reference
  backpropagates the weighted loss (``mgda``, ``nash_mtl``).

  Cost: a gradient-level strategy holds a ``[T, n]`` Jacobian over all ``(T + 1)`` backbone
  copies and does ``T`` backward passes (resnet18, 3 tasks: 45 M encoder parameters): its
  step took 1.7-2.6x EW's on the gated arch, 1.3-1.6x on the hard-shared one, in
  ``benchmarks/results/balancing.md`` (resnet18, 32x48, CPU).
  While every gate is open (the initial state) the shared slot's columns of ``J`` are
  zero: they cost memory but do not change the aggregation. ``tests/test_balancing_train.py``
  checks the split and that each task's loss reaches every slot once some gates close.
"""

from ._base import GradientStrategy, LossStrategy, Strategy
from ._registry import available, create, describe, register
from ._linear import EW, RLW, SI
from ._adaptive import DWA, UW
from ._famo import FAMO
from ._go4align import GO4Align
from ._kmeans1d import kmeans_1d
from ._dbmtl import DBMTL
from ._gradnorm import GradNorm
from ._aggregators import CAGrad, IMTLG, MGDA, NashMTL, PCGrad, UPGrad

__all__ = [
    "Strategy",
    "LossStrategy",
    "GradientStrategy",
    "create",
    "available",
    "describe",
    "register",
    "kmeans_1d",
    "EW",
    "SI",
    "RLW",
    "UW",
    "DWA",
    "FAMO",
    "GO4Align",
    "DBMTL",
    "GradNorm",
    "PCGrad",
    "UPGrad",
    "MGDA",
    "IMTLG",
    "CAGrad",
    "NashMTL",
]
