"""H2O: heavy hitters (most attention received) plus a recent window.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
Large Language Models", NeurIPS 2023 (arXiv:2306.14048).

Every cache entry carries the attention it has received so far, per KV head:
softmax probabilities summed over every query that saw it and over the query
heads sharing the KV head. After the prompt (all ``n`` queries) each layer and
KV head keeps its ``budget - n_recent`` best-scoring entries among all but the
last ``n_recent`` tokens, plus those ``n_recent`` recent tokens. At every decoding
step the new token's attention is added to the scores and, when the cache is
over ``budget``, the lowest-scoring entry outside the recent window is evicted.

The original code needs the full ``n x n`` attention matrix (eager
attention). Here the prompt's attention output is plain SDPA and the scores
come from ``scoring.attention_scores``, so prefill memory stays linear in ``n``
(at the cost of computing ``QK^T`` again): on a GPU with Triton, by fused
kernels that never store the probabilities (``scoring_kernel``); elsewhere,
``chunk_size`` queries at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import Cache, PreTrainedModel

from tokensieve.core.cache import EvictionCache
from tokensieve.core.scoring import SCORE_KERNELS, attention_scores, topk_with_recent
from tokensieve.decode.slots import SlotPolicy, SlotState
from tokensieve.errors import InputError, check_choice, check_int
from tokensieve.methods.base import Capabilities
from tokensieve.methods.eviction import EvictionMethod, LayerCall


class HeavyHitterSlots(SlotState):
    """H2O's rule on a static decoder's slots: every slot carries the attention it has received (float32, summed
    over the query heads that share its KV head, as the eager cache does) and a write stamp; each step writes the
    new entry, per KV head, into the slot the previous step freed; once ``budget + 1`` entries are held, the
    lowest-scoring slot outside the ``n_recent`` newest stamps is freed for the next step (all on the device)."""

    needs_probabilities = "H2O's eviction needs the attention probabilities"

    def __init__(self, decoder: Any) -> None:
        super().__init__(decoder)
        b, hkv, cap, dev = decoder.batch, decoder.keys[0].shape[1], decoder.capacity, self.size.device
        n_layers = len(decoder.keys)
        self.acc = [torch.zeros(b, hkv, cap, dtype=torch.float32, device=dev) for _ in range(n_layers)]
        self.stamp = [torch.zeros(b, hkv, cap, dtype=torch.long, device=dev) for _ in range(n_layers)]
        self.free = [torch.zeros(b, hkv, dtype=torch.long, device=dev) for _ in range(n_layers)]  # next step's slot
        self.limits = torch.zeros(2, dtype=torch.long, device=dev)  # budget, n_recent

    def load(self, policy: SlotPolicy | None, cache: Cache, lengths: list[int]) -> None:
        super().load(policy, cache, lengths)
        budget, keep = (policy.budget, policy.n_recent) if policy is not None else (self.decoder.capacity, 0)
        self.limits.copy_(torch.tensor([budget, keep], dtype=torch.long))
        scores = getattr(cache, "scores", {})
        for i, n in enumerate(lengths):
            self.acc[i].zero_()
            if policy is not None:
                self.acc[i][:, :, :n].copy_(scores[i])
            self.stamp[i].zero_()
            self.stamp[i][:, :, :n].copy_(torch.arange(n, device=self.stamp[i].device))  # position order
            self.free[i].fill_(n)

    def write(self, li: int, key: torch.Tensor, value: torch.Tensor) -> None:
        # per KV head, the slot freed by the previous step (or the next empty one)
        b, hkv, _, d = key.shape
        written, free = self.decoder.filled[li : li + 1], self.free[li][:, :, None]  # [1], [b, hkv, 1]
        self.decoder.keys[li].scatter_(2, free[..., None].expand(b, hkv, 1, d), key)
        self.decoder.values[li].scatter_(2, free[..., None].expand(b, hkv, 1, d), value)
        self.acc[li].scatter_(2, free, 0.0)  # a new entry starts with no attention received
        self.stamp[li].scatter_(2, free, written.expand(b, hkv, 1))

    def after(self, li: int, visible: torch.Tensor | None, received: torch.Tensor | None) -> None:
        """Add this step's attention [b, hkv, cap] to the slots' scores; once ``budget + 1`` entries are held, free
        each KV head's lowest-scoring slot outside the ``n_recent`` newest for the next step."""
        written = self.decoder.filled[li : li + 1]
        acc, budget, keep = self.acc[li], self.limits[0:1], self.limits[1:2]
        acc.add_(received)
        newest = self.stamp[li] > written - keep  # [b, hkv, cap]: the n_recent most recent writes
        candidates = acc.masked_fill(newest | ~visible[:, None, :], float("inf"))
        victim = candidates.argmin(dim=-1)  # [b, hkv]
        grow = (written + 1).clamp(max=self.decoder.capacity - 1).expand_as(victim)  # the next empty slot
        self.free[li].copy_(torch.where(written + 1 > budget, victim, grow))


