"""FLOP counting (fvcore: one multiply-add = one FLOP, eval mode) and the gate cost model.

The lean model's FLOPs follow from the gates alone::

    flops(lean) = B * (F_full - sum_layers sum_c cost_c * (S - live_c))
    live_c      = sum_t m_tc + (1 - prod_t m_tc)       # own task filters + shared filter if any task borrows it

where ``F_full`` is fvcore's count of the gated model with every slot computed (batch 1) and
``cost_c`` is fvcore's count of one filter (plus its fused norm channel) of one slot.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .gates import ChannelGate
from .slots import SlotModule, iter_tensors
from .surgery import GatedModel, _parents

__all__ = ["count_flops", "count_params", "predict_flops", "expected_flops", "flop_bounds",
           "analyze", "FlopAnalysis", "flops_by_module", "shared_branch"]


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


def _fvcore(model: nn.Module, input_shape: Sequence[int]) -> Any:
    from fvcore.nn import FlopCountAnalysis

    shape = _check_shape(input_shape)
    was_training = model.training
    model.eval()
    try:
        x = torch.randn(shape, device=next(iter(model.parameters()), torch.empty(0)).device)
        analysis = FlopCountAnalysis(_TupleOutput(model), x)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis.total()
    finally:
        model.train(was_training)
    return analysis


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """fvcore FLOPs (1 multiply-add = 1) of ``model`` on an input of ``input_shape``, in eval mode."""
    return int(_fvcore(model, input_shape).total())


def flops_by_module(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """fvcore FLOPs per module name (names relative to ``model``)."""
    by = _fvcore(model, input_shape).by_module()
    return {k[len("model."):] if k.startswith("model.") else ("" if k == "model" else k): int(v) for k, v in by.items()}


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (gate logits included when present)."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class FlopAnalysis:
    """Per-sample costs of a gated model at one input size.

    Attributes:
        full: fvcore FLOPs of the gated model with every slot and filter computed.
        costs: per gate (forward order), ``[C]`` FLOPs of one channel of one slot.
    """

    input_size: tuple[int, ...]
    full: int
    costs: tuple[Tensor, ...]


def analyze(model: GatedModel, input_size: Sequence[int] | None = None) -> FlopAnalysis:
    """Measure the gate costs with fvcore at ``input_size`` = ``(C, H, W)`` (cached per size).

    Also stores each gate's per-channel cost in its ``cost`` buffer.
    """
    if not isinstance(model, GatedModel):
        raise TypeError(f"expected a GatedModel, got {type(model).__name__}")
    size = tuple(input_size) if input_size is not None else model.input_size
    cached = model._analysis_cache.get(size)
    if cached is None:
        # Every slot computes the same shapes, so fvcore's count of the gated model at batch 1
        # is S times that of the shared branch alone: trace that (S times faster).
        by = flops_by_module(shared_branch(model), (1, *size))
        costs = []
        for name in model.gate_names:
            unit: SlotModule = model.backbone.get_submodule(name)
            gate: ChannelGate = unit.gate
            per_slot = by.get(unit.producer, 0)
            if unit.producer != name:
                per_slot += by.get(name, 0)
            costs.append(torch.full((gate.channels,), per_slot / gate.channels, dtype=torch.float64))
        cached = FlopAnalysis(size, by[""] * model.num_slots, tuple(costs))
        model._analysis_cache[size] = cached
    for gate, cost in zip(model.gates(), cached.costs):
        gate.cost.copy_(cost.to(gate.cost))
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


def predict_flops(model: GatedModel, input_shape: Sequence[int]) -> int:
    """fvcore FLOPs that ``prune(model)`` will have, predicted from the gates alone."""
    shape = _check_shape(input_shape)
    info = analyze(model, shape[1:])
    saved = 0.0
    for gate, cost in zip(model.gates(), info.costs):
        live = _live(gate.open_mask().to(torch.float64).cpu())
        saved += float((cost * (model.num_slots - live)).sum())
    return int(round(shape[0] * (info.full - saved)))


def expected_flops(model: GatedModel, input_size: Sequence[int] | None = None, *, soft: bool = False) -> Tensor:
    """Differentiable per-sample FLOPs of the lean model (scalar tensor).

    The gradient is that of the expected cost when each gate is an independent Bernoulli
    variable with probability ``sigmoid(alpha)`` (``E[live_c] = sum_t p_tc + 1 - prod_t p_tc``).
    With ``soft=False`` the value is the exact cost of the hard gates (equal to
    :func:`predict_flops` at batch 1); with ``soft=True`` it is the expectation itself. Using
    the hard gates in the gradient too would stall at "all open": closing one task's channel
    alone saves nothing there (the shared filter comes back), so its hard gradient is zero.
    """
    info = analyze(model, input_size)
    total: Tensor | float = 0.0
    for gate, cost in zip(model.gates(), info.costs):
        logits = gate.channel_logits()
        p = torch.sigmoid(logits)
        live = _live(p)
        if not soft:
            live = _live((logits > 0).to(p.dtype)) + (live - live.detach())
        total = total + (cost.to(p) * (model.num_slots - live)).sum()
    return info.full - total


def flop_bounds(model: GatedModel, input_size: Sequence[int] | None = None) -> tuple[int, int]:
    """Per-sample lean FLOPs with every gate closed (minimum) and every gate open (maximum)."""
    info = analyze(model, input_size)
    s = model.num_slots
    closed = sum(float(c.sum()) * (s - 1) for c in info.costs)
    opened = sum(float(c.sum()) * (s - (s - 1)) for c in info.costs)
    return int(round(info.full - closed)), int(round(info.full - opened))
