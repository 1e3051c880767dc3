"""Task registry: ``register_task`` / ``create_task`` / ``available_tasks`` (timm style)."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from .base import Task

__all__ = ["register_task", "create_task", "available_tasks"]

_TASKS: dict[str, type[Task]] = {}

T = TypeVar("T", bound=type[Task])


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator adding a :class:`Task` subclass to the registry under ``name``."""

    def wrap(cls: T) -> T:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is already registered ({_TASKS[name].__name__})")
        _TASKS[name] = cls
        return cls

    return wrap


def available_tasks() -> list[str]:
    """Sorted names accepted by :func:`create_task`."""
    return sorted(_TASKS)


def create_task(name: str, **kwargs: Any) -> Task:
    """Build a task by registry name, e.g. ``create_task("seg", num_classes=7)``.

    Raises ``ValueError`` listing the known names when ``name`` is unknown.
    """
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(available_tasks())}")
    return _TASKS[name](**kwargs)
