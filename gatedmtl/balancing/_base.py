"""Base classes of the loss-balancing strategies.

A :class:`Strategy` turns the per-task losses of one forward pass into ``.grad`` fields, in place
of ``sum(losses).backward()``. Two families share this interface:

* :class:`LossStrategy` (``needs_grads = False``) builds one scalar objective from the losses
  (weights computed from detached loss values and internal state) and calls ``backward`` once:
  every parameter of the graph receives the gradient of that objective.
* :class:`GradientStrategy` (``needs_grads = True``) backpropagates each task's objective
  separately, collects the per-task gradients of the *shared* parameters into a Jacobian
  ``J`` (one row per task) and replaces their gradient by an aggregation ``d = agg(J)``. The
  ``task_params`` (heads) receive, as the strategy's reference does, either the plain gradient
  of the sum of the per-task objectives (LibMTL: ``sum_t L_t``; ``sum_t log(L_t + 1e-8)`` for
  DB-MTL) or, where the reference backpropagates the weighted loss (Nash-MTL, MGDA),
  ``sum_t w_t grad f_t`` with the strategy's weights (:attr:`GradientStrategy.weights_task_params`).
  Any other parameter of the graph gets the plain sum.

In a data-parallel run the trainer passes gradient-level strategies an ``all_reduce`` callable
that averages the Jacobian over the ranks before the aggregation, so that the strategy combines
the per-task gradients of the global batch (:mod:`gatedmtl.parallel`).

Gradients are *accumulated* like ``loss.backward()`` does: a ``.grad`` that already holds a value
is added to, never overwritten.
"""

from __future__ import annotations

import inspect
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["Strategy", "LossStrategy", "GradientStrategy"]

LOG_EPS = 1e-8
"""Offset of the log-losses (``log(L + 1e-8)``), as in LibMTL's DB-MTL and FAMO."""


# --------------------------------------------------------------------------------------------
# option checking helpers (shared by all strategies)


def check_real(
    owner: str,
    name: str,
    value: object,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
) -> float:
    """Returns ``value`` as a finite float, or raises TypeError/ValueError naming the option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{owner}: option {name!r} must be a real number, got {type(value).__name__} "
            f"({value!r})"
        )
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{owner}: option {name!r} must be finite, got {out}")
    if ge is not None and out < ge:
        raise ValueError(f"{owner}: option {name!r} must be >= {ge}, got {out}")
    if gt is not None and out <= gt:
        raise ValueError(f"{owner}: option {name!r} must be > {gt}, got {out}")
    if le is not None and out > le:
        raise ValueError(f"{owner}: option {name!r} must be <= {le}, got {out}")
    return out


def check_int(owner: str, name: str, value: object, *, ge: int | None = None) -> int:
    """Returns ``value`` as an int, or raises TypeError/ValueError naming the option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{owner}: option {name!r} must be an int, got {type(value).__name__} ({value!r})"
        )
    out = int(value)
    if ge is not None and out < ge:
        raise ValueError(f"{owner}: option {name!r} must be >= {ge}, got {out}")
    return out


def check_tasks(owner: str, tasks: object, min_tasks: int) -> tuple[str, ...]:
    """Validates a task list: a non-string sequence of distinct non-empty names."""
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Iterable):
        raise TypeError(
            f"{owner}: tasks must be a sequence of task names, got {type(tasks).__name__}"
        )
    out = tuple(tasks)
    for t in out:
        if not isinstance(t, str) or not t:
            raise TypeError(f"{owner}: task names must be non-empty strings, got {t!r}")
    if not out:
        raise ValueError(f"{owner}: tasks must not be empty")
    dupes = sorted({t for t in out if out.count(t) > 1})
    if dupes:
        raise ValueError(f"{owner}: duplicate task names {dupes}")
    if len(out) < min_tasks:
        raise ValueError(
            f"{owner}: needs at least {min_tasks} tasks (a gradient-level strategy has nothing "
            f"to balance with one task), got {len(out)}: {list(out)}"
        )
    return out


