"""``prune``: gated model -> lean model with every closed gate cut away.

Per gated layer and slot, only the filters that slot really computes are kept (torch-pruning's
single-layer functions do the cut; no dependency graph, since the full width is restored):
a task keeps its open channels, the shared slot keeps the channels that some task borrows.
The full width is rebuilt per task by one concat + index, and the shared slot's next input is
the same convex mix of task features as in the gated model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from .surgery import GatedModel, _parents, run_folded

__all__ = ["prune", "LeanModel", "LeanGatedLayer", "prune_out_channels"]


def prune_out_channels(module: nn.Module, keep: Tensor) -> nn.Module:
    """Keep only output channels ``keep`` (sorted indices) of a conv, linear or batch norm, in place."""
    if isinstance(module, nn.Linear):
        width = module.out_features
    elif isinstance(module, nn.modules.conv._ConvNd):
        width = module.out_channels
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        width = module.num_features
    else:
        raise TypeError(f"cannot prune output channels of {type(module).__name__}")
    kept = set(keep.tolist())
    remove = [i for i in range(width) if i not in kept]
    if not remove:
        return module
    if isinstance(module, nn.Linear):
        tp.prune_linear_out_channels(module, remove)
    elif isinstance(module, nn.modules.conv._ConvNd):
        if module.groups > 1:
            tp.prune_depthwise_conv_out_channels(module, remove)
        else:
            tp.prune_conv_out_channels(module, remove)
    else:
        tp.prune_batchnorm_out_channels(module, remove)
    # per-output-channel tensors that torch-pruning does not know (e.g. ScaledStdConv2d's gain)
    for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if t.dim() and t.shape[0] == width:
            sliced = t.detach()[keep.to(t.device)].clone()
            if isinstance(t, nn.Parameter):
                setattr(module, name, nn.Parameter(sliced, requires_grad=t.requires_grad))
            else:
                setattr(module, name, sliced)
    return module


class LeanGatedLayer(nn.Module):
    """One gated layer after pruning: ``forward(x[S*b, ...]) -> y[S*b, ...]``.

    Slot ``s`` runs ``branches[s]`` (its kept filters, plus the fused norm when the layer
    was gated after conv+norm) on its input chunk; depthwise branches first gather their
    input channels. Task ``t``'s full width is ``cat([own_t, shared]).index_select(restore_t)``,
    the shared slot's output is ``sum_t weights[t] * full_t``.
    """

    def __init__(self, branches: Sequence[nn.Module | None], in_index: Sequence[Tensor | None],
                 restore: Sequence[Tensor | None], weights: Tensor, channel_dim: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(b if b is not None else nn.Identity() for b in branches)
        self.present = [b is not None for b in branches]
        self.num_slots = len(branches)
        self.channel_dim = channel_dim
        for s, idx in enumerate(in_index):
            self.register_buffer(f"in_index_{s}", idx)
        for t, idx in enumerate(restore):
            self.register_buffer(f"restore_{t}", idx)
        self.register_buffer("weights", weights)

    def __getattr__(self, name: str) -> Any:
        # Backbone code may read attributes of the layer it called (``.weight.dtype``,
        # ``.kernel_size``): answer them from the first computed branch's layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            branches = self.__dict__.get("_modules", {}).get("branches")
            if branches is None or name.startswith("__"):
                raise
            for present, branch in zip(self.__dict__.get("present", ()), branches):
                if present:
                    layer = branch[0] if isinstance(branch, nn.Sequential) else branch
                    return getattr(layer, name)
            raise

    def _branch(self, s: int, x: Tensor) -> Tensor | None:
        if not self.present[s]:
            return None
        idx = getattr(self, f"in_index_{s}")
        if idx is not None:
            x = x.index_select(1, idx)
        return self.branches[s](x)

    def forward(self, x: Tensor) -> Tensor:
        chunks = x.chunk(self.num_slots, dim=0)
        shared = self._branch(0, chunks[0])
        full = []
        for t in range(self.num_slots - 1):
            own = self._branch(t + 1, chunks[t + 1])
            restore = getattr(self, f"restore_{t}")
            if restore is None:  # every channel from one side: all open (own) or all closed (shared)
                full.append(own if own is not None else shared)
                continue
            parts = [p for p in (own, shared) if p is not None]
            y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.channel_dim)
            full.append(y.index_select(self.channel_dim, restore))
        phi = torch.stack(full, 0)
        c = self.weights.shape[1]
        shape = [self.num_slots - 1, 1] + [1] * (phi.dim() - 2)
        shape[2 if self.channel_dim == 1 else -1] = c
        mixed = (self.weights.reshape(shape).to(phi.dtype) * phi).sum(0, keepdim=True)
        return torch.cat([mixed, phi], 0).reshape(-1, *phi.shape[2:])


class LeanModel(nn.Module):
    """A pruned multi-task model: ``forward(x[B, C, H, W]) -> {task: output}``. No gates, no logits."""

    def __init__(self, backbone: nn.Module, tasks: Sequence[str], input_size: tuple[int, ...]) -> None:
        super().__init__()
        self.backbone = backbone
        self.tasks = tuple(tasks)
        self.input_size = tuple(input_size)

    @property
    def num_slots(self) -> int:
        return len(self.tasks) + 1

    def forward(self, x: Tensor) -> dict[str, Any]:
        if not isinstance(x, Tensor) or x.dim() != len(self.input_size) + 1 or x.shape[1] != self.input_size[0]:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"input {got} does not fit: expected [B, {self.input_size[0]}, ...] "
                             f"with {len(self.input_size) + 1} dims")
        return run_folded(self.backbone, x, self.tasks, self.input_size)


def _positions(keep: Tensor, width: int) -> Tensor:
    pos = torch.full((width,), -1, dtype=torch.long)
    pos[keep] = torch.arange(keep.numel())
    return pos


@torch.no_grad()
def prune(model: GatedModel) -> LeanModel:
    """Build the lean model of ``model`` from its current gates (see module docstring).

    In eval mode ``prune(model)(x)`` equals ``model(x)`` up to float rounding.
    """
    if not isinstance(model, GatedModel):
        raise TypeError(f"prune expects a GatedModel from gatedmtl.convert, got {type(model).__name__}")
    backbone = copy.deepcopy(model.backbone)
    where = _parents(backbone)
    num_tasks = len(model.tasks)
    for name in model.gate_names:
        unit = backbone.get_submodule(name)
        gate = unit.gate
        producer = backbone.get_submodule(unit.producer)
        paired = producer is not unit
        open_ = gate.open_mask().cpu()
        width = gate.channels
        keep = [(~open_.all(0)).nonzero().flatten()] + [open_[t].nonzero().flatten() for t in range(num_tasks)]
        template = producer.slots[0]
        depthwise = isinstance(template, nn.modules.conv._ConvNd) and template.groups > 1
        branches: list[nn.Module | None] = []
        in_index: list[Tensor | None] = []
        for s in range(num_tasks + 1):
            if keep[s].numel() == 0:
                branches.append(None)
                in_index.append(None)
                continue
            layer = prune_out_channels(copy.deepcopy(producer.slots[s]), keep[s])
            if paired:
                layer = nn.Sequential(layer, prune_out_channels(copy.deepcopy(unit.slots[s]), keep[s]))
            branches.append(layer)
            in_index.append(keep[s].clone() if depthwise and keep[s].numel() < width else None)
        shared_pos = _positions(keep[0], width)
        restore: list[Tensor | None] = []
        for t in range(num_tasks):
            own = keep[t + 1]
            own_pos = _positions(own, width)
            idx = torch.where(open_[t], own_pos, own.numel() + shared_pos)
            one_side = own.numel() == width or (own.numel() == 0 and keep[0].numel() == width)
            restore.append(None if one_side else idx)
        weights = gate.mixing_weights().detach().cpu().to(template.weight.dtype)
        lean = LeanGatedLayer(branches, in_index, restore, weights, gate.channel_dim).to(template.weight.device)
        lean.train(model.training)
        for parent, attr in where[id(producer)]:
            parent._modules[attr] = lean
        if paired:
            for parent, attr in where[id(unit)]:
                parent._modules[attr] = nn.Identity()
    lean_model = LeanModel(backbone, model.tasks, model.input_size)
    lean_model.train(model.training)
    return lean_model
