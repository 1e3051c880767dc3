"""Shared plumbing of the tensor stand-ins that lean models trace through backbone code
(:class:`gatedmtl.streams.Streams`, :class:`gatedmtl.deferred.Deferred`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

__all__ = ["TENSOR_OPERATORS", "add_tensor_operators"]

# Python operators that backbone code applies to tensors (``x + y``, ``x[:, :3]``, ``x += y``, ...)
TENSOR_OPERATORS = (
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "__floordiv__", "__rfloordiv__", "__mod__", "__pow__",
    "__rpow__", "__matmul__", "__rmatmul__", "__neg__", "__pos__", "__abs__", "__getitem__", "__setitem__",
    "__and__", "__or__", "__xor__", "__invert__", "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__",
)


def add_tensor_operators(cls: type, dispatch: Callable[[Callable, tuple], Any]) -> None:
    """Give ``cls`` every operator in :data:`TENSOR_OPERATORS`: ``self <op> other`` returns
    ``dispatch(Tensor.<op>, (self, other))``. Instances stay hashable by identity."""
    for name in TENSOR_OPERATORS:
        setattr(cls, name, _operator(getattr(Tensor, name), name, dispatch))
    cls.__hash__ = object.__hash__  # type: ignore[method-assign]


def _operator(method: Callable, name: str, dispatch: Callable[[Callable, tuple], Any]) -> Callable:
    def op(self: Any, *args: Any) -> Any:
        return dispatch(method, (self, *args))

    op.__name__ = name
    return op
