"""Deferred channel restore: a lean layer's output held as its branch outputs plus the gather that restores it.

A task that keeps some channels of a gated layer and borrows the others gets its full width from
one gather over the concat of the layer's branch outputs. Done at once, that gather sits between
each branch convolution and the activation after it, so ONNX Runtime can fuse neither, and every
channel selection after it (a depthwise layer's input channels, a concat) is a second gather.

:class:`Deferred` holds ``cat(parts, dim).index_select(dim, index)`` without computing it:

* channel-wise ops (activations, scalar arithmetic, dropout in eval, 2-d max/avg pooling of
  ``[B, C, H, W]``) run on the parts, once per part however many streams apply them (the parts'
  ``memo``), and the result is deferred again; in ONNX the activation lands right after the branch
  convolution, where ONNX Runtime fuses it;
* ``index_select`` / ``narrow`` on the channel dim and ``torch.cat`` along it compose with the index
  (one gather instead of several);
* the sum of two deferred tensors with the same layout (the same index over parts of the same
  shapes, e.g. the outputs of two lean layers with one gate: a residual sum of tied layers) is
  deferred over the parts' sums: ``cat(P)[i] + cat(Q)[i] == cat(P + Q)[i]``, each part sum computed
  once however many streams read it;
* anything else (a convolution, a residual add, a norm, a reshape, ...) gets the full tensor: the
  parts' concat (computed once per set of parts) and one gather.

So the exported graph computes the same values with fewer, fusable nodes. Only ops that fvcore does
not count are moved onto the parts, so the lean model's FLOP count is unchanged.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .slots import iter_leaves
from .tensorlike import add_tensor_operators

__all__ = ["Deferred", "materialize", "call"]

# activations and other elementwise ops: f(cat(parts)[idx]) == cat(f(p) for p in parts)[idx]
_ELEMENTWISE: set[Callable] = {
    F.relu, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.silu, F.gelu, F.elu, F.selu, F.celu, F.leaky_relu,
    F.mish, F.softplus, F.sigmoid, F.tanh, torch.relu, torch.relu_, torch.sigmoid, torch.sigmoid_, torch.tanh,
    torch.tanh_, torch.Tensor.relu, torch.Tensor.relu_, torch.Tensor.sigmoid, torch.Tensor.sigmoid_,
    torch.Tensor.tanh, torch.Tensor.tanh_, torch.Tensor.clone, torch.Tensor.contiguous, torch.clone,
}
# spellings of one op without further arguments (``inplace`` aside): one memo entry for all of them
_CANONICAL = {f: torch.relu for f in (F.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_)} | {
    f: torch.sigmoid for f in (F.sigmoid, torch.sigmoid_, torch.Tensor.sigmoid, torch.Tensor.sigmoid_)} | {
    f: torch.tanh for f in (F.tanh, torch.tanh_, torch.Tensor.tanh, torch.Tensor.tanh_)}
# binary ops whose other operand may be a Python number
_SCALAR_OPS: set[Callable] = {getattr(torch.Tensor, n) for n in (
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "__neg__", "__pos__", "add", "sub", "mul", "div", "clamp",
    "clamp_min", "clamp_max")} | {torch.add, torch.sub, torch.mul, torch.div, torch.clamp}
_SCALAR_IN_PLACE = {torch.Tensor.__iadd__: torch.Tensor.__add__, torch.Tensor.__isub__: torch.Tensor.__sub__,
                    torch.Tensor.__imul__: torch.Tensor.__mul__, torch.Tensor.__itruediv__: torch.Tensor.__truediv__}
_POOLS_2D: set[Callable] = {F.max_pool2d, F.avg_pool2d}
# sums of two tensors: two deferred tensors with one layout add part by part
_ADDS: set[Callable] = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__,
                        torch.Tensor.__iadd__}


def _is_plain(value: Any) -> bool:
    """A non-tensor argument (number, bool, string, None, tuple of ints)."""
    return not any(isinstance(v, (Tensor, Deferred)) for v in iter_leaves(value))


def materialize(obj: Any) -> Any:
    """``obj`` with every :class:`Deferred` (also inside lists, tuples and dicts) replaced by its tensor."""
    if isinstance(obj, Deferred):
        return obj.full()
    if isinstance(obj, list):
        return [materialize(o) for o in obj]
    if isinstance(obj, tuple):
        items = [materialize(o) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, dict):
        return {k: materialize(v) for k, v in obj.items()}
    return obj


def _has_deferred(obj: Any) -> bool:
    return any(isinstance(o, Deferred) for o in iter_leaves(obj))


class Deferred:
    """``cat(parts, dim).index_select(dim, index)``, not yet computed (``index=None``: the one part as it is).

    ``parts``: tensors ``[..., C_i, ...]`` equal in every dim but ``dim``; ``index``: 1-d long tensor
    of positions in their concat (``C = len(index)`` channels). ``memo``: shared by the deferred
    outputs of one layer call, so that an op that several streams apply to the same part runs once.
    """

    __slots__ = ("parts", "index", "axis", "memo", "_full")

    def __init__(self, parts: Sequence[Tensor], index: Tensor | None, dim: int, memo: dict | None = None) -> None:
        if not parts or (index is None and len(parts) != 1):
            raise ValueError("a deferred restore needs one part without an index, or parts and an index")
        self.parts = list(parts)
        self.index = index
        self.axis = dim % self.parts[0].dim()
        self.memo = {} if memo is None else memo
        self._full: Tensor | None = None

    # -- the tensor it stands for ------------------------------------------------------------

    def full(self) -> Tensor:
        """The restored tensor: one concat per set of parts (shared) and one gather.

        An index that reads whole parts one after the other is their concat, no gather (one such
        part: that part itself).
        """
        if self._full is None:
            if self.index is None:
                self._full = self.parts[0]
            else:
                runs = self._whole_runs()
                self._full = self._cat(runs) if runs is not None else self._pool().index_select(self.axis, self.index)
        return self._full

    def _whole_runs(self) -> list[Tensor] | None:
        """The parts that ``index`` reads one after the other, each whole and in order (else ``None``).

        Such a restore is a concat of whole parts: ONNX Runtime's blocked CPU layout keeps a
        Concat, where a Gather costs a layout change before and after it.
        """
        widths = [int(p.shape[self.axis]) for p in self.parts]
        starts = [sum(widths[:k]) for k in range(len(widths))]
        index = self.index.detach().cpu()
        runs: list[Tensor] = []
        position = 0
        while position < index.numel():
            first = int(index[position])
            k = next((j for j, (start, width) in enumerate(zip(starts, widths)) if start == first and width), None)
            if k is None:  # (a part without channels never starts a run)
                return None
            expected = torch.arange(first, first + widths[k])
            if not torch.equal(index[position:position + widths[k]], expected):
                return None
            runs.append(self.parts[k])
            position += widths[k]
        return runs or None

    def _cat(self, parts: Sequence[Tensor]) -> Tensor:
        """``torch.cat(parts)`` along the channel axis, once per sequence of parts (shared by the memo)."""
        if len(parts) == 1:
            return parts[0]
        key = ("cat", self.axis, *(id(p) for p in parts))
        if key not in self.memo:
            self.memo[key] = (torch.cat(list(parts), self.axis), list(parts))  # parts kept: ids stay unique
        return self.memo[key][0]

    def _pool(self) -> Tensor:
        return self._cat(self.parts)

    @property
    def shape(self) -> torch.Size:
        shape = list(self.parts[0].shape)
        shape[self.axis] = self.channels
        return torch.Size(shape)

    @property
    def channels(self) -> int:
        return int(self.parts[0].shape[self.axis]) if self.index is None else int(self.index.numel())

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @property
    def ndim(self) -> int:
        return self.parts[0].dim()

    def dim(self) -> int:
        return self.parts[0].dim()

    def size(self, d: int | None = None) -> Any:
        return self.shape if d is None else self.shape[d]

    def __len__(self) -> int:
        return len(self.full()) if self.axis == 0 else int(self.parts[0].shape[0])

    def __repr__(self) -> str:
        return f"Deferred({len(self.parts)} parts -> {tuple(self.shape)})"

    # -- ops -----------------------------------------------------------------------------

    def _map(self, key: tuple, op: Callable[[Tensor], Tensor]) -> Deferred:
        """``op`` applied to every part (once per part for this ``key``), deferred again."""
        parts = []
        for p in self.parts:
            k = (*key, id(p))
            if k not in self.memo:
                self.memo[k] = (op(p), p)
            parts.append(self.memo[k][0])
        return Deferred(parts, self.index, self.axis, self.memo)

    def same_layout(self, other: Deferred) -> bool:
        """Whether ``other`` reads parts of the same shapes with the same index (so that ops can pair the parts)."""
        if other.axis != self.axis or len(other.parts) != len(self.parts):
            return False
        if any(p.shape != q.shape for p, q in zip(self.parts, other.parts)):
            return False
        if self.index is None or other.index is None:
            return self.index is None and other.index is None
        return self.index.shape == other.index.shape and bool(torch.equal(self.index, other.index))

    def add_parts(self, other: Deferred) -> Deferred:
        """``self + other`` part by part (both with the same layout), deferred; each pair of parts added once."""
        parts = []
        for p, q in zip(self.parts, other.parts):
            k = ("add", id(p), id(q))
            if k not in self.memo:
                self.memo[k] = (p + q, p, q)
            parts.append(self.memo[k][0])
        return Deferred(parts, self.index, self.axis, self.memo)

    def select(self, index: Tensor) -> Deferred:
        """Channels ``index`` (positions in this tensor's channels) of this tensor, deferred."""
        base = self.index if self.index is not None else torch.arange(self.channels, device=index.device)
        return Deferred(self.parts, base.index_select(0, index.to(base.device)), self.axis, self.memo)

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        x = args[0] if args else None
        if (func in _ADDS and len(args) == 2 and not kwargs and isinstance(x, Deferred)
                and isinstance(args[1], Deferred) and x.same_layout(args[1])):
            return x.add_parts(args[1])
        if isinstance(x, Deferred):
            rest, plain = args[1:], _is_plain(args[1:]) and _is_plain(kwargs)
            if plain and func in _ELEMENTWISE:
                op = _CANONICAL.get(func, func)
                rest, kw = ((), {}) if func in _CANONICAL else _not_in_place(op, rest, kwargs)
                return x._map((op, repr(rest), repr(sorted(kw.items()))), lambda p: op(p, *rest, **kw))
            if plain and func is F.dropout and not kwargs.get("training", args[2] if len(args) > 2 else True):
                return x
            if plain and func in _SCALAR_OPS:
                op = _SCALAR_IN_PLACE.get(func, func)
                return x._map((op, repr(rest), repr(sorted(kwargs.items()))), lambda p: op(p, *rest, **kwargs))
            if (plain and func in _POOLS_2D and x.axis == 1 and x.ndim == 4 and not kwargs.get("return_indices")
                    and not (len(args) > 6 and args[6])):
                return x._map((func, repr(rest), repr(sorted(kwargs.items()))), lambda p: func(p, *rest, **kwargs))
            select = _channel_selection(func, args, kwargs, x)
            if select is not None:
                return x.select(select)
        if func is torch.cat:
            joined = _cat(args, kwargs)
            if joined is not None:
                return joined
        func = _out_of_place(func)
        rest, kw = _not_in_place(func, materialize(args[1:]), materialize(kwargs))
        return func(materialize(args[0]) if args else None, *rest, **kw) if args else func(**kw)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(Tensor, name, None)
        if callable(attr) and not isinstance(attr, type):
            def method(*args: Any, **kwargs: Any) -> Any:
                return Deferred.__torch_function__(attr, (Deferred,), (self, *args), kwargs)

            return method
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.full(), name)


