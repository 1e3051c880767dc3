"""Slots on the batch axis ("folded batch").

A multi-branch model with ``S = T + 1`` slots (slot 0 = shared branch, slots 1..T = tasks)
runs the backbone's own forward code once on a folded batch ``[S*B, ...]``: every
parameter-free op runs on all slots at once, and every module that owns parameters or
buffers is replaced by a :class:`SlotModule` holding one copy per slot, each applied to its
own contiguous chunk of the batch axis.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SlotModule", "fold", "unfold_slot", "own_tensors", "is_slot_unit", "iter_tensors"]


def fold(x: Tensor, num_slots: int) -> Tensor:
    """Repeat ``x[B, ...]`` into the folded batch ``[S*B, ...]`` (slot-major)."""
    return x.unsqueeze(0).expand(num_slots, *x.shape).reshape(num_slots * x.shape[0], *x.shape[1:])


def unfold_slot(output: Any, slot: int, num_slots: int) -> Any:
    """Take slot ``slot`` of every tensor in a (nested) output of the folded model."""
    if isinstance(output, Tensor):
        if output.shape[0] % num_slots:
            raise ValueError(
                f"Output of shape {tuple(output.shape)} has a first dimension that is not a multiple of "
                f"the {num_slots} slots: the backbone moved the batch axis away from dim 0."
            )
        return output.chunk(num_slots, dim=0)[slot]
    if isinstance(output, (list, tuple)):
        items = [unfold_slot(o, slot, num_slots) for o in output]
        return type(output)(items) if isinstance(output, list) else tuple(items)
    if isinstance(output, dict):
        return {k: unfold_slot(v, slot, num_slots) for k, v in output.items()}
    return output


def iter_leaves(obj: Any) -> Iterator[Any]:
    """Everything but the lists, tuples and dicts of a nested structure (dicts: their values)."""
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from iter_leaves(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from iter_leaves(o)
    else:
        yield obj


def iter_tensors(obj: Any) -> Iterator[Tensor]:
    """All tensors in a nested structure of lists, tuples and dicts."""
    return (o for o in iter_leaves(obj) if isinstance(o, Tensor))


def own_tensors(module: nn.Module) -> list[Tensor]:
    """Parameters and buffers that ``module`` owns directly (not through children)."""
    return [p for p in module.parameters(recurse=False)] + [b for b in module.buffers(recurse=False)]


def is_slot_unit(module: nn.Module) -> bool:
    """A module is replicated per slot when it owns parameters/buffers and no child does.

    Parameter-free children (e.g. the activation inside timm's ``BatchNormAct2d``) travel
    with it; a module that owns parameters *and* has children with parameters keeps its own
    parameters shared (e.g. ViT's ``pos_embed``) and its children are examined instead.
    """
    if not own_tensors(module):
        return False
    return all(not own_tensors(m) for m in module.modules() if m is not module)


def _batch_dim_in(module: nn.Module, index: int) -> int:
    if isinstance(module, nn.RNNBase):
        # input: [N, L, H] if batch_first else [L, N, H]; hidden states: [layers, N, H]
        return (0 if module.batch_first else 1) if index == 0 else 1
    return 0


def _split(obj: Any, dim: int, size: int, num_slots: int) -> list[Any]:
    """Split every tensor whose size along ``dim`` is ``size`` into S chunks; pass others whole."""
    if isinstance(obj, Tensor) and obj.dim() > dim and obj.shape[dim] == size:
        return list(obj.chunk(num_slots, dim=dim))
    if isinstance(obj, tuple) and obj:
        parts = [_split(o, dim, size, num_slots) for o in obj]
        return [tuple(p[s] for p in parts) for s in range(num_slots)]
    return [obj] * num_slots


def _merge(outputs: Sequence[Any], module: nn.Module, index: int = 0) -> Any:
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.cat(list(outputs), dim=_batch_dim_in(module, index))
    if isinstance(first, (tuple, list)):
        merged = [_merge([o[i] for o in outputs], module, index + i if index == 0 else index) for i in range(len(first))]
        return type(first)(merged) if isinstance(first, list) else tuple(merged)
    if first is None:
        return None
    raise TypeError(f"{type(module).__name__} returned {type(first).__name__}; only tensors and tuples of tensors can be merged across slots")


class SlotModule(nn.Module):
    """``S`` copies of one module, each applied to its chunk of the folded batch.

    ``forward(x[S*b, ...], ...) -> y[S*b, ...]``: ``x`` is split into S equal chunks along the
    batch axis (dim 0; for RNNs the module's own batch axis), copy ``s`` runs on chunk ``s``,
    and the results are concatenated. Other tensor arguments with the same batch size are
    split likewise. When ``gate`` is set, the concatenated output is mixed across slots by
    that :class:`~gatedmtl.gates.ChannelGate`.

    Attribute reads that the module itself does not answer (``.weight``, ``.kernel_size``,
    custom methods, ...) are answered by slot 0, so backbone code that inspects a wrapped
    module keeps working.
    """

    def __init__(self, module: nn.Module, num_slots: int, gate: nn.Module | None = None) -> None:
        super().__init__()
        if num_slots < 2:
            raise ValueError(f"num_slots must be >= 2, got {num_slots}")
        self.slots = nn.ModuleList(copy.deepcopy(module) for _ in range(num_slots))
        self.gate = gate
        self.name = ""  # dotted path in the backbone, set by convert()
        self.unmixed = False  # the shared slot passes its own output on (see ChannelGate.mix), set by convert()

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            slots = modules.get("slots")
            if slots is None or name.startswith("__"):
                raise
            return getattr(slots[0], name)

    def run_slots(self, args: tuple, kwargs: dict, fn: Callable[[int, tuple, dict], Any] | None = None,
                  merge: bool = True) -> Any:
        """Split the inputs, run copy ``s`` on chunk ``s`` and merge the results (no gate).

        With ``merge=False`` the per-slot outputs are returned as a list.
        """
        num_slots = self.num_slots
        template = self.slots[0]
        if not args or not isinstance(args[0], Tensor):
            raise TypeError(f"{self.name or type(template).__name__}: the first argument must be a tensor")
        dim = _batch_dim_in(template, 0)
        size = args[0].shape[dim] if args[0].dim() > dim else 0
        if size == 0 or size % num_slots:
            raise ValueError(
                f"Module '{self.name}' ({type(template).__name__}) got an input of shape {tuple(args[0].shape)} "
                f"whose batch axis is not a multiple of the {num_slots} slots. gatedmtl folds the slots into the "
                "batch axis; a module applied to non-batched data (e.g. a parameter) cannot be given per-slot weights."
            )
        split_args = [_split(a, _batch_dim_in(template, i), size, num_slots) for i, a in enumerate(args)]
        split_kwargs = {k: _split(v, dim, size, num_slots) for k, v in kwargs.items()}
        outputs = []
        for s in range(num_slots):
            a = tuple(sa[s] for sa in split_args)
            kw = {k: v[s] for k, v in split_kwargs.items()}
            outputs.append(fn(s, a, kw) if fn is not None else self.slots[s](*a, **kw))
        return _merge(outputs, template) if merge else outputs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.gate is None:
            return self.run_slots(args, kwargs)
        return self.gate.mix(self.run_slots(args, kwargs, merge=False), shared_mix=not self.unmixed)

    def extra_repr(self) -> str:
        return f"num_slots={self.num_slots}, gated={self.gate is not None}"
