"""All methods, by name. A new method joins with one line in ``METHODS``."""

from __future__ import annotations

import dataclasses
from typing import Any

from tokensieve.errors import InputError
from tokensieve.methods.base import DecodeState, Method, rename_params
from tokensieve.methods.full import FullAttention
from tokensieve.methods.gemfilter import GemFilter
from tokensieve.methods.h2o import H2O
from tokensieve.methods.sepllm import SepLLM
from tokensieve.methods.snapkv import SnapKV
from tokensieve.methods.streamingllm import StreamingLLM
from tokensieve.methods.lazyllm import LazyLLM

METHODS: dict[str, type[Method]] = {
    FullAttention.name: FullAttention,
    GemFilter.name: GemFilter,
    SepLLM.name: SepLLM,
    StreamingLLM.name: StreamingLLM,
    SnapKV.name: SnapKV,
    H2O.name: H2O,
    LazyLLM.name: LazyLLM,
}


def method_class(name: str) -> type[Method]:
    """The registered class of method ``name`` (``InputError`` naming the choices otherwise)."""
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; expected one of: {', '.join(METHODS)}")
    return METHODS[name]


def parameter_names(name: str) -> list[str]:
    """The parameters method ``name`` takes, in declaration order (current names only)."""
    return [f.name for f in dataclasses.fields(method_class(name))]


def accepted_params(name: str) -> set[str]:
    """Every parameter name ``make_method(name, ...)`` accepts: current names and deprecated old ones."""
    return set(parameter_names(name)) | set(method_class(name).renamed)


def canonical_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with deprecated names replaced by current ones (a ``FutureWarning`` per old name).

    Raises ``InputError`` for a name the method does not have, or for an old and a new
    name given together.
    """
    cls = method_class(name)
    return rename_params(name, cls.renamed, parameter_names(name), params, stacklevel=4)


def make_method(method: str | Method, **params: Any) -> Method:
    """A method instance from its name (or an instance) and parameters; ``InputError`` for unknown ones."""
    if isinstance(method, Method):
        return dataclasses.replace(method, **canonical_params(method.name, params)) if params else method
    return method_class(method)(**canonical_params(method, params))


__all__ = [
    "METHODS", "Method", "DecodeState", "accepted_params", "canonical_params", "make_method", "method_class",
    "parameter_names", "FullAttention", "GemFilter", "H2O", "LazyLLM", "SepLLM", "SnapKV", "StreamingLLM",
]