def task_vector(owner: str, tasks: tuple[str, ...], values: Mapping[str, object], what: str) -> Tensor:
    """Orders a ``{task: number}`` mapping by ``tasks`` into a float64 CPU vector (finite)."""
    if not isinstance(values, Mapping):
        raise TypeError(f"{owner}: {what} must be a mapping task -> value, got {type(values).__name__}")
    _check_keys(owner, tasks, values, what)
    out = []
    for t in tasks:
        v = values[t]
        if isinstance(v, Tensor):
            if v.numel() != 1:
                raise ValueError(f"{owner}: {what}[{t!r}] must be a scalar, got shape {tuple(v.shape)}")
            v = v.detach().reshape(()).item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{owner}: {what}[{t!r}] must be a number, got {type(v).__name__}")
        if not math.isfinite(float(v)):
            raise ValueError(f"{owner}: {what}[{t!r}] is not finite ({v})")
        out.append(float(v))
    return torch.tensor(out, dtype=torch.float64)


def weighted_sum(losses: Sequence[Tensor], weights: Sequence[float | Tensor]) -> Tensor:
    """``sum_t weights[t] * losses[t]`` (works across loss dtypes; weights may be tensors)."""
    total = weights[0] * losses[0]
    for w, l in zip(weights[1:], losses[1:]):
        total = total + w * l
    return total


def _check_keys(owner: str, tasks: tuple[str, ...], values: Mapping[str, object], what: str) -> None:
    missing = [t for t in tasks if t not in values]
    extra = sorted(str(k) for k in values if k not in tasks)
    if missing or extra:
        raise ValueError(
            f"{owner}: {what} must have exactly the keys {list(tasks)}; missing {missing}, "
            f"unexpected {extra}"
        )


# --------------------------------------------------------------------------------------------


