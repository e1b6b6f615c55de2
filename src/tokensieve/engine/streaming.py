"""Streaming language modelling with a bounded KV cache and position shifting.

A text far longer than the model's context is fed in chunks; after each chunk
an eviction *policy* decides which KV entries stay. Three policies:

* :class:`SepLLMPolicy`: the budgeted SepLLM cache ("SepCache"; Chen et al.,
  "SepLLM: Accelerate Large Language Models by Compressing One Segment into One
  Separator", ICML 2025): ``n_initial`` (a) initial tokens, up to
  ``n_separators`` (s) separator tokens, a local window of the ``n_recent`` (w)
  newest tokens, and a total ``budget`` (c).
* :class:`StreamingLLMPolicy`: ``n_initial`` attention sinks + ``n_recent``
  recent tokens within a ``budget`` (Xiao et al., "Efficient Streaming Language
  Models with Attention Sinks", ICLR 2024).
* :class:`FullPolicy`: nothing is evicted (full attention); it stops at the
  model's maximum position unless ``allow_long``.

Position shifting (as StreamingLLM does)
----------------------------------------
Positions are assigned by *index inside the cache*, never by index in the
stream: the cache entries get positions ``0 .. L-1`` and the tokens of a new
chunk get ``L .. L+C-1``. So positions stay below ``capacity + chunk_size``
however long the stream is. Keys are stored **without** rotary embedding
(pre-RoPE). The model computes the chunk's queries and keys with RoPE at the
positions we pass; tokensieve's attention hook then

1. rotates the stored keys at their cache positions ``0 .. L-1`` with the
   model's own ``rotary_emb`` (cos/sin tables; ``tokensieve.core.rope``),
2. attends the chunk's queries to [cache keys, chunk keys] (causal inside the
   chunk),
3. un-rotates the chunk's keys (RoPE is a rotation: the inverse uses
   ``cos / (cos^2 + sin^2)`` and ``-sin / (cos^2 + sin^2)``, which also undoes an
   attention scaling folded into cos/sin) and appends them to the store.

This works for any model whose decoder has a Llama-style ``rotary_emb(x,
position_ids[, layer_type])`` and ``rotate_half`` RoPE (Llama, Mistral,
Qwen2/3, Gemma 3; partial rotary dims are handled). No model code is patched:
the model runs with ``use_cache=False`` and the hook, passed as the
``tokensieve_hook`` keyword, does attention and owns the cache.

Chunk semantics
---------------
``feed(chunk)`` with ``C`` tokens: every token of the chunk attends to all
entries the cache holds at the start of the chunk plus the earlier tokens of
the chunk (and itself). Eviction runs only *between* chunks: the chunk's
entries are appended, then the policy trims the cache back under its
capacity. So the stored cache never exceeds the capacity after a chunk, while
attention inside a chunk may see up to ``capacity + C`` entries. With ``C = 1``
this is exactly token-by-token streaming.

The policies only hold parameters: which entries stay is decided by the
methods' own keep rules (``methods.streamingllm.keep_sinks_and_recent``,
``methods.sepllm.sepcache_keep``). Perplexity over a stream is
``tokensieve.evaluation.stream_ppl``; its plot, ``evaluation.plots.plot_stream``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from tokensieve.core.attention import HOOK_KWARG, ensure_tokensieve_attention, repeat_kv
from tokensieve.core.rope import RopeTables, apply_rope
from tokensieve.errors import InputError
from tokensieve.methods.base import max_positions, num_layers, rename_params
from tokensieve.methods.sepllm import sepcache_keep
from tokensieve.methods.streamingllm import keep_sinks_and_recent


class ContextFullError(InputError):
    """Full attention reached the model's maximum position (pass ``allow_long=True`` to run past it)."""


def _check_sizes(**sizes: int) -> None:
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise InputError(f"{name} must be a non-negative integer, got {v!r}")


# ----------------------------------------------------------------------------- policies


def _unless_all(keep: torch.Tensor, stream_idx: torch.Tensor) -> torch.Tensor | None:
    """``keep`` (sorted indices), or None when it keeps every entry."""
    return None if keep.numel() == stream_idx.numel() else keep


