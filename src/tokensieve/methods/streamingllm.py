"""StreamingLLM: attention sinks plus a recent window.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
ICLR 2024 (arXiv:2309.17453).

Non-streaming use (as a KV-eviction baseline): the prompt is computed with
full attention at its original positions, then every layer keeps the first
``n_initial`` tokens (the attention sinks) and the last ``budget - n_initial``; each decoded token attends
to those plus itself, after which the oldest non-sink entry is evicted, so the
cache never holds more than ``budget`` entries between steps. (Streaming with
positions shifted inside the cache is ``tokensieve.engine.streaming``; its
StreamingLLM policy keeps entries by the same rule, ``keep_sinks_and_recent``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import Cache, PreTrainedModel

from tokensieve.core.cache import EvictionCache
from tokensieve.decode.slots import SlotPolicy, SlotState
from tokensieve.errors import InputError, check_int
from tokensieve.methods.base import Capabilities, DecodeState
from tokensieve.methods.eviction import EvictionMethod, LayerCall


def keep_sinks_and_recent(
    n_entries: int, n_initial: int, n_recent: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """StreamingLLM's keep rule: sorted indices [kept] of the entries that stay out of ``n_entries`` in stream order.

    The first ``n_initial`` entries (attention sinks) and the last ``n_recent``; every entry
    when ``n_entries <= n_initial + n_recent``.
    """
    if n_entries <= n_initial + n_recent:
        return torch.arange(n_entries, device=device)
    return torch.cat(
        [torch.arange(n_initial, device=device), torch.arange(n_entries - n_recent, n_entries, device=device)]
    )


def keep_sinks_and_recent_rows(valid: torch.Tensor, n_initial: int, n_recent: int) -> torch.Tensor:
    """The same rule per row of a left-padded batch: entry indices [batch, kept] that stay, in order.

    ``valid`` [batch, entries] marks the real entries. Each row keeps its first ``n_initial`` real entries
    and its last ``n_recent`` (all of them when it has no more); rows with fewer real entries than
    ``kept = min(n_initial + n_recent, entries)`` fill up with pads (still masked). No host sync.
    """
    b, e = valid.shape
    kept = min(n_initial + n_recent, e)
    rank = valid.long().cumsum(-1) - 1  # [b, e]: rank among the row's real entries
    real = valid.long().sum(-1, keepdim=True)  # [b, 1]
    keep_real = valid & ((rank < n_initial) | (rank >= real - n_recent))
    # first the real entries the rule keeps, then pads, then dropped real entries; ties in entry order
    order = torch.where(keep_real, 0, torch.where(valid, 2, 1)) * e + torch.arange(e, device=valid.device)
    return torch.sort(torch.argsort(order, dim=-1)[:, :kept], dim=-1).values


class SinkRingSlots(SlotState):
    """StreamingLLM's rule on a static decoder's slots: slots ``0 .. n_initial - 1`` hold the sinks, the rest
    (up to ``budget + 1``) is a ring; once every slot is written the new entry overwrites the ring's oldest."""

    def __init__(self, decoder: Any) -> None:
        super().__init__(decoder)
        self.fixed = torch.zeros(1, dtype=torch.long, device=self.size.device)  # [1]: slots before the ring

    def load(self, policy: SlotPolicy | None, cache: Cache, lengths: list[int]) -> None:
        super().load(policy, cache, lengths)
        self.fixed.fill_(policy.n_initial if policy is not None else 0)

    def write(self, li: int, key: torch.Tensor, value: torch.Tensor) -> None:
        written, fixed, size = self.decoder.filled[li : li + 1], self.fixed, self.size
        slot = torch.where(written < size, written, fixed + (written - fixed) % (size - fixed))
        self.decoder.keys[li].index_copy_(2, slot, key)
        self.decoder.values[li].index_copy_(2, slot, value)


@dataclass(frozen=True)
class SinkRingPolicy(SlotPolicy):
    """StreamingLLM's slot policy: ``n_initial`` sinks + the newest entries, ``budget`` in all."""

    budget: int
    n_initial: int
    state_type: ClassVar[type[SlotState]] = SinkRingSlots

    def __post_init__(self) -> None:
        if not 0 <= self.n_initial < self.budget:
            raise ValueError(f"bad {self}: needs 0 <= n_initial < budget")


@dataclass
class StreamingLLM(EvictionMethod):
    """StreamingLLM (Xiao et al., 2024): ``n_initial`` first tokens + the most recent ones.

    Parameters:
        budget: entries kept per layer (initial tokens included); ``budget >= n + new
            tokens`` never evicts (exactly full attention).
        n_initial: initial "attention sink" tokens always kept (the paper uses 4;
            formerly ``sinks``).
    """

    name: ClassVar[str] = "streamingllm"
    capabilities: ClassVar[Capabilities] = Capabilities(batch=True, static_decode="evict")
    renamed: ClassVar[dict[str, str]] = {"sinks": "n_initial"}
    budget: int = 1024
    n_initial: int = 4

    def validate(self, model: PreTrainedModel, prompt_len: int) -> None:
        check_int("budget", self.budget, 1)
        check_int("n_initial", self.n_initial, 0)
        if self.n_initial >= self.budget:
            raise InputError(
                f"n_initial ({self.n_initial}) must be smaller than budget ({self.budget}) to leave a recent window"
            )

    def slot_policy(self) -> SinkRingPolicy:
        # each step attends over the sinks and budget - n_initial + 1 newest entries, then drops the oldest
        return SinkRingPolicy(self.budget, self.n_initial)

    def _evict(self, cache: EvictionCache, layer_idx: int, entries: int) -> None:
        if entries <= self.budget:
            return
        if cache.pad_counts:  # a left-padded batch: sinks are each row's first real tokens
            idx = keep_sinks_and_recent_rows(cache.valid_mask(layer_idx), self.n_initial, self.budget - self.n_initial)
            hkv = cache.layers[layer_idx].keys.shape[1]
            cache.keep(layer_idx, idx[:, None].expand(-1, hkv, -1))  # [b, hkv, budget]
            return
        dev = cache.layers[layer_idx].keys.device
        cache.keep(layer_idx, keep_sinks_and_recent(entries, self.n_initial, self.budget - self.n_initial, dev))

    def prefill_batch(
        self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> DecodeState:
        return self._prefill(model, input_ids, attention_mask)

    def evict(self, call: LayerCall) -> None:
        # entries stay in position order: the initial tokens first, then the recent ones
        self._evict(call.cache, call.layer_idx, call.key.shape[2])