class Strategy(ABC):
    r"""A loss-balancing strategy for multi-task training.

    Each training step the trainer calls::

        weights = strategy.backward(losses, shared_params, task_params, step=k, epoch=e)
        (lam * regulariser).backward()            # optional, accumulates into .grad
        optimizer.step()                          # optimizer also holds extra_parameters()
        strategy.after_optimizer_step(recompute)  # FAMO only; no-op otherwise

    and ``strategy.end_epoch(e, mean_losses)`` at the end of each epoch.

    The combined update produced by ``backward`` is :math:`d = \sum_t w_t \nabla L_t` for a
    loss-level strategy with weights :math:`w` (returned for logging), and an aggregation
    :math:`d = \mathrm{agg}(J)` of the per-task Jacobian of the shared parameters for a
    gradient-level one. The scale of :math:`d` relative to equal weighting
    (:math:`\sum_t \nabla L_t`) is stated by each subclass.

    :param tasks: the task names, in a fixed order (weights and state tensors follow it).
    """

    name: ClassVar[str]
    """Registry key, e.g. ``"db_mtl"``."""
    description: ClassVar[str]
    """One-line description for ``balancing.describe()``."""
    needs_grads: ClassVar[bool] = False
    """True for gradient-level strategies (they need per-task gradients of shared params)."""
    min_tasks: ClassVar[int] = 1

    tasks: tuple[str, ...]

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = check_tasks(self.name, tasks, self.min_tasks)

    # -- interface -----------------------------------------------------------------------------

    @abstractmethod
    def backward(
        self,
        losses: Mapping[str, Tensor],
        shared_params: Sequence[nn.Parameter],
        task_params: Sequence[nn.Parameter] = (),
        *,
        step: int = 0,
        epoch: int = 0,
        all_reduce: Callable[[Tensor], None] | None = None,
    ) -> dict[str, float]:
        """Populates ``.grad`` (accumulating, like ``loss.backward()``) of ``shared_params``,
        ``task_params`` and every other parameter of the graph, and returns the task weights
        used (for logging).

        :param losses: one scalar loss per task (exactly the keys of :attr:`tasks`), all from
            the same forward pass. A non-finite loss raises ValueError before any gradient is
            touched.
        :param shared_params: parameters shared by all tasks (gradient-level strategies
            aggregate their per-task gradients; loss-level ones ignore the argument).
        :param task_params: parameters that feed one task only (heads). They, like any other
            parameter of the graph, receive the plain gradient of the objective.
        :param step: global step, informational (strategies keep their own counters in
            :meth:`state_dict`, so a resumed run continues exactly).
        :param epoch: current epoch, informational (epoch statistics come via
            :meth:`end_epoch`).
        :param all_reduce: data parallel only: averages a tensor over the ranks in place.
            Gradient-level strategies apply it to the Jacobian before aggregating; loss-level
            ones ignore it (DDP averages their single backward).

        Like ``loss.backward()``, the graph is freed afterwards.
        """

    def extra_parameters(self) -> list[nn.Parameter]:
        """Learnable strategy parameters that the trainer's optimizer must also step."""
        return []

    @property
    def extra_lr(self) -> float | None:
        """Learning rate of :meth:`extra_parameters` (``None``: the model's learning rate)."""
        return None

    def after_optimizer_step(self, recompute_losses: Callable[[], Mapping[str, Tensor]]) -> None:
        """Called after ``optimizer.step()``; ``recompute_losses`` re-evaluates the losses of
        the same batch (it is called under ``torch.no_grad()``). No-op by default."""
        return None

    def end_epoch(self, epoch: int, mean_losses: Mapping[str, float]) -> None:
        """Called at the end of each epoch with the epoch-mean training loss of each task.
        No-op by default."""
        return None

    def state_dict(self) -> dict[str, Tensor]:
        """All internal state as tensors (safetensors-compatible); empty if stateless."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restores the state returned by :meth:`state_dict` (exact resume)."""
        self._check_state(state, required={}, optional={})

    # -- introspection -------------------------------------------------------------------------

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """``{option: default}`` read from the constructor signature."""
        sig = inspect.signature(cls.__init__)
        return {
            p.name: p.default
            for p in sig.parameters.values()
            if p.name not in ("self", "tasks") and p.kind is p.KEYWORD_ONLY
        }

    def options(self) -> dict[str, Any]:
        """Current option values (same keys as :meth:`option_defaults`)."""
        return {k: getattr(self, k) for k in self.option_defaults()}

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}(tasks={list(self.tasks)}{opts})"

    # -- helpers for subclasses ----------------------------------------------------------------

    def _prepare_losses(self, losses: Mapping[str, Tensor]) -> tuple[list[Tensor], Tensor]:
        """Orders and validates the losses. Returns the loss tensors (task order, shape ``()``)
        and their detached values as a float64 CPU vector. Raises ValueError on a missing or
        unexpected task, a non-scalar or non-finite loss."""
        if not isinstance(losses, Mapping):
            raise TypeError(
                f"{self.name}: losses must be a dict task -> scalar tensor, got "
                f"{type(losses).__name__}"
            )
        _check_keys(self.name, self.tasks, losses, "losses")
        ordered = []
        for t in self.tasks:
            loss = losses[t]
            if not isinstance(loss, Tensor):
                raise TypeError(f"{self.name}: loss {t!r} must be a tensor, got {type(loss).__name__}")
            if loss.numel() != 1:
                raise ValueError(
                    f"{self.name}: loss {t!r} must be a scalar, got shape {tuple(loss.shape)}"
                )
            ordered.append(loss.reshape(()))
        # one host sync for all tasks
        values = torch.stack([l.detach().to(torch.float64) for l in ordered]).cpu()
        bad = [t for t, v in zip(self.tasks, values.tolist()) if not math.isfinite(v)]
        if bad:
            raise ValueError(
                f"{self.name}: non-finite loss for task(s) {bad}: "
                f"{dict(zip(self.tasks, values.tolist()))}"
            )
        if not any(l.requires_grad for l in ordered):
            raise ValueError(f"{self.name}: no loss requires grad; nothing to backpropagate")
        return ordered, values

    def _require_positive(self, values: Tensor, *, strict: bool = True) -> None:
        bad = [t for t, v in zip(self.tasks, values.tolist()) if (v <= 0 if strict else v < 0)]
        if bad:
            kind = "strictly positive" if strict else "non-negative"
            raise ValueError(
                f"{self.name}: uses log/ratios of the losses and needs {kind} losses; "
                f"got {dict(zip(self.tasks, values.tolist()))} (bad: {bad})"
            )

    def _check_state(
        self,
        state: Mapping[str, Tensor],
        required: Mapping[str, tuple[int, ...] | None],
        optional: Mapping[str, tuple[int, ...] | None],
    ) -> dict[str, Tensor]:
        """Checks keys, types and shapes (``None`` = any shape) of a state dict."""
        if not isinstance(state, Mapping):
            raise TypeError(f"{self.name}: state must be a mapping, got {type(state).__name__}")
        missing = [k for k in required if k not in state]
        unexpected = sorted(k for k in state if k not in required and k not in optional)
        if missing or unexpected:
            raise ValueError(
                f"{self.name}: bad state dict; missing keys {missing}, unexpected keys {unexpected}"
            )
        out = {}
        for k, v in state.items():
            if not isinstance(v, Tensor):
                raise TypeError(f"{self.name}: state[{k!r}] must be a tensor, got {type(v).__name__}")
            shape = {**optional, **required}[k]
            if shape is not None and tuple(v.shape) != shape:
                raise ValueError(
                    f"{self.name}: state[{k!r}] has shape {tuple(v.shape)}, expected {shape} "
                    f"(was the state saved with other tasks?)"
                )
            out[k] = v.detach().clone()
        return out


