"""The one attention function tokensieve registers with ``transformers``.

It is plain SDPA attention unless the caller passes a ``tokensieve_hook``
keyword to the model's forward. ``transformers`` forwards unknown keyword
arguments from ``model(...)`` down to the attention function, so a method can
observe (or replace) attention at any layer without patching model source and
without global state: the hook travels with the call.

A hook is any callable ``hook(module, query, key, value, attention_mask, **kwargs)``
returning either ``None`` (run SDPA as usual) or an ``(output, weights)`` pair.
Shapes it sees, after RoPE and before GQA repetition:

    query: [batch, q_heads, q_len, head_dim]
    key, value: [batch, kv_heads, kv_len, head_dim]   (kv_len includes the cache)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tokensieve.errors import InputError

ATTN_IMPLEMENTATION = "tokensieve"
HOOK_KWARG = "tokensieve_hook"


class AttentionHook(Protocol):
    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None: ...


def tokensieve_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hook: Callable | None = kwargs.pop(HOOK_KWARG, None)
    if hook is not None:
        result = hook(module, query, key, value, attention_mask, **kwargs)
        if result is not None:
            return result
    return sdpa(module, query, key, value, attention_mask, **kwargs)


# cuDNN's fused attention builds a plan on the host for every new shape: 2.5-3.6 ms per call, measured on an H100
# in decoding steps, whose key length grows by one each call (81 of the 138 ms of host time of a LazyLLM step at
# 8k went there). The other fused kernels need no plan.
_WITHOUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
CUDNN_IN_STEPS = False  # True: let PyTorch choose cuDNN in steps too (benchmarks/eager_attention.py compares both)


def sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``transformers``' SDPA attention (same arguments, output [batch, q_len, q_heads, head_dim]), every caller's.

    Where the queries are fewer than the keys (a step over a cache: a shape that changes at every call), cuDNN's
    kernel is left out on CUDA, so no call waits for a new plan; a prompt's pass (as many queries as keys) may use it.
    """
    if query.is_cuda and query.shape[2] != key.shape[2] and not CUDNN_IN_STEPS:
        with sdpa_kernel(_WITHOUT_CUDNN):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, tokensieve_attention)
# Masks are built exactly as for SDPA (None for plain causal prefill, so the
# fused causal kernels run and no n x n mask is materialised).
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def use_tokensieve_attention(model: torch.nn.Module) -> None:
    """Switch a loaded model to tokensieve's attention function (SDPA + hooks)."""
    model.set_attn_implementation(ATTN_IMPLEMENTATION)


class AttentionSwitchedWarning(UserWarning):
    """tokensieve switched a model to its attention function (``ensure_tokensieve_attention``)."""


def attn_implementations(model: torch.nn.Module) -> set[Any]:
    """The attention implementations a model's config (and its text config) name, e.g. ``{"sdpa"}``."""
    config = getattr(model, "config", None)
    if config is None:
        return set()
    configs = [config]
    text = getattr(config, "get_text_config", None)
    if callable(text):
        configs.append(text())
    return {getattr(c, "_attn_implementation", None) for c in configs}


def ensure_tokensieve_attention(model: torch.nn.Module) -> None:
    """The one check every tokensieve entry point that runs a model makes first.

    A model on tokensieve attention passes. Any other (a user's ``from_pretrained`` model is on
    ``"sdpa"`` or ``"eager"``) is switched with ``use_tokensieve_attention``, once, with an
    ``AttentionSwitchedWarning`` naming its class and the implementation it had: the hooks every
    method works through reach only tokensieve's attention, so left alone the methods would run
    unchanged (full attention under another name) or fail deep inside. ``InputError`` where no
    switch is possible: an object without a transformers config or ``set_attn_implementation``
    (not a ``transformers`` model), or a model class ``transformers`` cannot give another attention.
    """
    had = attn_implementations(model)
    if had == {ATTN_IMPLEMENTATION}:
        return
    cls = type(model).__name__
    switch = getattr(model, "set_attn_implementation", None)
    if not had or not callable(switch):
        raise InputError(
            f"tokensieve runs transformers models (a PreTrainedModel with set_attn_implementation), got {cls}"
        )
    try:
        switch(ATTN_IMPLEMENTATION)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise InputError(f"tokensieve cannot switch {cls} to its attention: {exc}") from None
    if attn_implementations(model) != {ATTN_IMPLEMENTATION}:
        raise InputError(f"tokensieve cannot switch {cls} to its attention (it still uses {sorted(map(str, had))})")
    was = ", ".join(sorted(map(repr, had)))
    warnings.warn(
        f"tokensieve switched {cls} from {was} attention to tokensieve's (SDPA plus the hooks its methods use; "
        f"full attention computes the same); call tokensieve.use_tokensieve_attention(model) after loading to "
        f"do it yourself",
        AttentionSwitchedWarning,
        stacklevel=3,
    )


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[batch, kv_heads, seq, dim] -> [batch, kv_heads * groups, seq, dim]."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)
