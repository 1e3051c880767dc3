"""Task registry: ``register_task`` / ``create_task`` / ``available_tasks`` (timm style)."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from ..registry import Registry
from .base import Task

__all__ = ["register_task", "create_task", "available_tasks"]

_TASKS: Registry[type[Task]] = Registry("task")

T = TypeVar("T", bound=type[Task])


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator adding a :class:`Task` subclass to the registry under ``name``."""
    return _TASKS.register(name)


def available_tasks() -> list[str]:
    """Sorted names accepted by :func:`create_task`."""
    return _TASKS.names()


def create_task(name: str, **kwargs: Any) -> Task:
    """Build a task by registry name, e.g. ``create_task("seg", num_classes=7)``.

    Raises ``ValueError`` listing the known names when ``name`` is unknown.
    """
    return _TASKS.create(name, **kwargs)
