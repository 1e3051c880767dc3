"""Data set registry: ``register_dataset`` / ``create_dataset`` / ``available_datasets``."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from ..registry import Registry
from .base import MultiTaskDataset

__all__ = ["register_dataset", "create_dataset", "available_datasets", "dataset_tasks"]

_DATASETS: Registry[type[MultiTaskDataset]] = Registry("dataset")

D = TypeVar("D", bound=type[MultiTaskDataset])


def register_dataset(name: str) -> Callable[[D], D]:
    """Class decorator adding a :class:`MultiTaskDataset` subclass under ``name``."""
    return _DATASETS.register(name)


def available_datasets() -> list[str]:
    """Sorted names accepted by :func:`create_dataset`."""
    return _DATASETS.names()


def create_dataset(name: str, **kwargs: Any) -> MultiTaskDataset:
    """Build a data set by name, e.g. ``create_dataset("scenes", split="train", length=512)``.

    Raises ``ValueError`` listing the known names when ``name`` is unknown.
    """
    return _DATASETS.create(name, **kwargs)


def dataset_tasks(name: str) -> tuple[str, ...]:
    """The tasks data set ``name`` provides by default (its class's ``default_tasks``), e.g.
    ``("left", "right")`` for ``multifashion``. ``ValueError`` listing the known names when unknown."""
    return tuple(_DATASETS.get(name).default_tasks)
