"""SepLLM's attention rule as a training mask: a dense boolean mask (SDPA) and a FlexAttention block mask.

Chen et al., "SepLLM: Accelerate Large Language Models by Compressing One Segment into One Separator",
ICML 2025 (arXiv:2412.12094): its training settings (from scratch and post-training) train under the same
rule the training-free setting applies at inference: every query sees the first ``n_initial`` tokens, every
earlier separator and its ``n_recent`` preceding tokens. Both masks here evaluate
``tokensieve.methods.sepllm.sepllm_rule`` (the inference side's rule) on the separator flags that
``tokensieve.core.separators.separator_token_ids`` gives for the tokenizer.

The mask reaches the model through tokensieve's registered attention function (``AttentionInterface``,
``attention.HOOK_KWARG``): ``training_hook`` returns the hook a forward passes as a keyword argument, so no
model file is patched and any family on tokensieve attention trains under it. A hook applies only to a
forward without a cache (as many queries as keys, positions ``0..n-1`` in each row): training and
evaluation passes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tokensieve.core.attention import sdpa
from tokensieve.errors import InputError, check_choice
from tokensieve.methods.sepllm import sepllm_rule

KERNELS = ("sdpa", "flex", "flex-mask")  # dense reference; FlexAttention over gathered specials; plain block mask
MASKS = ("sepllm", "full")
FLEX_BLOCK = 128  # FlexAttention's default block (queries x keys) on GPU


def sepllm_dense_mask(is_separator: torch.Tensor, n_initial: int, n_recent: int) -> torch.Tensor:
    """Bool [batch, 1, n, n]: ``[b, 0, i, j]`` whether query ``i`` of row ``b`` may attend to key ``j``.

    is_separator: bool [batch, n], whether each token is a separator. Positions are ``0..n-1`` in each row.
    """
    if is_separator.dim() != 2:
        raise InputError(f"is_separator must be [batch, n], got shape {tuple(is_separator.shape)}")
    n = is_separator.shape[1]
    pos = torch.arange(n, device=is_separator.device)
    i, j = pos[None, :, None], pos[None, None, :]  # [1, n, 1], [1, 1, n]
    return sepllm_rule(i, j, is_separator[:, None, :], n_initial, n_recent)[:, None]


def sepllm_mask_mod(is_separator: torch.Tensor, n_initial: int, n_recent: int) -> Callable:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` of SepLLM's rule over ``is_separator`` [batch, n]."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return sepllm_rule(q_idx, kv_idx, is_separator[b, kv_idx], n_initial, n_recent)

    return mask_mod


def sepllm_block_mask(is_separator: torch.Tensor, n_initial: int, n_recent: int, block_size: int = FLEX_BLOCK) -> Any:
    """FlexAttention ``BlockMask`` of SepLLM's rule over ``is_separator`` [batch, n] (one mask for every head).

    Blocks of ``block_size`` x ``block_size`` that no pair of the rule touches are skipped by the kernel
    (forward and backward); the others are computed with the rule applied per element.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    b, n = is_separator.shape
    return create_block_mask(
        sepllm_mask_mod(is_separator, n_initial, n_recent),
        b,
        None,
        n,
        n,
        device=is_separator.device,
        BLOCK_SIZE=block_size,
    )