@dataclass
class StreamPolicy:
    """Decides which cache entries survive after each chunk, by a method's keep rule.

    ``renamed`` maps an old parameter name to its current one: ``make_policy`` still
    accepts the old name for one release, with a ``FutureWarning``.
    """

    name: ClassVar[str] = "base"
    renamed: ClassVar[dict[str, str]] = {}
    needs_separators: ClassVar[bool] = False  # its keep rule reads which tokens are separators

    @property
    def capacity(self) -> int | None:
        """Most entries the cache holds between chunks (None: unbounded)."""
        return None

    def validate(self) -> None:
        """Raise ``InputError`` naming the bad parameter."""

    def keep(self, stream_idx: torch.Tensor, is_sep: torch.Tensor) -> torch.Tensor | None:
        """Entries to keep, as sorted indices into the cache, or None to keep all.

        ``stream_idx`` [L]: index in the stream of each entry (increasing);
        ``is_sep`` [L]: whether each entry is a separator token.
        """
        return None

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class FullPolicy(StreamPolicy):
    """Full attention: every token stays. Positions grow with the stream."""

    name: ClassVar[str] = "full"


@dataclass
class StreamingLLMPolicy(StreamPolicy):
    """StreamingLLM (Xiao et al., ICLR 2024): ``n_initial`` attention sinks + the ``n_recent`` newest tokens.

    The rule is ``methods.streamingllm.keep_sinks_and_recent``, the one the
    ``streamingllm`` eviction method uses. Parameters:
        n_initial: the first tokens of the stream, kept forever (the paper's 4 sinks; formerly ``init_size``).
        budget: KV entries per layer, ``c`` (formerly ``cache_size``).
        n_recent: recent tokens kept; default ``budget - n_initial`` (the
            whole budget). At most ``budget - n_initial`` (formerly ``window``).
    """

    name: ClassVar[str] = "streamingllm"
    renamed: ClassVar[dict[str, str]] = {"init_size": "n_initial", "cache_size": "budget", "window": "n_recent"}
    n_initial: int = 4
    budget: int = 800
    n_recent: int | None = None

    @property
    def resolved_n_recent(self) -> int:
        """Recent tokens kept: ``n_recent``, or ``budget - n_initial`` when it is None."""
        return self.budget - self.n_initial if self.n_recent is None else self.n_recent

    @property
    def capacity(self) -> int:
        return self.n_initial + self.resolved_n_recent

    def validate(self) -> None:
        _check_sizes(n_initial=self.n_initial, budget=self.budget)
        if self.n_recent is not None:
            _check_sizes(n_recent=self.n_recent)
            if self.n_initial + self.n_recent > self.budget:
                raise InputError(
                    f"n_recent={self.n_recent} is larger than the budget: n_initial + n_recent = "
                    f"{self.n_initial + self.n_recent} > budget={self.budget}"
                )
        if self.resolved_n_recent < 1:
            raise InputError(
                f"StreamingLLM needs a recent window of at least 1 token, got n_initial={self.n_initial}, "
                f"budget={self.budget}, n_recent={self.n_recent}"
            )

    def keep(self, stream_idx: torch.Tensor, is_sep: torch.Tensor) -> torch.Tensor | None:
        keep = keep_sinks_and_recent(stream_idx.numel(), self.n_initial, self.resolved_n_recent, stream_idx.device)
        return _unless_all(keep, stream_idx)


