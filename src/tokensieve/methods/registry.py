"""The method registry: name -> method class, imported on first use. It imports no method module (nor torch),
so the command line lists the names before anything heavy loads; ``tokensieve.methods`` re-exports it."""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from tokensieve.errors import InputError

if TYPE_CHECKING:
    from tokensieve.methods.base import Method

# name -> "module:Class" of the built-in methods, in the order the command line lists them
BUILTIN: dict[str, str] = {
    "full": "tokensieve.methods.full:FullAttention",
    "gemfilter": "tokensieve.methods.gemfilter:GemFilter",
    "sepllm": "tokensieve.methods.sepllm:SepLLM",
    "streamingllm": "tokensieve.methods.streamingllm:StreamingLLM",
    "snapkv": "tokensieve.methods.snapkv:SnapKV",
    "h2o": "tokensieve.methods.h2o:H2O",
    "lazyllm": "tokensieve.methods.lazyllm:LazyLLM",
}


class Registry(Mapping):
    """name -> method class (a read-only mapping; :func:`register` / :func:`unregister` change it).

    Iterating gives the names without importing any method module; looking a name up imports its class."""

    def __init__(self, where: dict[str, str]) -> None:
        self._where = dict(where)
        self._classes: dict[str, type] = {}

    def __getitem__(self, name: str) -> type[Method]:
        if name not in self._classes:
            module, cls = self._where[name].split(":")  # KeyError for an unknown name, as a dict
            self._classes[name] = getattr(importlib.import_module(module), cls)
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._where))

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __repr__(self) -> str:
        return f"Registry({list(self._where)})"


METHODS = Registry(BUILTIN)


def register(cls: type[Method]) -> type[Method]:
    """Add a method class under its ``name`` (usable as a class decorator); ``InputError`` if the name is taken
    or ``cls`` is not a dataclass subclass of ``Method``. Returns ``cls``."""
    if not (
        isinstance(cls, type)
        and dataclasses.is_dataclass(cls)
        and callable(getattr(cls, "prefill", None))
        and dataclasses.is_dataclass(getattr(cls, "capabilities", None))
    ):
        raise InputError(f"a method must be a dataclass subclass of tokensieve.methods.Method, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise InputError(f"a method's name must be lower-case letters, digits and _, got {name!r}")
    if name in METHODS:
        raise InputError(f"a method named {name!r} is registered already")
    METHODS._where[name] = f"{cls.__module__}:{cls.__qualname__}"
    METHODS._classes[name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a method added with :func:`register` (built-in methods stay); ``InputError`` otherwise."""
    if name in BUILTIN or name not in METHODS:
        raise InputError(f"{name!r} is not a registered method that can be removed (registered by register())")
    del METHODS._where[name]
    METHODS._classes.pop(name, None)


def capable(**wanted: Any) -> list[str]:
    """The names of the registered methods whose ``capabilities`` have every field given, in registry order:
    ``capable(batch=True)``, ``capable(static_decode="evict")``. Imports the method classes."""
    known = [f.name for f in dataclasses.fields(METHODS["full"].capabilities)]
    bad = sorted(set(wanted) - set(known))
    if bad:
        raise InputError(f"no capability {', '.join(bad)}; capabilities: {', '.join(known)}")
    return [n for n in METHODS if all(getattr(METHODS[n].capabilities, k) == v for k, v in wanted.items())]