class LossStrategy(Strategy):
    """Loss-level strategy: one scalar objective, one ``backward``.

    Subclasses implement :meth:`objective`, returning the objective tensor and the effective
    weight of each task loss (the coefficient of :math:`\\nabla L_t` in the resulting gradient).
    """

    needs_grads: ClassVar[bool] = False

    @abstractmethod
    def objective(self, losses: list[Tensor], values: Tensor) -> tuple[Tensor, list[float]]:
        """``losses``: the loss tensors in task order; ``values``: their float64 CPU values."""

    def backward(
        self,
        losses: Mapping[str, Tensor],
        shared_params: Sequence[nn.Parameter],
        task_params: Sequence[nn.Parameter] = (),
        *,
        step: int = 0,
        epoch: int = 0,
        all_reduce: Callable[[Tensor], None] | None = None,
    ) -> dict[str, float]:
        ordered, values = self._prepare_losses(losses)
        total, weights = self.objective(ordered, values)
        total.backward()
        return dict(zip(self.tasks, (float(w) for w in weights)))


class GradientStrategy(Strategy):
    r"""Gradient-level strategy on the shared parameters.

    ``backward`` runs one ``backward`` per task objective :math:`f_t` (``retain_graph`` for all
    but the last; :math:`f_t = L_t` unless :meth:`task_objectives` says otherwise), stores the
    flattened gradient of the shared parameters as row :math:`t` of :math:`J \in
    \mathbb{R}^{T \times n}`, and finally sets the shared gradients to
    :math:`d = \mathrm{aggregate}(J)` (added to whatever ``.grad`` held before the call).
    The ``task_params`` receive :math:`\sum_t w_t \nabla f_t` with the returned weights if
    :attr:`weights_task_params`, else the plain :math:`\sum_t \nabla f_t`; every other
    parameter of the graph keeps the plain accumulated sum.
    """

    needs_grads: ClassVar[bool] = True
    min_tasks: ClassVar[int] = 2
    weights_task_params: ClassVar[bool] = False
    """True where the reference backpropagates ``sum_t w_t f_t``, so that the heads get the
    weighted gradient (Nash-MTL, MGDA); False where it gives them the plain sum (LibMTL)."""

    def task_objectives(self, losses: list[Tensor], values: Tensor) -> list[Tensor]:
        """The per-task objectives whose shared gradients form ``J`` (default: the losses)."""
        return losses

    @abstractmethod
    def aggregate(self, jacobian: Tensor, values: Tensor) -> tuple[Tensor, list[float]]:
        """Returns the shared update vector ``d`` (shape ``[n]``) and per-task weights to log.

        :param jacobian: ``[T, n]`` per-task gradients of the shared parameters.
        :param values: float64 CPU vector of the loss values.
        """

    def backward(
        self,
        losses: Mapping[str, Tensor],
        shared_params: Sequence[nn.Parameter],
        task_params: Sequence[nn.Parameter] = (),
        *,
        step: int = 0,
        epoch: int = 0,
        all_reduce: Callable[[Tensor], None] | None = None,
    ) -> dict[str, float]:
        ordered, values = self._prepare_losses(losses)
        if not isinstance(task_params, Tensor):
            task_params = list(task_params)  # iterated twice
        shared = self._check_params(shared_params, task_params)
        separate = [p for p in task_params if p.requires_grad] if self.weights_task_params else []
        objectives = self.task_objectives(ordered, values)
        jacobian, stash, per_task, separate_stash = _per_task_gradients(objectives, shared, separate)
        if all_reduce is not None:
            all_reduce(jacobian)
        update, weights = self.aggregate(jacobian, values)
        del jacobian
        _write_shared(shared, update, stash)
        if separate:
            _write_weighted(separate, [float(w) for w in weights], per_task, separate_stash)
        return dict(zip(self.tasks, (float(w) for w in weights)))

    def _check_params(
        self, shared_params: Iterable[nn.Parameter], task_params: Iterable[nn.Parameter]
    ) -> list[nn.Parameter]:
        if isinstance(shared_params, Tensor) or isinstance(task_params, Tensor):
            raise TypeError(f"{self.name}: shared_params/task_params must be sequences of parameters")
        shared_all = list(shared_params)
        for p in shared_all:
            if not isinstance(p, Tensor):
                raise TypeError(f"{self.name}: shared_params must hold tensors, got {type(p).__name__}")
        shared = [p for p in shared_all if p.requires_grad]
        if not shared:
            raise ValueError(
                f"{self.name}: gradient-level strategy needs at least one shared parameter that "
                f"requires grad"
            )
        ids = [id(p) for p in shared]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.name}: shared_params contains the same parameter twice")
        overlap = set(ids) & {id(p) for p in task_params}
        if overlap:
            raise ValueError(
                f"{self.name}: {len(overlap)} parameter(s) are both in shared_params and task_params"
            )
        devices = {p.device for p in shared}
        if len(devices) != 1:
            raise ValueError(f"{self.name}: shared parameters are on several devices {devices}")
        return shared


