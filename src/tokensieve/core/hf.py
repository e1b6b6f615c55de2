"""Facts about a ``transformers`` model read from its config and classes: layer count, sliding-window layers,
maximum positions, and the keyword its forward takes the KV cache under. No method knowledge."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from transformers import Cache, PreTrainedModel


def cache_kwarg(module: torch.nn.Module, cache: Cache | None) -> dict[str, Any]:
    """``{keyword: cache}`` for calling ``module`` (a model or a decoder layer) with a KV cache.

    transformers 5.24 renamed the ``past_key_values`` argument of models and decoder
    layers to ``cache`` (the old name warns, and goes in 5.40); older 5.x releases know only
    ``past_key_values``. The name is read from the module's own ``forward`` signature, so
    every call site passes the cache under the keyword the installed release expects.
    The cache object is updated in place either way; callers keep their own reference to it.
    """
    return {_cache_keyword(type(module)): cache}


@functools.cache
def _cache_keyword(cls: type) -> str:
    """The cache keyword of ``cls.forward`` (a fact about the class: memoised, never changes)."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def num_layers(model: PreTrainedModel) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


def has_sliding_layers(model: PreTrainedModel) -> bool:
    """Whether some of the model's layers attend over a sliding window only (Gemma 3, Qwen2 with
    ``use_sliding_window``), from its config."""
    cfg = model.config.get_text_config()
    kinds = getattr(cfg, "layer_types", None) or []
    return any(t != "full_attention" for t in kinds) or bool(getattr(cfg, "use_sliding_window", False))


def max_positions(model: PreTrainedModel) -> int | None:
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)