@functools.lru_cache(maxsize=None)
def _signature(func: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):
        return None


def _not_in_place(func: Callable, rest: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``func``'s arguments after the input with ``inplace`` (positional or keyword) set to False."""
    sig = _signature(func)
    if sig is None or "inplace" not in sig.parameters:
        return rest, ({k: v for k, v in kwargs.items() if k != "inplace"} | {"inplace": False}
                      if "inplace" in kwargs else kwargs)
    names = [n for n in sig.parameters][1:]
    bound = dict(zip(names, rest)) | dict(kwargs)
    bound["inplace"] = False
    return (), bound


def _out_of_place(func: Callable) -> Callable:
    """The out-of-place form of an in-place tensor op (``x += y`` -> ``x + y``, ``x.add_(y)`` -> ``x.add(y)``).

    A deferred tensor's full value may be a part that other streams share, so it is never
    modified in place; code that rebinds the result (``x += y``, ``x = x.relu_()``) sees the same values.
    """
    name = getattr(func, "__name__", "")
    if name.startswith("__i") and name.endswith("__") and hasattr(Tensor, "__" + name[3:]):
        return getattr(Tensor, "__" + name[3:])
    if name.endswith("_") and not name.endswith("__") and getattr(Tensor, name, None) is func:
        return getattr(Tensor, name[:-1], func)
    return func


def call(func: Callable, args: tuple, kwargs: dict) -> Any:
    """``func(*args, **kwargs)`` where the arguments may hold :class:`Deferred` tensors (also for unbound tensor methods)."""
    if _has_deferred(args) or _has_deferred(kwargs):
        return Deferred.__torch_function__(func, (Deferred,), args, kwargs)
    return func(*args, **kwargs)


def _channel_selection(func: Callable, args: tuple, kwargs: dict, x: Deferred) -> Tensor | None:
    """The channel positions that ``func(x, ...)`` selects, when it is an ``index_select``/``narrow`` on ``x.axis``."""
    if func in (torch.index_select, Tensor.index_select):
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        index = args[2] if len(args) > 2 else kwargs.get("index")
        if isinstance(dim, int) and dim % x.ndim == x.axis and isinstance(index, Tensor) and index.dim() == 1:
            return index
    if func in (torch.narrow, Tensor.narrow):
        dim, start, length = (list(args[1:4]) + [None] * 3)[:3]
        dim = kwargs.get("dim", dim)
        start = kwargs.get("start", start)
        length = kwargs.get("length", length)
        if all(isinstance(v, int) for v in (dim, start, length)) and dim % x.ndim == x.axis:
            start = start % x.channels if start < 0 else start
            return torch.arange(start, start + length, device=x.device)
    return None


def _cat(args: tuple, kwargs: dict) -> Deferred | None:
    """``torch.cat`` along the channel dim of deferred tensors: one deferred tensor over all their parts."""
    tensors = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or "out" in kwargs:
        return None
    items = list(tensors)
    first = next((t for t in items if isinstance(t, Deferred)), None)
    if first is None or dim % first.ndim != first.axis or not all(isinstance(t, (Tensor, Deferred)) for t in items):
        return None
    parts: list[Tensor] = []
    where: dict[int, int] = {}  # id(part) -> its offset in the new concat
    indices = []
    for t in items:
        own = t.parts if isinstance(t, Deferred) else [t]
        offsets = []
        for p in own:
            if id(p) not in where:
                where[id(p)] = sum(int(q.shape[first.axis]) for q in parts)
                parts.append(p)
            offsets.append(where[id(p)])
        widths = [int(p.shape[first.axis]) for p in own]
        local = torch.cat([torch.arange(o, o + w, device=first.device) for o, w in zip(offsets, widths)])
        index = t.index if isinstance(t, Deferred) and t.index is not None else None
        indices.append(local if index is None else local.index_select(0, index.to(local.device)))
    return Deferred(parts, torch.cat(indices), first.axis, first.memo)


add_tensor_operators(Deferred, lambda method, args: Deferred.__torch_function__(method, (Deferred,), args, {}))
