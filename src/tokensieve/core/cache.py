"""The KV cache of the eviction methods: a ``DynamicCache`` that keeps only chosen entries.

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

The scores that decide which entries stay are computed in ``tokensieve.core.scoring``.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer


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
        self.pads: torch.Tensor | None = None  # [batch] left pads per row (batches); None: no padding
        self.pad_counts: list[int] = []  # the same on the host

    def set_padding(self, attention_mask: torch.Tensor) -> None:
        """A left-padded batch: ``attention_mask`` [batch, n] (1 = real). Each row's entries get positions
        counted from its first real token, so pad entries have negative positions (and are never valid)."""
        self.pads = (attention_mask.shape[-1] - attention_mask.long().sum(-1)).to(torch.long)  # [batch]
        self.pad_counts: list[int] = self.pads.tolist()

    def valid_mask(self, layer_idx: int | None = None) -> torch.Tensor:
        """``[batch, entries]`` bool: the real (non-pad) entries of a layer (default: the first evictable one).

        Pads sit at the same entries in every KV head (they are kept only to fill a row), so head 0 says it."""
        if layer_idx is None:
            layer_idx = next(i for i in range(len(self.layers)) if self.is_evictable(i))
        return self.sync_positions(layer_idx)[:, 0] >= 0

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
            if self.pads is not None:  # left-padded rows: positions count from each row's first real token
                fresh = fresh - self.pads.to(keys.device)[:, None, None]
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

    def prompt_coverage(self, prompt_tokens: int) -> tuple[list[int], int, torch.Tensor]:
        """Which prompt positions each evictable layer holds, for one prompt (batch row 0): ``(layers, kv_heads,
        counts)`` with ``counts`` ``[len(layers), prompt_tokens]`` int64, how many of the layer's ``kv_heads`` KV
        heads hold an entry of that prompt position (0: evicted by every head). Sliding-window layers are left
        out (``layers`` names the layer indices counted). Decoded tokens (positions >= ``prompt_tokens``) are
        not counted."""
        layers = [i for i in range(len(self.layers)) if self.is_evictable(i) and self.layers[i].keys is not None]
        rows, heads = [], 0
        for i in layers:
            pos = self.sync_positions(i)[0]  # [kv_heads, entries]
            heads = int(pos.shape[0])
            pos = pos[(pos >= 0) & (pos < prompt_tokens)]
            rows.append(torch.bincount(pos.reshape(-1).cpu(), minlength=prompt_tokens)[:prompt_tokens])
        counts = torch.stack(rows) if rows else torch.zeros(0, prompt_tokens, dtype=torch.long)
        return layers, heads, counts
