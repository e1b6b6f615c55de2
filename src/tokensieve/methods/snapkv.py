"""SnapKV: keep the prompt entries the last queries attend to.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
NeurIPS 2024 (arXiv:2404.14469).

Full prefill (the prompt is computed as usual, so TTFT does not drop); then
per layer and per KV head, the attention of the last ``window_size`` prompt
queries (the observation window) ranks the earlier prompt tokens: softmax
probabilities summed over the window's queries and over the query heads that
share the KV head (``scoring.attention_scores``), smoothed by a 1-D pooling
(kernel 5). Each KV head keeps its ``budget - window_size`` best prefix
entries plus the whole window (``scoring.topk_with_recent``), so every layer
holds exactly ``budget`` prompt entries; decoded tokens are appended without
further eviction. Only the window's ``window_size x n`` rows of attention are
formed (memory linear in ``n``), inside the normal SDPA prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from tokensieve.core.scoring import attention_scores, span_scores, topk_with_recent
from tokensieve.errors import InputError, check_int
from tokensieve.methods.base import Capabilities, DecodeState
from tokensieve.methods.eviction import DEFAULT_DILATION, EvictionMethod, LayerCall, check_span_rule


@dataclass
class SnapKV(EvictionMethod):
    """SnapKV (Li et al., 2024): prompt KV entries ranked by an observation window's attention.

    Parameters:
        budget: prompt entries kept per layer and KV head (window included);
            ``budget >= n`` keeps the whole prompt (exactly full attention).
        window_size: observation window, the last prompt tokens whose attention
            scores the rest (the paper uses 32); always kept (formerly ``window``).
        kernel: pooling kernel over the scores (odd; 1 disables smoothing).
        pooling: ``"avg"`` (as in this project's reference description) or ``"max"``.
        dilation: span width (odd; 1 = isolated entries, as the paper; default 31, GemFilter's): each entry ranks with the best
            pooled score within ``dilation // 2`` positions, so kept entries come in whole spans
            (``scoring.span_rank``, the rule GemFilter uses).
    """

    name: ClassVar[str] = "snapkv"
    capabilities: ClassVar[Capabilities] = Capabilities(batch=True, static_decode="grow", prefix_reuse=True)
    renamed: ClassVar[dict[str, str]] = {"window": "window_size"}
    budget: int = 1024
    window_size: int = 32
    kernel: int = 5
    pooling: str = "avg"
    dilation: int = DEFAULT_DILATION

    def prefix_tail(self, n: int) -> int:
        """The observation window's queries score the prompt (when it is longer than the budget): computed here."""
        return min(self.window_size, n) if n > self.budget else 1

    def validate(self, model: PreTrainedModel, prompt_len: int) -> None:
        check_int("budget", self.budget, 1)
        check_int("window_size", self.window_size, 1)
        if self.window_size > self.budget:
            raise InputError(f"window_size ({self.window_size}) must not exceed budget ({self.budget})")
        check_span_rule(self.kernel, self.pooling, self.dilation)

    def scores(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Ranking scores [batch, kv_heads, n - window_size] of the prefix entries (pooled, span rule applied)."""
        n = key.shape[2]
        w = min(self.window_size, n)
        s = attention_scores(query[:, :, -w:], key, module.scaling)  # [b, hkv, n]
        return span_scores(s[..., : n - w], self.kernel, self.pooling, self.dilation)

    evicts_while_decoding: ClassVar[bool] = False  # decoded tokens are appended, never evicted

    def _keep(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Entry indices [b, hkv, budget] kept out of ``key`` [b, hkv, n] (``n > budget``)."""
        prefix = self.scores(module, query, key)  # [b, hkv, n - window_size]
        # The window's own scores are never read: the window is always kept.
        full = torch.cat([prefix, prefix.new_zeros(*prefix.shape[:2], self.window_size)], dim=-1)  # [b, hkv, n]
        return topk_with_recent(full, self.budget, self.window_size)

    def evict(self, call: LayerCall) -> None:
        n = call.key.shape[2]
        if not call.prefill or n <= self.budget:
            return
        pads = call.cache.pad_counts
        if not pads:
            call.cache.keep(call.layer_idx, self._keep(call.module, call.query, call.key))
            return
        # A left-padded batch: each row is scored on its own real tokens (pads never score, never stay),
        # exactly as if it ran alone; a row of at most ``budget`` tokens keeps them all (and pads to fill).
        rows = []
        for b, pad in enumerate(pads):
            if n - pad > self.budget:
                idx = self._keep(call.module, call.query[b : b + 1, :, pad:], call.key[b : b + 1, :, pad:]) + pad
            else:  # pads first, then every real entry
                idx = torch.arange(n - self.budget, n, device=call.key.device).expand(1, call.key.shape[1], self.budget)
            rows.append(idx)
        call.cache.keep(call.layer_idx, torch.cat(rows))  # [b, hkv, budget]

    def prefill_batch(
        self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> DecodeState:
        return self._prefill(model, input_ids, attention_mask)
