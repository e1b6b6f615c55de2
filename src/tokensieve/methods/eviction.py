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
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from tokensieve.core.attention import HOOK_KWARG, sdpa
from tokensieve.core.cache import EvictionCache
from tokensieve.core.scoring import POOLINGS
from tokensieve.errors import InputError, check_choice, check_int
from tokensieve.methods.base import DecodeState, Method, cache_kwarg, row_positions

AttnOutput = tuple[torch.Tensor, torch.Tensor | None]


# Span width of the selecting methods (GemFilter, SnapKV): each kept token brings its neighbours within 15
# positions (scoring.span_rank). Chosen on tuning prompts by the share of whole answers kept (docs/gemfilter.md).
DEFAULT_DILATION = 31
MAX_SPAN_WIDTH = 4095  # upper bound of the pooling and span widths (kernel, dilation): wider only costs time


def check_span_rule(kernel: Any, pooling: Any, dilation: Any) -> None:
    """The selecting methods' span rule (``scoring.span_rank``) checked once: ``kernel`` and ``dilation`` odd
    integers in [1, ``MAX_SPAN_WIDTH``], ``pooling`` one of ``scoring.POOLINGS``; ``InputError`` otherwise."""
    for label, value in (("kernel", kernel), ("dilation", dilation)):
        if check_int(label, value, 1, MAX_SPAN_WIDTH) % 2 == 0:
            raise InputError(f"{label} must be a positive odd integer, got {value}")
    check_choice("pooling", pooling, POOLINGS)


@dataclass
class LayerCall:
    """One layer's attention call as the hook sees it (post-RoPE, before GQA repetition)."""

    cache: EvictionCache
    layer_idx: int
    module: torch.nn.Module
    query: torch.Tensor  # [batch, q_heads, q_len, head_dim]
    key: torch.Tensor  # [batch, kv_heads, kv_len, head_dim] (the cache included)
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    kwargs: dict[str, Any]
    prefill: bool  # the prompt's forward (else a decoding step)

    def sdpa(self) -> AttnOutput:
        """Plain attention of this call."""
        return sdpa(self.module, self.query, self.key, self.value, self.attention_mask, **self.kwargs)


@dataclass
class EvictionMethod(Method):
    """Base of the KV-eviction methods: each layer attends (``attend``), then the method evicts (``evict``).

    Subclasses write their keep rule in ``evict`` (which sees whether the call is the prompt's or a
    decoding step's), and override ``attend`` only when the attention itself changes (SepLLM's masked prefill).
    """

    def attend(self, call: LayerCall) -> AttnOutput:
        """Attention of one layer (default: SDPA over every entry the cache holds)."""
        return call.sdpa()

    def evict(self, call: LayerCall) -> None:
        """Drop entries from ``call.cache`` after the layer's attention (default: keep all)."""

    evicts_while_decoding: ClassVar[bool] = True  # False: decoding needs no hook (the cache only grows)

    def _hook(self, cache: EvictionCache, prefill: bool):
        def hook(module, query, key, value, attention_mask, **kwargs):
            layer_idx = module.layer_idx
            if not cache.is_evictable(layer_idx):
                return None  # sliding-window layer: plain attention, its own cache
            cache.sync_positions(layer_idx)
            call = LayerCall(cache, layer_idx, module, query, key, value, attention_mask, kwargs, prefill)
            out = self.attend(call)
            self.evict(call)
            return out

        return hook

    def prefill_cache(self, model: PreTrainedModel, input_ids: torch.Tensor) -> tuple[EvictionCache, dict[str, Any]]:
        """An ``EvictionCache`` of ``input_ids`` [1, n] and this method's prefill hook (attend, then evict)."""
        cache = EvictionCache(model.config)
        cache.add_tokens(input_ids)
        return cache, {HOOK_KWARG: self._hook(cache, prefill=True)}

    def prefill(self, model: PreTrainedModel, input_ids: torch.Tensor) -> DecodeState:
        if input_ids.shape[0] != 1:
            raise InputError(f"{self.name} runs one prompt at a time, got batch size {input_ids.shape[0]}")
        return self._prefill(model, input_ids, None)

    def _prefill(
        self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> DecodeState:
        """The prompt's forward into an ``EvictionCache``; ``attention_mask`` [batch, n] for a left-padded batch
        (its ``evict`` must then keep per row: ``call.cache.pad_counts``). Subclasses that support batches
        call this from ``prefill_batch``."""
        cache = EvictionCache(model.config)
        cache.add_tokens(input_ids)
        batch: dict[str, Any] = {}
        if attention_mask is not None:
            mask = attention_mask.bool()
            cache.set_padding(mask)
            batch = {"attention_mask": mask.long(), "position_ids": row_positions(mask)}
        out = model(
            input_ids=input_ids,
            use_cache=True,
            logits_to_keep=1,
            **batch,
            **cache_kwarg(model, cache),
            **{HOOK_KWARG: self._hook(cache, prefill=True)},
        )
        n = input_ids.shape[1]
        state = DecodeState(logits=out.logits[:, -1], cache=cache, next_position=n)
        if attention_mask is not None:
            state.kv_mask = cache.valid_mask()
            state.positions = attention_mask.bool().sum(-1, keepdim=True)  # [batch, 1]
        return state

    def forward_kwargs(self, state: DecodeState) -> dict[str, Any]:
        if not self.evicts_while_decoding or not isinstance(state.cache, EvictionCache):
            return {}
        return {HOOK_KWARG: self._hook(state.cache, prefill=False)}

    def step(self, model: PreTrainedModel, state: DecodeState, token_ids: torch.Tensor) -> torch.Tensor:
        if isinstance(state.cache, EvictionCache):
            state.cache.add_tokens(token_ids)
            if state.kv_mask is not None:  # a batch: the entries the cache holds now (eviction changes them)
                state.kv_mask = state.cache.valid_mask()
        return super().step(model, state, token_ids)
