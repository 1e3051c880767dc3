"""A small name -> class registry (timm style), shared by tasks and data sets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["Registry"]

C = TypeVar("C", bound=type)


class Registry(Generic[C]):
    """Maps names to classes; ``create(name, **kwargs)`` builds one, unknown names list the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, C] = {}

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator adding ``cls`` under ``name``."""

        def wrap(cls: C) -> C:
            if name in self._classes:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._classes[name].__name__})")
            self._classes[name] = cls
            return cls

        return wrap

    def names(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str) -> C:
        """The class registered under ``name``; ``ValueError`` listing the known names otherwise."""
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; available {self.kind}s: {', '.join(self.names())}")
        return self._classes[name]

    def create(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)
