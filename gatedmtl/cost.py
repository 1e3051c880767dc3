"""FLOP counting (fvcore: one multiply-add = one FLOP, eval mode) and the gate cost model.

**Convention.** A "FLOP" is one multiply-add, as fvcore counts (timm and most papers write
GMACs for the same number; ``torch.utils.flop_counter`` counts 2 per multiply-add). Which ops
count is decided in :mod:`gatedmtl.flop_ops`: fvcore's handles plus the contractions it lacks
(attention kernels, ``baddbmm``, string-padded convolutions, recurrent layers, ...); elementwise
ops are not counted (:data:`gatedmtl.flop_ops.NOT_COUNTED`). An op that does real compute and
has no handle is never dropped silently: :func:`count_flops` warns
(:class:`UncountedFlopsWarning`) and :attr:`FlopCount.uncounted_compute` names it.

**Shapes.** Every function here takes ``input_shape``: the shape of the input tensor,
``(B, C, H, W)`` (``(B, C, ...)`` for other inputs), and returns FLOPs of one forward pass on
it; per-sample numbers are those at ``B = 1``. For a gated or lean model a shape without the
batch axis (its ``input_size``, ``(C, H, W)``) raises a ``ValueError``.

The lean model's FLOPs follow from the gates alone (per sample)::

    flops(lean) = sum_layers sum_c cost_c * live_c  +  K * R  +  C
    live_c      = sum_t m_tc + (1 - prod_t m_tc)       # own task filters + shared filter if any task borrows it

where ``cost_c`` is fvcore's count of one filter (plus its fused norm channel) of one slot,
``R`` the per-slot FLOPs outside gated layers, ``K`` the number of slots the lean model folds
(:func:`gatedmtl.prune.computed_slots`; ``S = T + 1`` unless every gate is closed or open) and
``C`` the FLOPs of shared modules applied to batch-independent tensors (they run once per
forward pass, whatever the batch and the number of slots).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .flop_ops import EXTRA_HANDLES, uncounted_compute
from .gates import ChannelGate
from .prune import LeanModel, computed_slots
from .slots import SlotModule, iter_tensors
from .surgery import GatedModel, _parents

__all__ = ["count_flops", "count_params", "predict_flops", "expected_flops", "flop_bounds", "measure_flops",
           "analyze", "FlopAnalysis", "FlopCount", "UncountedFlopsWarning", "flops_by_module", "shared_branch"]


class UncountedFlopsWarning(UserWarning):
    """fvcore met ops that do real compute but have no FLOP handle: the count misses their FLOPs."""


class _TupleOutput(nn.Module):
    """Wraps a model so that its (nested) output becomes a flat tuple, as jit tracing wants."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(iter_tensors(self.model(x)))


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(v) for v in input_shape)
    if len(shape) < 2 or any(v <= 0 for v in shape):
        raise ValueError(f"input_shape must be (B, C, ...) with positive sizes, got {tuple(input_shape)}")
    return shape


