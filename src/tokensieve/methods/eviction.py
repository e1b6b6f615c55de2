"""Shared machinery of the KV-eviction methods (SnapKV, H2O, StreamingLLM, SepLLM).

An eviction method runs the whole prompt through the model once, at its
original positions, into an ``EvictionCache``. Its attention hook sees each
layer's queries and keys during that forward, computes the layer's attention
(plain SDPA unless the method replaces it, as SepLLM does), and then tells the
cache which entries of that layer to keep. During decoding the same hook runs
at every step, so a method can keep its rule (evict the oldest window entry,
accumulate H2O scores). Positions stay original: the next token gets position
``n + t`` however few entries the cache holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tokensieve.attention import HOOK_KWARG
from tokensieve.cache import EvictionCache
from tokensieve.errors import InputError
from tokensieve.methods.base import DecodeState, Method, cache_kwarg

AttnOutput = tuple[torch.Tensor, torch.Tensor | None]


def check_int(name: str, value: Any, minimum: int) -> None:
    """``InputError`` (a ``ValueError``) unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class EvictionMethod(Method):
    """Base of the KV-eviction methods. Subclasses override ``prefill_layer`` and/or ``decode_layer``."""

    def prefill_layer(
        self, cache: EvictionCache, layer_idx: int, module: torch.nn.Module,
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        attention_mask: torch.Tensor | None, **kwargs: Any,
    ) -> AttnOutput:
        """Attention of one layer over the prompt, then eviction from ``cache`` (default: SDPA, keep all)."""
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def decode_layer(
        self, cache: EvictionCache, layer_idx: int, module: torch.nn.Module,
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        attention_mask: torch.Tensor | None, **kwargs: Any,
    ) -> AttnOutput:
        """Attention of one layer for decoded token(s), then eviction (default: SDPA, keep all)."""
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def decodes_with_hook(self) -> bool:
        """Whether decoding needs the hook (False when ``decode_layer`` is the base one)."""
        return type(self).decode_layer is not EvictionMethod.decode_layer

    def _hook(self, cache: EvictionCache, prefill: bool):
        layer_fn = self.prefill_layer if prefill else self.decode_layer

        def hook(module, query, key, value, attention_mask, **kwargs):
            layer_idx = module.layer_idx
            if not cache.is_evictable(layer_idx):
                return None  # sliding-window layer: plain attention, its own cache
            cache.sync_positions(layer_idx)
            return layer_fn(cache, layer_idx, module, query, key, value, attention_mask, **kwargs)

        return hook

    def prefill(self, model: PreTrainedModel, input_ids: torch.Tensor) -> DecodeState:
        if input_ids.shape[0] != 1:
            raise InputError(f"{self.name} runs one prompt at a time, got batch size {input_ids.shape[0]}")
        cache = EvictionCache(model.config)
        cache.add_tokens(input_ids)
        out = model(
            input_ids=input_ids, use_cache=True, logits_to_keep=1, **cache_kwarg(model, cache),
            **{HOOK_KWARG: self._hook(cache, prefill=True)},
        )
        n = input_ids.shape[1]
        return DecodeState(logits=out.logits[:, -1], cache=cache, next_position=n)

    def forward_kwargs(self, state: DecodeState) -> dict[str, Any]:
        if not self.decodes_with_hook() or not isinstance(state.cache, EvictionCache):
            return {}
        return {HOOK_KWARG: self._hook(state.cache, prefill=False)}

    def step(self, model: PreTrainedModel, state: DecodeState, token_ids: torch.Tensor) -> torch.Tensor:
        if isinstance(state.cache, EvictionCache):
            state.cache.add_tokens(token_ids)
        return super().step(model, state, token_ids)
