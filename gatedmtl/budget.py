"""FLOP budgets: parsing, the cost-aware sparsity hinge, and projection of the gates onto a budget.

A budget is the FLOPs of the gated encoder (heads are not gated) on ``input_shape``
``(B, C, H, W)`` (the trainer uses batch 1: per sample, at the training input size): either a
fraction of the full model (every one of the ``T + 1`` branches computed, i.e. ``S``
backbones) or an absolute count such as ``"38.4GF"``. FLOPs are fvcore's: one multiply-add =
one FLOP (GMACs in timm's and most papers' terms).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .cost import analyze, expected_flops, flop_bounds, predict_flops
from .surgery import GatedModel

__all__ = ["resolve_budget", "sparsity_loss", "task_targets_loss", "project_to_budget", "BudgetError"]

_ABSOLUTE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([GMK]?)F(?:LOPS?)?\s*$", re.IGNORECASE)
_SCALE = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9}


class BudgetError(ValueError):
    """The requested budget cannot be met by any gate pattern."""


def resolve_budget(model: GatedModel, budget: float | str, input_shape: Sequence[int] | None = None) -> float:
    """FLOPs on ``input_shape`` (default: batch 1) for ``budget``: a fraction in (0, 1] of the full model, or ``"<x>GF"``.

    Raises:
        BudgetError: when the budget lies below the all-closed (every task borrows the shared
            branch) or above the all-open cost; the message gives both limits in GFLOPs.
    """
    info = analyze(model, input_shape)
    batch = input_shape[0] if input_shape is not None else 1
    full = info.full_at(batch)
    if isinstance(budget, str):
        text = budget.strip()
        m = _ABSOLUTE.match(text)
        if m:
            flops = float(m.group(1)) * _SCALE[m.group(2).upper()]
        else:
            try:
                flops = float(text) * full
                fraction = float(text)
            except ValueError:
                raise ValueError(f"budget {budget!r} is neither a fraction like 0.5 nor an absolute count like '38.4GF'") from None
            if not 0 < fraction <= 1:
                raise ValueError(f"a budget fraction must be in (0, 1], got {fraction}")
    elif isinstance(budget, (int, float)) and not isinstance(budget, bool):
        if not 0 < budget <= 1:
            raise ValueError(f"a budget fraction must be in (0, 1] (of the full {model.num_slots}-branch model), "
                             f"got {budget}; give absolute budgets as a string like '2.5GF'")
        flops = float(budget) * full
    else:
        raise TypeError(f"budget must be a float fraction or a string like '38.4GF', got {type(budget).__name__}")
    if flops <= 0:
        raise ValueError(f"budget must be positive, got {budget!r}")
    low, high = flop_bounds(model, input_shape)
    if not low <= flops <= high:
        raise BudgetError(
            f"budget {flops / 1e9:.4f} GFLOPs ({flops / full:.3g} of the full model) is infeasible for this model "
            f"at input {(batch, *info.input_size)}: it must lie between {low / 1e9:.4f} GFLOPs = {low / full:.3f} "
            f"(every gate closed: tasks share one branch) and {high / 1e9:.4f} GFLOPs = {high / full:.3f} "
            f"(every gate open: one branch per task, the shared one dead), as fractions of the full "
            f"{model.num_slots}-branch model ({full / 1e9:.4f} GFLOPs, every branch computing every channel)"
        )
    return flops


def sparsity_loss(model: GatedModel, budget_flops: float, input_shape: Sequence[int] | None = None,
                  two_sided: bool = False) -> Tensor:
    """Cost-aware hinge ``max(0, E[flops] / budget - 1)`` with straight-through gates.

    With ``two_sided=True``: ``|E[flops] / budget - 1|``, which also pulls a model that went
    below the budget back up to it, so that training ends at the budget and the projection
    before pruning changes few gates (opening a gate after training brings in a task filter
    that received no gradient while it was closed).
    """
    ratio = expected_flops(model, input_shape) / budget_flops - 1.0
    return ratio.abs() if two_sided else torch.relu(ratio)


def task_targets_loss(model: GatedModel, targets: Mapping[str, float], input_shape: Sequence[int] | None = None) -> Tensor:
    """GatedMTL's per-task hinge ``sum_t max(0, d_t - tau_t)``.

    ``d_t`` is task ``t``'s cost-weighted share of open gates (1 = every filter its own).
    """
    unknown = set(targets) - set(model.tasks)
    if unknown:
        raise ValueError(f"task targets for unknown tasks {sorted(unknown)}; tasks are {list(model.tasks)}")
    info = analyze(model, input_shape)
    total_cost = sum(float(c.sum()) for c in info.costs)
    loss: Tensor | float = 0.0
    for t, task in enumerate(model.tasks):
        if task not in targets:
            continue
        tau = float(targets[task])
        if not 0 <= tau <= 1:
            raise ValueError(f"task target for {task!r} must be in [0, 1], got {tau}")
        used = sum((gate.mask()[t] * cost.to(gate.alpha)).sum() for gate, cost in zip(model.gates(), info.costs))
        loss = loss + torch.relu(used / total_cost - tau)
    return loss if isinstance(loss, Tensor) else torch.zeros(())


@torch.no_grad()
def project_to_budget(model: GatedModel, budget_flops: float, input_shape: Sequence[int] | None = None,
                      tolerance: float = 0.01) -> int:
    """Close the lowest-logit open gates until the predicted lean FLOPs are at most ``budget_flops``;
    if they are more than ``tolerance`` below it, open the highest-logit closed ones until they
    are within ``[(1 - tolerance) * budget, budget]``.

    Gates are opened only as far as needed to land within the tolerance: an opened gate brings
    in a task filter that got no gradient while its gate was closed (train with
    ``budget_mode="target"`` so that training itself ends at the budget).

    Closing a gate whose channel every other task keeps open saves nothing (the shared filter
    comes back), so the loop walks the logits in order and counts exact savings per channel.
    Changes the ``alpha`` of the changed gates to ``-|alpha| - eps`` / ``+|alpha| + eps``; returns
    the predicted FLOPs on ``input_shape`` (default: batch 1).

    Gates with the prefix structure keep it: their effective logits fall along the channels, so a
    task's last open group is closed first and its first closed group is opened first, and a group
    that is skipped (it would overshoot the budget) keeps every later group of that task closed.
    """
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    info = analyze(model, input_shape)
    shape = (input_shape[0] if input_shape is not None else 1, *info.input_size)
    low, high = flop_bounds(model, shape)
    if not low <= budget_flops <= high:
        raise BudgetError(f"budget {budget_flops / 1e9:.4f} GFLOPs outside [{low / 1e9:.4f}, {high / 1e9:.4f}] GFLOPs")
    gates = model.unique_gates()
    num_tasks = len(model.tasks)
    current = float(predict_flops(model, shape))
    layer_costs: dict[int, Tensor] = {}  # a tied gate decides the channels of every layer that uses it
    for gate, c in zip(model.gates(), info.costs):
        layer_costs[id(gate)] = layer_costs.get(id(gate), 0) + c.to(torch.float64)
    # flat views: gate index, task, group of channels (a single channel unless gate_group > 1), logit;
    # every channel of a group has the same gates, so a group's saving is its channels' summed cost
    # (the effective logits: with the prefix structure they fall along a task's groups, and ties go to
    # the later group when closing and to the earlier one when opening: see ``order``)
    entries = []
    for g, gate in enumerate(gates):
        a = gate.group_logits().detach().cpu()
        for t in range(num_tasks):
            for c, v in enumerate(a[t].tolist()):
                entries.append((v, g, t, c))
    open_count = [(gate.group_logits() > 0).sum(0).cpu().tolist() for gate in gates]
    costs = [(shape[0] * gate.to_groups(layer_costs[id(gate)])).tolist() for gate in gates]

    def order(e: tuple[float, int, int, int]) -> tuple[float, int, int, int]:
        return e[0], e[1], e[2], -e[3]

    def live(k: int) -> int:
        return k + 1 - (1 if k == num_tasks else 0)

    changes: list[tuple[int, int, int, bool]] = []
    if current > budget_flops:
        for v, g, t, c in sorted((e for e in entries if e[0] > 0), key=order):
            if current <= budget_flops:
                break
            k = open_count[g][c]
            current += (live(k - 1) - live(k)) * costs[g][c]
            open_count[g][c] = k - 1
            changes.append((g, t, c, False))
    elif current < (1.0 - tolerance) * budget_flops:
        stuck: set[tuple[int, int]] = set()  # prefix-structured (gate, task) rows with a group left closed
        for v, g, t, c in sorted((e for e in entries if e[0] <= 0), key=order, reverse=True):
            if current >= (1.0 - tolerance) * budget_flops:
                break
            if (g, t) in stuck:
                continue
            k = open_count[g][c]
            delta = (live(k + 1) - live(k)) * costs[g][c]
            if current + delta > budget_flops:
                if gates[g].structure == "prefix":
                    stuck.add((g, t))
                continue
            current += delta
            open_count[g][c] = k + 1
            changes.append((g, t, c, True))
    for gate in gates:  # a prefix gate's logits become its effective ones (the same mask, falling along the
        if gate.structure == "prefix":  # groups), so that opening a group opens no later one with it
            gate.alpha.copy_(gate.group_logits())
    for g, t, c, opened in changes:
        a = gates[g].alpha
        mag = abs(float(a[t, c])) + 1e-3
        a[t, c] = mag if opened else -mag
    return predict_flops(model, shape)