def _model_shape(model: nn.Module, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    """``input_shape`` checked against a gated / lean model's ``input_size``; ``None``: batch 1 at that size."""
    size = tuple(getattr(model, "input_size", ())) if isinstance(model, (GatedModel, LeanModel)) else ()
    if input_shape is None:
        if not size:
            raise ValueError("input_shape is required for a plain model, e.g. (1, 3, 224, 224)")
        return (1, *size)
    shape = tuple(int(v) for v in input_shape)
    if size and (len(shape) != len(size) + 1 or shape[1] != size[0]):
        hint = (f"; {shape} looks like a per-sample input_size: add the batch axis, e.g. (1, {', '.join(map(str, shape))})"
                if len(shape) == len(size) else "")
        raise ValueError(f"input_shape must be the input tensor's shape (B, {size[0]}, ...) with {len(size) + 1} dims, "
                         f"e.g. (1, {', '.join(map(str, size))}); got {shape}{hint}")
    return _check_shape(shape)


@dataclass(frozen=True)
class FlopCount:
    """fvcore's count of one forward pass (eval mode).

    Attributes:
        total: FLOPs (one multiply-add = one FLOP).
        by_module: FLOPs per module name (``""``: the whole model).
        uncounted: ``{aten op: calls}`` that fvcore met and did not count: ops of
            :data:`gatedmtl.flop_ops.NOT_COUNTED` (elementwise etc., by convention) and any op
            without a handle.
    """

    total: int
    by_module: dict[str, int]
    uncounted: dict[str, int] = field(default_factory=dict)

    @property
    def uncounted_compute(self) -> dict[str, int]:
        """Uncounted ops outside :data:`~gatedmtl.flop_ops.NOT_COUNTED`: real compute missing from ``total``."""
        return uncounted_compute(self.uncounted)


def measure_flops(model: nn.Module, input_shape: Sequence[int]) -> FlopCount:
    """fvcore's count of ``model`` on a random input of ``input_shape`` ``(B, C, H, W)``, in eval mode."""
    from fvcore.nn import FlopCountAnalysis

    shape = _model_shape(model, input_shape)
    was_training = model.training
    model.eval()
    try:
        x = torch.randn(shape, device=next(iter(model.parameters()), torch.empty(0)).device)
        analysis = FlopCountAnalysis(_TupleOutput(model), x).set_op_handle(**EXTRA_HANDLES)
        analysis.unsupported_ops_warnings(False)  # returned in FlopCount.uncounted instead of logged one by one
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        with warnings.catch_warnings():  # tracing chatter from backbone code (shape asserts etc.)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.", category=FutureWarning)
            total = int(analysis.total())
        by = {k[len("model."):] if k.startswith("model.") else ("" if k == "model" else k): int(v)
              for k, v in analysis.by_module().items()}
        uncounted = {op: int(n) for op, n in sorted(analysis.unsupported_ops().items())}
    finally:
        model.train(was_training)
    return FlopCount(total, by, uncounted)


def _warn_uncounted(count: FlopCount, model: nn.Module) -> None:
    missing = count.uncounted_compute
    if missing:
        ops = ", ".join(f"{op} x{n}" for op, n in missing.items())
        warnings.warn(f"fvcore has no FLOP handle for {ops} in {type(model).__name__}: the count misses their "
                      "compute (add a handle in gatedmtl.flop_ops.EXTRA_HANDLES, or list the op in NOT_COUNTED "
                      "if it does no multiply-add)", UncountedFlopsWarning, stacklevel=3)


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """fvcore FLOPs (one multiply-add = 1) of ``model`` on an input of ``input_shape`` ``(B, C, H, W)``.

    Warns :class:`UncountedFlopsWarning` when an op that does real compute was not counted.
    """
    count = measure_flops(model, input_shape)
    _warn_uncounted(count, model)
    return count.total


def flops_by_module(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """fvcore FLOPs per module name (names relative to ``model``, ``""`` = total) at ``input_shape``."""
    count = measure_flops(model, input_shape)
    _warn_uncounted(count, model)
    return count.by_module


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (gate logits included when present)."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class FlopAnalysis:
    """Per-sample costs of a gated model at one input size (all at batch 1).

    Attributes:
        input_size: ``(C, H, W)`` of the analysis.
        full: fvcore FLOPs of the gated model with every slot and filter computed.
        costs: per gate (forward order), ``[C]`` FLOPs of one channel of one slot.
        outside: FLOPs of one slot outside the gated layers (ungated per-slot modules,
            parameter-free ops such as attention matmuls and pooling, shared modules on the
            folded batch): the lean model spends them once per folded slot.
        constant: FLOPs of shared modules applied to batch-independent tensors (e.g. XCiT's
            positional encoding): once per forward pass, whatever the batch and the slots.
        uncounted: ``{aten op: calls}`` fvcore did not count in one slot's forward pass.
    """

    input_size: tuple[int, ...]
    full: int
    costs: tuple[Tensor, ...]
    outside: float = 0.0
    constant: int = 0
    uncounted: dict[str, int] = field(default_factory=dict)

    @property
    def uncounted_compute(self) -> dict[str, int]:
        """Uncounted ops that do real compute (see :attr:`FlopCount.uncounted_compute`)."""
        return uncounted_compute(self.uncounted)

    def full_at(self, batch: int) -> float:
        """FLOPs of the gated model with every slot computed, on a batch of ``batch``."""
        return batch * (self.full - self.constant) + self.constant


def analyze(model: GatedModel, input_shape: Sequence[int] | None = None) -> FlopAnalysis:
    """Measure the gate costs with fvcore at ``input_shape`` ``(B, C, H, W)`` (per sample; cached per size).

    ``None``: batch 1 at ``model.input_size``. Also stores each gate's per-channel cost in its
    ``cost`` buffer.
    """
    if not isinstance(model, GatedModel):
        raise TypeError(f"expected a GatedModel, got {type(model).__name__}")
    size = _model_shape(model, input_shape)[1:]
    cached = model._analysis_cache.get(size)
    if cached is None:
        # Every slot computes the same shapes, so fvcore's count of the gated model at batch 1
        # is S times that of the shared branch alone (plus the batch-independent modules once).
        count = measure_flops(shared_branch(model), (1, *size))
        _warn_uncounted(count, model)
        by = count.by_module
        costs = []
        for name in model.gate_names:
            unit: SlotModule = model.backbone.get_submodule(name)
            gate: ChannelGate = unit.gate
            per_slot = by.get(unit.producer, 0)
            if unit.producer != name:
                per_slot += by.get(name, 0)
            costs.append(torch.full((gate.channels,), per_slot / gate.channels, dtype=torch.float64))
        constant = sum(by.get(n, 0) for n in model.batch_independent)
        per_slot_total = by[""] - constant
        outside = per_slot_total - sum(float(c.sum()) for c in costs)
        cached = FlopAnalysis(size, per_slot_total * model.num_slots + constant, tuple(costs), outside, constant,
                              count.uncounted)
        model._analysis_cache[size] = cached
    for gate in model.unique_gates():
        gate.cost.zero_()
    for gate, cost in zip(model.gates(), cached.costs):  # a tied gate: the sum over the layers that use it
        gate.cost.add_(cost.to(gate.cost))
    return cached


def shared_branch(model: GatedModel) -> nn.Module:
    """The backbone as a plain module with every slotted module replaced by its slot 0.

    Tensors are shared with ``model`` (not copied). Its output equals slot 0's output of the
    gated model only when all gates are closed; it is used for shapes and costs.
    """
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    plain = copy.deepcopy(model.backbone, memo)
    where = _parents(plain)
    for module in list(plain.modules()):
        if isinstance(module, SlotModule):
            for parent, attr in where.get(id(module), []):
                parent._modules[attr] = module.slots[0]
    return plain


def _live(mask: Tensor) -> Tensor:
    """``[C]`` number of slots that compute each channel, given ``[T, C]`` task gates."""
    return mask.sum(0) + 1 - mask.prod(0)


def _runs(slots: Sequence[int]) -> tuple[int, int]:
    """``(K, runs of the batch-independent modules)`` of a lean model that folds ``slots``.

    With every gate open the lean model runs one plain network per task (see
    :class:`gatedmtl.prune.LeanModel`), so its batch-independent modules run once per task.
    """
    k = len(slots)
    return k, (k if k > 1 and 0 not in slots else 1)


def _has_ungated_slot_modules(model: GatedModel) -> bool:
    gated = set(model.gate_names) | {model.backbone.get_submodule(n).producer for n in model.gate_names}
    return any(isinstance(m, SlotModule) and n not in gated for n, m in model.backbone.named_modules())


def _lean(info: FlopAnalysis, gated: float | Tensor, slots: Sequence[int], batch: int) -> Any:
    k, runs = _runs(slots)
    return batch * (gated + k * info.outside) + runs * info.constant


def predict_flops(model: GatedModel, input_shape: Sequence[int]) -> int:
    """fvcore FLOPs that ``prune(model)`` will have on ``input_shape`` ``(B, C, H, W)``, from the gates alone."""
    shape = _model_shape(model, input_shape)
    info = analyze(model, shape)
    gated = sum(float((cost * _live(gate.open_mask().to(torch.float64).cpu())).sum())
                for gate, cost in zip(model.gates(), info.costs))
    return int(round(_lean(info, gated, computed_slots(model), shape[0])))


def expected_flops(model: GatedModel, input_shape: Sequence[int] | None = None, *, soft: bool = False) -> Tensor:
    """Differentiable FLOPs of the lean model on ``input_shape`` (default: batch 1), a scalar tensor.

    The gradient is that of the expected cost when each gate is an independent Bernoulli
    variable with probability ``sigmoid(alpha)`` (``E[live_c] = sum_t p_tc + 1 - prod_t p_tc``).
    With ``soft=False`` the value is the exact cost of the hard gates (equal to
    :func:`predict_flops`); with ``soft=True`` it is the expectation itself (with the folded
    slots of the hard gates). Using the hard gates in the gradient too would stall at "all
    open": closing one task's channel alone saves nothing there (the shared filter comes back),
    so its hard gradient is zero.
    """
    shape = _model_shape(model, input_shape)
    info = analyze(model, shape)
    total: Tensor | float = 0.0
    for gate, cost in zip(model.gates(), info.costs):
        logits = gate.channel_logits()
        p = torch.sigmoid(logits)
        live = _live(p)
        if not soft:
            live = _live((logits > 0).to(p.dtype)) + (live - live.detach())
        total = total + (cost.to(p) * live).sum()
    return _lean(info, total, computed_slots(model), shape[0])


def flop_bounds(model: GatedModel, input_shape: Sequence[int] | None = None) -> tuple[int, int]:
    """Lean FLOPs on ``input_shape`` (default: batch 1) with every gate closed (minimum) and every gate open (maximum).

    The folded slots follow :func:`gatedmtl.prune.computed_slots`: without ungated per-slot
    modules, all closed folds the shared slot only and all open the task slots only.
    """
    shape = _model_shape(model, input_shape)
    info = analyze(model, shape)
    every = tuple(range(model.num_slots))
    ungated = _has_ungated_slot_modules(model)
    gated = sum(float(c.sum()) for c in info.costs)
    closed = _lean(info, gated, every if ungated else (0,), shape[0])
    opened = _lean(info, gated * len(model.tasks), every if ungated else every[1:], shape[0])
    return int(round(closed)), int(round(opened))