def special_positions(is_separator: torch.Tensor, n_initial: int, bucket: int = FLEX_BLOCK) -> torch.Tensor:
    """int64 [batch, s]: each row's positions of the tokens every later query sees (the first ``n_initial`` and
    the separators), ascending, padded with ``-1`` to a common length ``s``, a multiple of ``bucket`` (so the
    compiled kernel sees few distinct shapes)."""
    b, n = is_separator.shape
    pos = torch.arange(n, device=is_separator.device)
    special = is_separator | (pos < n_initial)[None]  # [b, n]
    s = max(1, int(special.sum(-1).max()))
    s = -(-s // bucket) * bucket
    # stable sort puts the special positions first, in order; the rest becomes padding
    order = torch.sort((~special).to(torch.int8), dim=-1, stable=True).indices[:, :s]  # [b, s]
    if s > n:
        order = torch.cat([order, order.new_zeros(b, s - n)], dim=-1)
    taken = torch.gather(special, 1, order.clamp(max=n - 1)) & (torch.arange(s, device=pos.device) < n)[None]
    return torch.where(taken, order, torch.full_like(order, -1))


def compact_mask_mod(spec_pos: torch.Tensor, n_initial: int, n_recent: int) -> Callable:
    """``mask_mod`` over the keys ``[specials (spec_pos [b, s]) | all n keys]`` that gives every query exactly the
    keys of SepLLM's rule, each once: the specials (initial tokens and separators) older than its window from the
    first part, its window (``n_recent`` neighbours and itself) from the second."""
    s = spec_pos.shape[1]

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        p = spec_pos[b, torch.clamp(kv_idx, max=s - 1)]
        yes, no = torch.ones_like(p, dtype=torch.bool), torch.zeros_like(p, dtype=torch.bool)
        window_only = sepllm_rule(q_idx, p, no, 0, n_recent)
        special = (p >= 0) & sepllm_rule(q_idx, p, yes, n_initial, n_recent) & ~window_only
        j = kv_idx - s
        window = sepllm_rule(q_idx, j, no, 0, n_recent)
        return torch.where(kv_idx < s, special, window)

    return mask_mod


class CompactBlockMask:
    """SepLLM's rule as a FlexAttention block mask over ``[specials gathered | all keys]``: the separators (and
    initial tokens) are gathered into a short prefix of keys, so that the kernel computes the blocks of a band
    (the window) and a triangle over the ``s`` specials instead of the ``n x n`` causal triangle (every block of
    which holds some separator). Attention over it equals the dense masked attention (tested)."""

    def __init__(self, is_separator: torch.Tensor, n_initial: int, n_recent: int, block_size: int = FLEX_BLOCK):
        from tokensieve.kernels.flex import block_mask

        b, n = is_separator.shape
        bucket = max(block_size, (n // 16) // block_size * block_size)
        self.spec_pos = special_positions(is_separator, n_initial, bucket)  # [b, s]
        s = self.spec_pos.shape[1]
        self.block_mask = block_mask(
            compact_mask_mod(self.spec_pos, n_initial, n_recent),
            b,
            None,
            n,
            s + n,
            device=is_separator.device,
            BLOCK_SIZE=block_size,
            compiled=is_separator.device.type == "cuda",
        )

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[b, h, n, d] keys or values -> [b, h, s + n, d]: the specials' rows, then all rows."""
        b, h, n, d = x.shape
        idx = self.spec_pos.clamp(min=0)[:, None, :, None].expand(b, h, -1, d)
        return torch.cat([torch.gather(x, 2, idx), x], dim=2)


_COMPILED: dict[str, Callable] = {}


def flex_attention_fn(device: torch.device) -> Callable:
    """``flex_attention``, compiled (once per process) on GPU, where its fused kernel needs it; eager on CPU
    (where PyTorch runs its forward only: it refuses the backward on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type == "cpu":
        return flex_attention
    if "flex" not in _COMPILED:
        import torch._dynamo

        # one compiled kernel per shape (sequence length, gathered keys): allow more than dynamo's default 8
        for name in (
            "recompile_limit",
            "cache_size_limit",
            "accumulated_recompile_limit",
            "accumulated_cache_size_limit",
        ):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]


def flex_attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: Any,
    scaling: float | None = None,
) -> torch.Tensor:
    """FlexAttention under ``block_mask``; output [batch, q_len, q_heads, head_dim] as transformers' functions give.

    query: [b, q_heads, n, d]; key, value: [b, kv_heads, n, d] (grouped-query heads shared, not repeated).
    """
    import warnings

    groups = query.shape[1] // key.shape[1]
    with warnings.catch_warnings():  # the eager CPU path warns that it is not the fused kernel
        warnings.simplefilter("ignore", UserWarning)
        out = flex_attention_fn(query.device)(
            query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=groups > 1
        )
    return out.transpose(1, 2).contiguous()


class TrainingMask:
    """SepLLM's rule for one batch of token ids [batch, n], as the attention hook of a forward.

    kernel: ``"sdpa"`` (dense boolean mask, the reference), ``"flex"`` (FlexAttention over the gathered specials and
    the window: ``CompactBlockMask``) or ``"flex-mask"`` (FlexAttention with the plain ``n x n`` block mask).
    The mask is built once per batch, on first use, and shared by every layer.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        separator_ids: torch.Tensor,
        n_initial: int,
        n_recent: int,
        kernel: str = "sdpa",
        block_size: int = FLEX_BLOCK,
    ):
        if kernel not in KERNELS:
            raise InputError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.is_separator = torch.isin(input_ids, separator_ids.to(input_ids.device))  # [b, n]
        self.n_initial, self.n_recent, self.kernel, self.block_size = n_initial, n_recent, kernel, block_size
        self._mask: Any = None

    def mask(self) -> Any:
        if self._mask is None:
            if self.kernel == "flex":
                self._mask = CompactBlockMask(self.is_separator, self.n_initial, self.n_recent, self.block_size)
            elif self.kernel == "flex-mask":
                self._mask = sepllm_block_mask(self.is_separator, self.n_initial, self.n_recent, self.block_size)
            else:
                self._mask = sepllm_dense_mask(self.is_separator, self.n_initial, self.n_recent)
        return self._mask

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        n = self.is_separator.shape[1]
        if query.shape[2] != n or key.shape[2] != n:
            raise InputError(
                f"the SepLLM training mask is for a forward over the whole batch without a cache "
                f"({n} queries and keys), got {query.shape[2]} queries and {key.shape[2]} keys"
            )
        if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
            raise InputError(
                "the SepLLM training mask does not combine with sliding-window layers or logit "
                "soft-capping (e.g. Gemma); use a Llama, Qwen2/3 or Mistral-style model"
            )
        if self.kernel == "flex":
            m = self.mask()
            return flex_attend(module, query, m.gather(key), m.gather(value), m.block_mask, kwargs.get("scaling")), None
        if self.kernel == "flex-mask":
            return flex_attend(module, query, key, value, self.mask(), kwargs.get("scaling")), None
        mask = self.mask()
        if attention_mask is not None and attention_mask.dtype == torch.bool:  # padding from the model's own mask
            mask = mask & attention_mask[:, :, :, :n]
        out, _ = sdpa(module, query, key, value, mask, **kwargs)
        return out, None


def training_hook(
    input_ids: torch.Tensor,
    separator_ids: torch.Tensor | None,
    mask: str,
    n_initial: int,
    n_recent: int,
    kernel: str = "sdpa",
) -> TrainingMask | None:
    """The hook for a forward over ``input_ids`` under ``mask`` (``"sepllm"``; ``"full"``: None, plain causal)."""
    check_choice("mask", mask, MASKS)
    if mask == "full":
        return None
    if separator_ids is None:
        raise InputError(
            "the sepllm mask needs separator ids (tokensieve.core.separators.separator_token_ids(tokenizer))"
        )
    return TrainingMask(input_ids, separator_ids, n_initial, n_recent, kernel)