def _per_task_gradients(
    objectives: list[Tensor], shared: list[nn.Parameter], separate: Sequence[nn.Parameter] = ()
) -> tuple[Tensor, list[Tensor | None], list[list[Tensor | None]], list[Tensor | None]]:
    """Backpropagates each objective; returns ``J`` (``[T, n]``) of the shared parameters, their
    previous ``.grad`` values, and, for the ``separate`` parameters, each task's gradients and
    their previous ``.grad`` values. The ``.grad`` fields of both are left as ``None``."""
    stash = [p.grad for p in shared]
    for p in shared:
        p.grad = None
    separate_stash = [p.grad for p in separate]
    for p in separate:
        p.grad = None
    per_task: list[list[Tensor | None]] = []
    dtype = shared[0].dtype
    for p in shared[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    numel = sum(p.numel() for p in shared)
    jacobian = torch.zeros(len(objectives), numel, dtype=dtype, device=shared[0].device)
    last = max((i for i, f in enumerate(objectives) if f.requires_grad), default=-1)
    for i, f in enumerate(objectives):
        if not f.requires_grad:
            per_task.append([None] * len(separate))
            continue  # row stays zero: the task does not depend on any parameter
        f.backward(retain_graph=i < last)
        offset = 0
        for p in shared:
            n = p.numel()
            if p.grad is not None:
                jacobian[i, offset : offset + n].copy_(p.grad.reshape(-1))
                p.grad = None
            offset += n
        per_task.append([p.grad for p in separate])
        for p in separate:
            p.grad = None
    return jacobian, stash, per_task, separate_stash


def _write_shared(shared: list[nn.Parameter], update: Tensor, stash: list[Tensor | None]) -> None:
    offset = 0
    for p, old in zip(shared, stash):
        n = p.numel()
        g = update[offset : offset + n].reshape(p.shape).to(p.dtype)
        p.grad = g.clone() if old is None else old + g
        offset += n


def _write_weighted(
    params: list[nn.Parameter],
    weights: list[float],
    per_task: list[list[Tensor | None]],
    stash: list[Tensor | None],
) -> None:
    """``p.grad = old + sum_t weights[t] * per_task[t][p]`` (``None`` where no task reached p)."""
    for j, (p, old) in enumerate(zip(params, stash)):
        total: Tensor | None = None
        for w, grads in zip(weights, per_task):
            g = grads[j]
            if g is not None:
                total = g * w if total is None else total + g * w
        if total is None:
            p.grad = old
        else:
            p.grad = total if old is None else old + total
