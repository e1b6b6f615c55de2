"""All methods, by name. A new method joins with one line in ``METHODS``."""

from __future__ import annotations

import dataclasses
from typing import Any

from tokensieve.methods.base import DecodeState, Method
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


def make_method(method: str | Method, **params: Any) -> Method:
    """A method instance from its name and parameters (unknown names/parameters raise ``ValueError``)."""
    if isinstance(method, Method):
        if params:
            return dataclasses.replace(method, **params)
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of: {', '.join(METHODS)}")
    cls = METHODS[method]
    allowed = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(params) - allowed)
    if bad:
        raise ValueError(
            f"method {method!r} has no parameter(s) {', '.join(bad)}; its parameters are: {', '.join(sorted(allowed)) or 'none'}"
        )
    return cls(**params)


__all__ = ["METHODS", "Method", "DecodeState", "make_method", "FullAttention", "GemFilter", "SepLLM", "StreamingLLM", "SnapKV", "H2O"]
__all__ = ["METHODS", "Method", "DecodeState", "make_method", "FullAttention", "GemFilter", "LazyLLM"]
