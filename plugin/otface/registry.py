"""Name → builder registries for losses and feature hooks.

A loss is one registered function: ``@LOSSES.register("name")`` on a builder
``builder(cfg, *, backbone, rank, world_size) -> nn.Module`` whose ``forward(embeddings, labels,
*, step)`` returns :class:`otface.criterion.LossOutput`. ``config.loss`` picks the entry.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Callable, TypeVar

__all__ = ["Registry", "LOSSES", "HOOKS"]

F = TypeVar("F", bound=Callable)

# Modules whose import registers the built-in entries. Importing them lazily keeps
# ``import otface.registry`` free of torch model code.
_BUILTIN_MODULES = {
    "loss": ("otface.criterion", "otface.loss"),
    "hook": ("otface.hooks",),
}


class Registry:
    """A mapping from names to builders, filled by a decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable] = {}
        self._builtins_loaded = False

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering ``fn`` under ``name``; a duplicate name is an error."""

        def deco(fn: F) -> F:
            if name in self._builders and self._builders[name] is not fn:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = fn
            return fn

        return deco

    def _load_builtins(self) -> None:
        if self._builtins_loaded:
            return
        self._builtins_loaded = True
        for module in _BUILTIN_MODULES.get(self.kind, ()):
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:
                if err.name != module:  # a real import error inside the module
                    raise

    def names(self) -> list:
        """Registered names, sorted."""
        self._load_builtins()
        return sorted(self._builders)

    def get(self, name: str) -> Callable:
        """The builder registered as ``name``; a clear error lists the valid names."""
        self._load_builtins()
        try:
            return self._builders[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), self._builders, n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise KeyError(
                f"unknown {self.kind} {name!r}{hint}; valid: {', '.join(self.names())}"
            ) from None

    def build(self, name: str, *args, **kwargs):
        """Call the builder registered as ``name``."""
        return self.get(name)(*args, **kwargs)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._builders

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


LOSSES = Registry("loss")
HOOKS = Registry("hook")
