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

from typing import Any, Callable, Protocol

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, **kwargs: Any,
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


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[batch, kv_heads, seq, dim] -> [batch, kv_heads * groups, seq, dim]."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)
