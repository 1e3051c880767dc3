"""The strategy registry: ``name -> class``, filled by :func:`register` at import time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from ._base import Strategy

__all__ = ["available", "create", "describe", "register"]

_REGISTRY: dict[str, type[Strategy]] = {}

_S = TypeVar("_S", bound=type[Strategy])


def register(cls: _S) -> _S:
    """Class decorator adding a strategy to the registry under ``cls.name``."""
    name = cls.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"balancing strategy {name!r} is already registered")
    _REGISTRY[name] = cls
    return cls


def available() -> list[str]:
    """Sorted names of all registered strategies."""
    return sorted(_REGISTRY)


def describe() -> list[tuple[str, str, dict[str, Any]]]:
    """``(name, one-line description, {option: default})`` for each strategy, sorted by name."""
    return [
        (name, _REGISTRY[name].description, _REGISTRY[name].option_defaults())
        for name in available()
    ]


def create(name: str, tasks: Sequence[str], **options: Any) -> Strategy:
    """Builds the strategy registered as ``name`` for ``tasks``.

    :raises ValueError: unknown ``name`` (the message lists the valid names), bad task list or
        an option value out of range.
    :raises TypeError: unknown option name or an option of the wrong type (the message names it).
    :raises ImportError: the strategy needs an optional solver that is not installed.
    """
    if not isinstance(name, str):
        raise TypeError(f"strategy name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown balancing strategy {name!r}; valid names: {', '.join(available())}"
        )
    cls = _REGISTRY[key]
    valid = cls.option_defaults()
    unknown = sorted(k for k in options if k not in valid)
    if unknown:
        raise TypeError(
            f"{key}: unknown option(s) {unknown}; valid options: "
            f"{', '.join(valid) if valid else '(none)'}"
        )
    return cls(tasks, **options)