@dataclass
class SepLLMPolicy(StreamPolicy):
    """Budgeted SepLLM cache ("SepCache", Chen et al., ICML 2025), as used for streaming.

    The cache is, in stream order, [initial | separators | past window | local window]:

    * initial (``n_initial`` = a): the first ``a`` tokens of the stream, never evicted;
    * local window (``n_recent`` = w): the ``w`` newest tokens;
    * past window: tokens that left the local window since the last compression,
      all kept until the cache exceeds ``budget``;
    * separators (``n_separators`` = s): separator tokens (``.`` ``,`` ``?`` ``!``
      ``;`` ``:`` newlines, BOS) that left the local window.

    When, after a chunk, the cache holds more than ``budget`` = c entries it
    is compressed: the past window keeps only its separators, which join the
    separator part; if that part then holds more than ``s`` separators, the
    **oldest separators are evicted first**. The cache then holds at most
    ``a + s + w < c`` entries, so it never exceeds ``c`` between chunks.
    Paper's streaming setting: a=4, s=64, w=256, c=800. The rule is
    ``methods.sepllm.sepcache_keep``. Former names: ``init_size``, ``sep_size``,
    ``local_size``, ``cache_size``.
    """

    name: ClassVar[str] = "sepllm"
    needs_separators: ClassVar[bool] = True
    renamed: ClassVar[dict[str, str]] = {
        "init_size": "n_initial",
        "sep_size": "n_separators",
        "local_size": "n_recent",
        "cache_size": "budget",
    }
    n_initial: int = 4
    n_separators: int = 64
    n_recent: int = 256
    budget: int = 800

    @property
    def capacity(self) -> int:
        return self.budget

    def validate(self) -> None:
        _check_sizes(
            n_initial=self.n_initial, n_separators=self.n_separators, n_recent=self.n_recent, budget=self.budget
        )
        if self.n_recent < 1:
            raise InputError(f"n_recent (w) must be at least 1, got {self.n_recent}")
        if self.n_recent >= self.budget:
            raise InputError(f"local window larger than the budget: n_recent={self.n_recent} >= budget={self.budget}")
        total = self.n_initial + self.n_separators + self.n_recent
        if total >= self.budget:
            raise InputError(
                f"SepLLM needs n_initial + n_separators + n_recent < budget (a + s + w < c), got "
                f"{self.n_initial} + {self.n_separators} + {self.n_recent} = {total} >= {self.budget}"
            )

    def keep(self, stream_idx: torch.Tensor, is_sep: torch.Tensor) -> torch.Tensor | None:
        keep = sepcache_keep(stream_idx, is_sep, self.n_initial, self.n_separators, self.n_recent, self.budget)
        return _unless_all(keep, stream_idx)


POLICIES: dict[str, type[StreamPolicy]] = {
    FullPolicy.name: FullPolicy,
    StreamingLLMPolicy.name: StreamingLLMPolicy,
    SepLLMPolicy.name: SepLLMPolicy,
}


