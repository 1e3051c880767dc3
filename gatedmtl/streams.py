"""Per-slot streams: the backbone's own forward code run once per computed slot, in lockstep.

A lean model does not fold its slots on the batch axis (which costs a split and a concat of
every slot at every gated layer). Instead its input is wrapped in a :class:`Streams` object that
holds one tensor per computed slot; every torch function, tensor method and operator the
backbone code applies to it is applied to each slot's tensor (``__torch_function__``), so the
exported graph holds one plain chain of ops per slot. The streams meet only inside the lean
layers (:class:`gatedmtl.prune.LeanGatedLayer`), which read each slot's tensor directly.

Attribute reads that are not tensor methods (``.shape``, ``.dtype``, ``.ndim``, ...) and
functions that return non-tensors (``x.size(1)``, ``x.dim()``) answer from the first stream:
every stream has the same shape, since each carries the full width of its slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from .deferred import Deferred, call
from .tensorlike import add_tensor_operators

__all__ = ["Streams", "StreamsError", "split_streams", "merge_streams", "distinct", "keep_alive_list"]


class StreamsError(TypeError):
    """Backbone code did something that per-slot streams cannot map (e.g. an ``isinstance(x, Tensor)`` branch)."""


def _first_streams(obj: Any) -> Streams | None:
    """The first :class:`Streams` in a (nested) structure of lists, tuples and dicts."""
    if isinstance(obj, Streams):
        return obj
    items = obj if isinstance(obj, (list, tuple)) else obj.values() if isinstance(obj, dict) else ()
    for o in items:
        found = _first_streams(o)
        if found is not None:
            return found
    return None


def _count(obj: Any) -> int | None:
    """How many streams the first :class:`Streams` in ``obj`` holds (``None``: there is none)."""
    first = _first_streams(obj)
    return None if first is None else len(first.tensors)


def _pick(obj: Any, i: int) -> Any:
    if isinstance(obj, Streams):
        return obj.tensors[i]
    if isinstance(obj, list):
        return [_pick(o, i) for o in obj]
    if isinstance(obj, tuple):
        return tuple(_pick(o, i) for o in obj)
    if isinstance(obj, dict):
        return {k: _pick(v, i) for k, v in obj.items()}
    return obj


def merge_streams(outputs: Sequence[Any], alive: list | None = None) -> Any:
    """Per-slot results ``outputs[i]`` -> one result with :class:`Streams` wherever they hold tensors.

    ``alive``: the forward pass's keep-alive list that the new streams carry (see :class:`Streams`).
    """
    first = outputs[0]
    if isinstance(first, (Tensor, Deferred)):
        return Streams(outputs, alive)
    if isinstance(first, (list, tuple)) and any(isinstance(o, (Tensor, Deferred)) for o in first):
        merged = [merge_streams([o[j] for o in outputs], alive) for j in range(len(first))]
        if isinstance(first, list):
            return merged
        return type(first)(*merged) if hasattr(first, "_fields") else tuple(merged)
    if isinstance(first, dict) and any(isinstance(o, (Tensor, Deferred)) for o in first.values()):
        return {k: merge_streams([o[k] for o in outputs], alive) for k in first}
    return first


def keep_alive_list(obj: Any) -> list | None:
    """The keep-alive list carried by the first :class:`Streams` in a (nested) structure."""
    first = _first_streams(obj)
    return None if first is None else first.alive


def distinct(tensors: Sequence[Tensor]) -> list[Tensor]:
    """``tensors`` with every repeated object replaced by a copy (an Identity in an exported graph)."""
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) in seen:  # a deferred tensor is never modified in place: a new handle is enough
            t = Deferred(t.parts, t.index, t.axis, t.memo) if isinstance(t, Deferred) else t.clone()
        out.append(t)
        seen.add(id(t))
    return out


def split_streams(obj: Any, num: int) -> list[Any]:
    """The ``num`` per-slot views of a (nested) structure holding :class:`Streams`."""
    return [_pick(obj, i) for i in range(num)]


def _apply(func: Callable, args: tuple, kwargs: dict) -> Any:
    n = _count(args)
    if n is None:
        n = _count(kwargs)
    if n is None:
        return func(*args, **kwargs)
    return merge_streams([call(func, _pick(args, i), _pick(kwargs, i)) for i in range(n)], keep_alive_list((args, kwargs)))


class Streams:
    """One tensor per computed slot, mapped together through any torch code.

    ``alive``: a list shared by every stream of one forward pass. A layer where a slot computes
    nothing appends a zero that depends on that slot's input (see
    :class:`gatedmtl.prune.LeanGatedLayer`); the model adds them to its output, so the graph keeps
    computing what the FLOP prediction counts without an op between a convolution and its activation.

    The tensors must be distinct objects (backbone code may modify them in place, e.g.
    ``x += shortcut``): see :func:`distinct`.

    ``Streams([t_0, ..., t_{K-1}])``: ``torch.relu(s)``, ``s.flatten(1)``, ``s + 1``, ``s[:, :3]``,
    ``torch.cat([s, r], 1)`` ... each give ``Streams`` of the per-slot results.
    """

    __slots__ = ("tensors", "alive")

    def __init__(self, tensors: Sequence[Tensor], alive: list | None = None) -> None:
        object.__setattr__(self, "tensors", list(tensors))
        object.__setattr__(self, "alive", alive)

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _apply(func, args, kwargs or {})

    def __getattr__(self, name: str) -> Any:
        attr = getattr(Tensor, name, None)
        if callable(attr) and not isinstance(attr, type):
            method = attr

            def mapped(*args: Any, **kwargs: Any) -> Any:
                return _apply(method, (self, *args), kwargs)

            return mapped
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.tensors[0], name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise StreamsError(f"cannot set attribute {name!r} on per-slot streams")

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __iter__(self):
        raise StreamsError("iterating over a tensor's first axis is not supported on per-slot streams")

    def __bool__(self) -> bool:
        raise StreamsError("the truth value of per-slot streams is undefined (data-dependent control flow)")

    def __repr__(self) -> str:
        return f"Streams({len(self.tensors)} x {tuple(self.tensors[0].shape)})"


add_tensor_operators(Streams, lambda method, args: _apply(method, args, {}))
