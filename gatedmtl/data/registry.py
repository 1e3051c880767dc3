"""Data set registry: ``register_dataset`` / ``create_dataset`` / ``available_datasets``."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from .base import MultiTaskDataset

__all__ = ["register_dataset", "create_dataset", "available_datasets"]

_DATASETS: dict[str, type[MultiTaskDataset]] = {}

D = TypeVar("D", bound=type[MultiTaskDataset])


def register_dataset(name: str) -> Callable[[D], D]:
    """Class decorator adding a :class:`MultiTaskDataset` subclass under ``name``."""

    def wrap(cls: D) -> D:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered ({_DATASETS[name].__name__})")
        _DATASETS[name] = cls
        return cls

    return wrap


def available_datasets() -> list[str]:
    """Sorted names accepted by :func:`create_dataset`."""
    return sorted(_DATASETS)


def create_dataset(name: str, **kwargs: Any) -> MultiTaskDataset:
    """Build a data set by name, e.g. ``create_dataset("scenes", split="train", length=512)``.

    Raises ``ValueError`` listing the known names when ``name`` is unknown.
    """
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available datasets: {', '.join(available_datasets())}")
    return _DATASETS[name](**kwargs)
