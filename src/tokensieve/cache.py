"""KV caches that evict entries, and the attention scores eviction methods rank entries by.

``EvictionCache`` is a ``transformers`` ``DynamicCache`` whose full-attention
layers can be shrunk to chosen entries, per layer and per KV head. It records
the **original position** of every entry it holds (eviction methods keep
original positions: the next token gets position ``n + t`` however few
entries remain) and, for each entry, an optional accumulated score (H2O).

Eviction happens inside the attention hook of the method, right after a
layer's attention has used the entries, so the mask ``transformers`` built for
that forward always matches the keys it is applied to, and a prefill never
holds the full KV of more than one layer beyond what it keeps.

Sliding-window layers (``DynamicSlidingWindowLayer``, e.g. Gemma 3's local
layers) are left as they are: they already hold a bounded window, and their
masks rely on their own bookkeeping.

Score functions take post-RoPE queries ``[batch, q_heads, q_len, head_dim]``
and keys ``[batch, kv_heads, kv_len, head_dim]`` (before GQA repetition) and
return float32 scores per KV head ``[batch, kv_heads, kv_len]``: the softmax
attention probabilities of the chosen queries, summed over those queries and
over the query heads that share the KV head. They never form more than a
``chunk x kv_len`` block of attention per query head at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

# Elements of float32 attention logits formed at once by ``attention_scores`` when
# no chunk size is given (2**26 floats = 256 MiB; the softmax needs about as much again).
DEFAULT_SCORE_ELEMENTS = 1 << 26


class EvictionCache(DynamicCache):
    """A ``DynamicCache`` whose full-attention layers keep only chosen entries.

    Attributes (per layer index, for evictable layers only):
        positions: ``[batch, kv_heads, entries]`` int64 original position of each held entry.
        scores: ``[batch, kv_heads, entries]`` float32 accumulated score (used by H2O).
        token_ids: ``[batch, tokens]`` every token id fed so far (prompt and decoded),
            so that a policy can look up the token an entry came from (SepLLM).
    """

    def __init__(self, config: PretrainedConfig):
        super().__init__(config=config)
        self.positions: dict[int, torch.Tensor] = {}
        self.scores: dict[int, torch.Tensor] = {}
        self.token_ids: torch.Tensor | None = None
        self._seen: dict[int, int] = {}

    def is_evictable(self, layer_idx: int) -> bool:
        """Full-attention dynamic layers are evicted; sliding-window and other layer kinds are not."""
        if layer_idx >= len(self.layers):
            return False
        layer = self.layers[layer_idx]
        return isinstance(layer, DynamicLayer) and not getattr(layer, "is_sliding", False)

    def add_tokens(self, token_ids: torch.Tensor) -> None:
        """Record fed token ids [batch, new]."""
        self.token_ids = token_ids if self.token_ids is None else torch.cat([self.token_ids, token_ids], dim=-1)

    def sync_positions(self, layer_idx: int) -> torch.Tensor:
        """Positions ``[batch, kv_heads, entries]`` of the layer's entries.

        Entries appended since the last call (the layer's ``update`` concatenates
        new keys at the end) get the next original positions in order.
        """
        keys = self.layers[layer_idx].keys  # [b, h, entries, d]
        b, h, entries, _ = keys.shape
        pos = self.positions.get(layer_idx)
        have = 0 if pos is None else pos.shape[-1]
        new = entries - have
        if new > 0:
            seen = self._seen.get(layer_idx, 0)
            fresh = torch.arange(seen, seen + new, device=keys.device).expand(b, h, new)
            pos = fresh if pos is None else torch.cat([pos, fresh], dim=-1)
            self.positions[layer_idx] = pos
            self._seen[layer_idx] = seen + new
        return pos

    def seen_tokens(self, layer_idx: int) -> int:
        """Tokens ever appended to the layer (= the original position of the next one)."""
        return self._seen.get(layer_idx, 0)

    def keep(self, layer_idx: int, index: torch.Tensor) -> None:
        """Keep only entries ``index`` of the layer, in that order.

        ``index`` is ``[kept]`` (the same entries for every head) or
        ``[batch, kv_heads, kept]`` (per head; every head keeps the same number).
        """
        layer = self.layers[layer_idx]
        pos = self.sync_positions(layer_idx)
        score = self.scores.get(layer_idx)
        if index.dim() == 1:
            layer.keys = layer.keys[:, :, index]
            layer.values = layer.values[:, :, index]
            self.positions[layer_idx] = pos[..., index]
            if score is not None:
                self.scores[layer_idx] = score[..., index]
            return
        b, h, kept = index.shape
        d_k, d_v = layer.keys.shape[-1], layer.values.shape[-1]
        layer.keys = layer.keys.gather(2, index[..., None].expand(b, h, kept, d_k))  # [b, h, kept, d]
        layer.values = layer.values.gather(2, index[..., None].expand(b, h, kept, d_v))
        self.positions[layer_idx] = pos.gather(2, index)
        if score is not None:
            self.scores[layer_idx] = score.gather(2, index)

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """``[batch, kv_heads, entries]`` original positions held by the layer (after syncing new entries)."""
        return self.sync_positions(layer_idx)


def attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    chunk: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention received by each key, summed over queries and grouped query heads.

    query: [batch, q_heads, q_len, head_dim]; key: [batch, kv_heads, kv_len, head_dim].
    The queries are the last ``q_len`` tokens of the ``kv_len`` (causal:
    query ``i`` sees keys ``0 .. kv_len - q_len + i``). ``attention_mask``, if
    given, is a boolean mask broadcastable to [batch, 1, q_len, kv_len] that is
    combined with the causal rule. Returns float32 [batch, kv_heads, kv_len].
    Queries are processed ``chunk`` at a time (default: as many as keep the
    logits under ``DEFAULT_SCORE_ELEMENTS``), so memory is linear in ``kv_len``.
    """
    b, hq, q_len, d = query.shape
    hkv, kv_len = key.shape[1], key.shape[2]
    g = hq // hkv
    offset = kv_len - q_len
    if chunk is None:
        chunk = max(1, DEFAULT_SCORE_ELEMENTS // max(1, hq * kv_len))
    k_t = key.float().transpose(-1, -2)  # [b, hkv, d, kv_len]
    acc = torch.zeros(b, hkv, kv_len, dtype=torch.float32, device=key.device)
    kv_pos = torch.arange(kv_len, device=key.device)
    for q0 in range(0, q_len, chunk):
        q1 = min(q_len, q0 + chunk)
        c, end = q1 - q0, offset + q1  # keys after `end` are invisible to this chunk
        q = query[:, :, q0:q1].float().reshape(b, hkv, g * c, d)  # row = (head in group, query)
        logits = torch.matmul(q, k_t[..., :end]) * scaling  # [b, hkv, g*c, end]
        q_pos = (torch.arange(q0, q1, device=key.device) + offset).repeat(g)  # [g*c]
        visible = kv_pos[None, :end] <= q_pos[:, None]  # [g*c, end]
        if attention_mask is not None:
            m = attention_mask[..., q0:q1, :end].to(torch.bool)  # [b or 1, 1, c, end]
            visible = visible & m[:, 0].repeat(1, g, 1)[:, None]  # [b or 1, 1, g*c, end]
        probs = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        acc[..., :end] += probs.sum(dim=2)
    return acc


def pool_scores(scores: torch.Tensor, kernel: int, pooling: str = "avg") -> torch.Tensor:
    """1-D pooling over the last dim (stride 1, same length) of [batch, heads, n] scores."""
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    b, h, n = scores.shape
    x = scores.reshape(b * h, 1, n)
    if pooling == "avg":
        x = F.avg_pool1d(x, kernel_size=kernel, stride=1, padding=kernel // 2)
    elif pooling == "max":
        x = F.max_pool1d(x, kernel_size=kernel, stride=1, padding=kernel // 2)
    else:
        raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
    return x.reshape(b, h, n)


def top_prefix_plus_window(scores: torch.Tensor, budget: int, window: int) -> torch.Tensor:
    """Entry indices [batch, heads, budget]: the last ``window`` entries plus the
    ``budget - window`` best-scoring earlier ones, per head, in ascending order.

    scores: [batch, heads, n] with ``n > budget >= window``.
    """
    b, h, n = scores.shape
    prefix = scores[..., : n - window]
    top = torch.topk(prefix, budget - window, dim=-1).indices  # [b, h, budget - window]
    recent = torch.arange(n - window, n, device=scores.device).expand(b, h, window)
    return torch.sort(torch.cat([top, recent], dim=-1), dim=-1).values