def canonical_policy_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` of policy ``name`` without the ``None`` ones, old names replaced by current ones.

    A deprecated name gives a ``FutureWarning``; an old and a new name together, or a name
    the policy does not have, raise ``InputError``.
    """
    if name not in POLICIES:
        raise InputError(f"unknown streaming method {name!r}; expected one of: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    given = {k: v for k, v in params.items() if v is not None}
    return rename_params(f"streaming {name}", cls.renamed, [f.name for f in fields(cls)], given, stacklevel=4)


def make_policy(name: str, **params: Any) -> StreamPolicy:
    """A validated policy from its name; ``None`` values mean "not given" (the default)."""
    given = canonical_policy_params(name, params)  # InputError for an unknown policy or parameter
    policy = POLICIES[name](**given)
    policy.validate()
    return policy


# ----------------------------------------------------------------------------- the streamer


class Streamer:
    """Feeds a token stream through ``model`` in chunks with a bounded, position-shifted KV cache.

    ``separator_ids``: token ids that count as separators (SepLLM; see
    ``tokensieve.core.separators.separator_token_ids``). ``allow_long``: let full
    attention run past the model's maximum position (to show the breakdown).
    The instance owns its cache; batch size is 1.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        policy: StreamPolicy,
        separator_ids: torch.Tensor | None = None,
        allow_long: bool = False,
    ):
        policy.validate()
        ensure_tokensieve_attention(model)
        self.model = model
        self.policy = policy
        self.allow_long = allow_long
        self.max_positions = max_positions(model)
        self.rope = RopeTables(model)
        self.device = self.rope.device
        self.separator_ids = (
            separator_ids.to(self.device)
            if separator_ids is not None
            else torch.empty(0, dtype=torch.long, device=self.device)
        )
        n_layers = num_layers(model)
        self.keys: list[torch.Tensor | None] = [None] * n_layers  # [1, kv_heads, L, head_dim], pre-RoPE
        self.values: list[torch.Tensor | None] = [None] * n_layers  # [1, kv_heads, L, head_dim]
        self.stream_idx = torch.empty(0, dtype=torch.long, device=self.device)  # [L]
        self.is_sep = torch.empty(0, dtype=torch.bool, device=self.device)  # [L]
        self.tokens_seen = 0
        self.stopped: str | None = None  # why feeding stopped early (the model's maximum position), if it did
        self.max_position_used = -1  # largest position id given to the model so far
        self._chunk_start_len = 0

    @property
    def cache_len(self) -> int:
        return int(self.stream_idx.numel())

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def layer_lengths(self) -> list[int]:
        return [0 if k is None else int(k.shape[-2]) for k in self.keys]

    def check_room(self, chunk_len: int) -> None:
        """Raise ``ContextFullError`` if feeding ``chunk_len`` tokens would pass the model's maximum position."""
        if self.max_positions is None or self.allow_long:
            return
        if self.cache_len + chunk_len > self.max_positions:
            raise ContextFullError(
                f"{self.policy.name} attention reached the model's maximum of {self.max_positions} positions after "
                f"{self.tokens_seen} tokens (cache {self.cache_len} + chunk {chunk_len}); a bounded cache "
                f"(--method sepllm or streamingllm) streams on, or pass --allow-long to run past the maximum "
                f"and see the breakdown"
            )

    @torch.inference_mode()
    def feed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one chunk of token ids [C] or [1, C]; return its logits [C, vocab] (float32)."""
        ids = token_ids.reshape(1, -1).to(self.device)
        c = ids.shape[1]
        if c == 0:
            raise InputError("feed() got an empty chunk")
        self.check_room(c)
        start = self.cache_len
        self._chunk_start_len = start
        pos = torch.arange(start, start + c, device=self.device)[None]  # [1, C]
        out = self.model(input_ids=ids, position_ids=pos, use_cache=False, **{HOOK_KWARG: self._hook})
        self.max_position_used = max(self.max_position_used, start + c - 1)
        new_idx = torch.arange(self.tokens_seen, self.tokens_seen + c, device=self.device)
        self.stream_idx = torch.cat((self.stream_idx, new_idx))
        self.is_sep = torch.cat((self.is_sep, torch.isin(ids[0], self.separator_ids)))
        self.tokens_seen += c
        if any(k is not None and k.shape[-2] != self.cache_len for k in self.keys):
            raise RuntimeError("a layer's cache fell out of step with the stream (did every layer run the hook?)")
        keep = self.policy.keep(self.stream_idx, self.is_sep)
        if keep is not None:
            self._select(keep)
        return out.logits[0].float()

    def _select(self, keep: torch.Tensor) -> None:
        self.stream_idx = self.stream_idx[keep]
        self.is_sep = self.is_sep[keep]
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i] = k.index_select(2, keep)
                self.values[i] = v.index_select(2, keep)

    def _hook(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,  # [1, heads, C, head_dim], RoPE at positions L..L+C-1
        key: torch.Tensor,  # [1, kv_heads, C, head_dim], same positions
        value: torch.Tensor,  # [1, kv_heads, C, head_dim]
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if kwargs.get("softcap") is not None:
            raise InputError("streaming does not support attention logit soft-capping")
        li = module.layer_idx
        L, c = self._chunk_start_len, query.shape[2]
        cos, sin = self.rope.get(L + c, getattr(module, "layer_type", None))
        k_old, v_old = self.keys[li], self.values[li]
        if k_old is not None and k_old.shape[-2] != L:
            raise RuntimeError(f"layer {li} holds {k_old.shape[-2]} entries, expected {L}")
        if L:
            k_all = torch.cat((apply_rope(k_old, cos[:L], sin[:L]), key), dim=2)  # [1, kv_heads, L+C, d]
            v_all = torch.cat((v_old, value), dim=2)
        else:
            k_all, v_all = key, value
        q_pos = torch.arange(L, L + c, device=query.device)[:, None]  # [C, 1]
        k_pos = torch.arange(L + c, device=query.device)[None, :]  # [1, L+C]
        mask = k_pos <= q_pos  # [C, L+C]: all of the cache, causal inside the chunk
        window = kwargs.get("sliding_window")
        if window:
            mask &= q_pos - k_pos < window
        groups = query.shape[1] // key.shape[1]
        out = F.scaled_dot_product_attention(
            query, repeat_kv(k_all, groups), repeat_kv(v_all, groups), attn_mask=mask, scale=kwargs.get("scaling")
        )  # [1, heads, C, d]
        k_new = apply_rope(key, cos[L:], sin[L:], inverse=True)  # back to pre-RoPE
        self.keys[li] = k_new if k_old is None else torch.cat((k_old, k_new), dim=2)
        self.values[li] = value if v_old is None else torch.cat((v_old, value), dim=2)
        return out.transpose(1, 2).contiguous(), None
