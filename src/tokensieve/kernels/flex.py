"""FlexAttention block masks: built by a compiled kernel on CUDA, eagerly elsewhere (one place for both users,
GemFilter's local filter pass and SepLLM's training mask)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_COMPILED: dict[str, Any] = {}


def block_mask(
    mask_mod: Callable, batch: int | None, heads: int | None, q_len: int, kv_len: int, *, compiled: bool, **kwargs
) -> Any:
    """``create_block_mask(mask_mod, batch, heads, q_len, kv_len, **kwargs)``; with ``compiled``, through
    ``torch.compile(create_block_mask)`` (compiled once per process), which builds the mask block by block
    instead of materialising the ``q_len x kv_len`` boolean mask (what the ``_compile=True`` flag did before
    torch deprecated it). Eager (``compiled=False``) on the CPU."""
    from torch.nn.attention.flex_attention import create_block_mask

    if not compiled:
        return create_block_mask(mask_mod, batch, heads, q_len, kv_len, **kwargs)
    if "create_block_mask" not in _COMPILED:
        _COMPILED["create_block_mask"] = torch.compile(create_block_mask)
    return _COMPILED["create_block_mask"](mask_mod, batch, heads, q_len, kv_len, **kwargs)