@dataclass(frozen=True)
class HeavyHitterPolicy(SlotPolicy):
    """H2O's slot policy: the ``n_recent`` newest entries stay, then the most attended-to; ``budget`` in all."""

    budget: int
    n_recent: int
    state_type: ClassVar[type[SlotState]] = HeavyHitterSlots

    def __post_init__(self) -> None:
        if not (0 <= self.n_recent <= self.budget and self.budget >= 1):
            raise ValueError(f"bad {self}: needs 0 <= n_recent <= budget and budget >= 1")


@dataclass
class H2O(EvictionMethod):
    """H2O (Zhang et al., 2023): heavy-hitter entries by accumulated attention, plus recent tokens.

    Parameters:
        budget: entries kept per layer and KV head, during and after the prompt;
            ``budget >= n + new tokens`` never evicts (exactly full attention).
        n_recent: recent tokens always kept; ``None`` = ``budget // 2`` (the
            paper's equal split between heavy hitters and recent tokens).
            Formerly ``window``.
        chunk_size: prompt queries scored at once by the torch path; ``None`` picks a
            size that keeps the score block under 2**26 floats.
        score_kernel: how the scores are computed (``scoring.attention_scores``'s ``kernel``):
            ``"auto"`` (the fused Triton kernels for a half-precision prompt on a GPU when
            Triton is installed, else torch), ``"torch"`` (query chunks) or ``"triton"``.
    """

    name: ClassVar[str] = "h2o"
    capabilities: ClassVar[Capabilities] = Capabilities(static_decode="evict")
    renamed: ClassVar[dict[str, str]] = {"window": "n_recent"}
    budget: int = 1024
    n_recent: int | None = None
    chunk_size: int | None = None
    score_kernel: str = "auto"

    @property
    def resolved_n_recent(self) -> int:
        """Recent tokens kept: ``n_recent``, or ``budget // 2`` when it is None."""
        return self.budget // 2 if self.n_recent is None else self.n_recent

    def validate(self, model: PreTrainedModel, prompt_len: int) -> None:
        check_int("budget", self.budget, 1)
        if self.n_recent is not None:
            check_int("n_recent", self.n_recent, 0)
            if self.n_recent > self.budget:
                raise InputError(f"n_recent ({self.n_recent}) must not exceed budget ({self.budget})")
        if self.chunk_size is not None:
            check_int("chunk_size", self.chunk_size, 1)
        check_choice("score_kernel", self.score_kernel, SCORE_KERNELS)
        if self.score_kernel == "triton":
            from tokensieve.kernels import scoring_kernel  # optional Triton, imported when asked for

            if not scoring_kernel.available():
                raise InputError("score_kernel='triton' needs Triton, which is not installed (or use 'auto' / 'torch')")

    @staticmethod
    def _mask(call: LayerCall) -> torch.Tensor | None:
        """The boolean mask the scores honour (None when the call has none or a float one)."""
        m = call.attention_mask
        return m if m is not None and m.dtype == torch.bool else None

    def _received(self, call: LayerCall) -> torch.Tensor:
        """Attention each key receives from the call's queries, [b, kv_heads, entries] (a boolean mask is honoured)."""
        return attention_scores(
            call.query,
            call.key,
            call.module.scaling,
            attention_mask=self._mask(call),
            query_chunk=self.chunk_size,
            kernel=self.score_kernel,
        )

    def _evict(self, cache: EvictionCache, layer_idx: int) -> None:
        scores = cache.scores[layer_idx]  # [b, hkv, entries]
        if scores.shape[-1] > self.budget:
            cache.keep(layer_idx, topk_with_recent(scores, self.budget, self.resolved_n_recent))

    def slot_policy(self) -> HeavyHitterPolicy:
        # each step adds the new token's attention to every entry, then drops the lowest outside the recent window
        return HeavyHitterPolicy(self.budget, self.resolved_n_recent)

    def evict(self, call: LayerCall) -> None:
        received = self._received(call)  # [b, hkv, entries]
        if call.prefill:
            call.cache.scores[call.layer_idx] = received
        else:  # the entries' scores so far, plus what the new token gave each (the new entry starts at 0)
            old = call.cache.scores[call.layer_idx]
            call.cache.scores[call.layer_idx] = received + torch.nn.functional.pad(
                old, (0, received.shape[-1] - old.shape[-1])
            )
        self._evict(call.cache, call.layer_idx)
