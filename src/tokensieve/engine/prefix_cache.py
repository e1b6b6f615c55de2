"""Prefix cache: compute a shared prompt prefix (a system prompt, a document) once, answer many questions on it.

``PrefixStore`` keeps computed prefixes (token ids -> per-layer tensors), bounded in bytes with
least-recently-used eviction, and finds the longest run of leading tokens a new prompt shares with any
stored prefix (a stored prefix is usable up to the first token where the two differ: the KV of
positions ``0..m-1`` depends on tokens ``0..m-1`` only).

``PrefixReuse(inner, store, store_tokens=L)`` is a ``Method`` that wraps a method whose
``capabilities.prefix_reuse`` is set (full attention, SnapKV, GemFilter). Its ``prefill`` hands the inner
method's ``prefix_prefill`` a ``CachedPrefix``: the longest cached prefix (the first ``L`` tokens' state
computed and stored for later requests when missing), on top of which the method computes the rest of
the prompt, returning the ``DecodeState`` its own ``prefill`` would (same cache type, same logits up to
float rounding, same kept indices), so the runner, the static decoding path and every entry point use it
unchanged. This module never looks inside a method: ``prefix_refusal``, ``prefix_layers``,
``prefix_tail`` and ``prefix_prefill`` (``methods.base.Method``) say what it needs.

What is cached (``PrefixState``):

* full attention and SnapKV: the keys and values of every layer. SnapKV's prefill attends with full
  attention and evicts after each layer's attention, so its pre-eviction KV is exactly full
  attention's; the cached prefix seeds an ``EvictionCache`` and the rest of the prompt runs through
  SnapKV's own hook, which scores with the last ``window_size`` queries and evicts as usual. Those
  queries must be computed in this pass, so at most ``n - window_size`` cached tokens are used.
* GemFilter: keys and values of layers ``0..r-1`` and the keys of layer ``r``. The new tokens run
  through the filter layers against them, layer ``r`` scores [cached keys + new keys] with the new
  tokens' queries (the last ``window_size`` queries, or the last one for ``"paper"``), top-k is taken
  over the whole prompt, and the second pass runs from scratch on the kept ids (it cannot reuse a
  prefix: the kept tokens get new positions). A full-attention entry (every layer) serves GemFilter too.
* GemFilter with a draft model (``filter_model``): the same, computed by the draft, so its entries carry
  the draft as their ``source`` and serve only requests whose filter pass runs on that draft (never the
  model's own entries, and the other way round).

Models with sliding-window layers (Gemma 3) are refused: their caches keep only a window, so a
prefix's state cannot be cut at another length. GemFilter's layer-by-layer ``chunk_size`` filter pass
is refused too (the prefix path runs the dense filter pass).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from tokensieve.core.attention import HOOK_KWARG, ensure_tokensieve_attention
from tokensieve.errors import InputError, check_int, check_number
from tokensieve.methods import METHODS, capable
from tokensieve.methods.base import DecodeState, Method, cache_kwarg, has_sliding_layers

GIB = 1 << 30


def supported() -> list[str]:
    """The registered methods a prefix cache can serve (``capabilities.prefix_reuse``): those that reuse the
    prefix's KV entries as they are first, then those that select prompt tokens from it."""
    return sorted(capable(prefix_reuse=True), key=lambda n: METHODS[n].capabilities.selects_prompt)


def __getattr__(name: str) -> Any:
    if name == "SUPPORTED":  # the old constant: supported() as a tuple
        return tuple(supported())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class PrefixState:
    """A computed prefix: ``keys[i]``/``values[i]`` are ``[1, kv_heads, tokens, head_dim]`` for layer ``i``.

    ``keys`` may hold one layer more than ``values`` (GemFilter's layer ``r``, whose values it never reads).
    """

    ids: torch.Tensor  # [tokens] int64, on the CPU
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    salt: str | None = None  # the tenant that computed it: only requests with the same salt see it
    source: str | None = None  # the draft model that computed it (GemFilter's filter_model); None: the store's model

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values) + self.ids.numel() * 8


@dataclass
class StoreStats:
    hits: int = 0  # prefills that reused at least one cached token
    misses: int = 0  # prefills that reused none
    reused_tokens: int = 0  # cached tokens reused, summed over prefills
    stored: int = 0  # prefixes stored
    evicted: int = 0  # prefixes dropped to stay within max_bytes
    too_large: int = 0  # prefixes not stored because alone they pass max_bytes


class PrefixStore:
    """Computed prefixes of one model, least recently used dropped first past ``max_bytes``.

    Every entry carries the ``salt`` of the request that computed it (None: unsalted), and a lookup sees
    only the entries of its own salt, so tenants with different salts neither reuse nor learn of each
    other's prefixes (they share only the byte budget). Bytes are those of the stored tensors (keys, values, token ids) on their device; a prefix bigger
    than ``max_bytes`` on its own is not stored. One store serves one model (its first user; another
    model is refused). Not thread-safe: one worker uses it.
    """

    def __init__(self, max_bytes: int) -> None:
        check_int("max_bytes", max_bytes, 0)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, PrefixState] = OrderedDict()
        self._next = 0
        self._owner: Any = None
        self.nbytes = 0
        self.stats = StoreStats()

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[PrefixState]:
        """Stored prefixes, least recently used first."""
        return list(self._entries.values())

    def bind(self, model: PreTrainedModel) -> None:
        """Tie the store to ``model`` on first use; ``InputError`` for another model later."""
        import weakref

        if self._owner is None or self._owner() is None:
            self._owner = weakref.ref(model)
        elif self._owner() is not model:
            raise InputError("this prefix store holds another model's prefixes; use one PrefixStore per model")

    def match(
        self, ids: torch.Tensor, key_layers: int, value_layers: int, salt: str | None = None, source: str | None = None
    ) -> tuple[int, PrefixState | None]:
        """The stored prefix of ``salt`` and ``source`` (the model that computed it) sharing the most leading
        tokens with ``ids`` [n] that has at least ``key_layers``/``value_layers`` layers: (shared tokens, entry),
        or (0, None). Marks it used."""
        ids = ids.reshape(-1).cpu()
        best, best_key = 0, None
        for key, e in self._entries.items():
            if e.salt != salt or e.source != source or len(e.keys) < key_layers or len(e.values) < value_layers:
                continue
            m = min(e.tokens, ids.numel())
            diff = (e.ids[:m] != ids[:m]).nonzero()
            shared = int(diff[0, 0]) if diff.numel() else m
            if shared > best:
                best, best_key = shared, key
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        return best, self._entries[best_key]

    def put(self, state: PrefixState) -> bool:
        """Store ``state`` (dropping least recently used prefixes to fit); False when it alone is too big.

        A stored prefix of the same salt that ``state`` extends (same ids, no more layers) is replaced by it.
        """
        size = state.nbytes
        if size > self.max_bytes:
            self.stats.too_large += 1
            return False
        for key, e in list(self._entries.items()):
            covered = (
                e.salt == state.salt
                and e.source == state.source
                and e.tokens <= state.tokens
                and len(e.keys) <= len(state.keys)
                and len(e.values) <= len(state.values)
            )
            if covered and torch.equal(e.ids, state.ids[: e.tokens]):
                self._drop(key)
        while self.nbytes + size > self.max_bytes and self._entries:
            self._drop(next(iter(self._entries)))
            self.stats.evicted += 1
        self._entries[self._next] = state
        self._next += 1
        self.nbytes += size
        self.stats.stored += 1
        return True

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def mark(self) -> int:
        """A point in time: ``drop_since(mark)`` drops every prefix stored after it."""
        return self._next

    def drop_since(self, mark: int) -> int:
        """Drop the prefixes stored since ``mark`` (those of a request that failed); returns how many."""
        keys = [key for key in self._entries if key >= mark]
        for key in keys:
            self._drop(key)
        return len(keys)


GIB_NAME = "the prefix cache size (GiB)"  # how a size in GiB is named in errors


def store_for_gib(gib: float) -> PrefixStore | None:
    """A store of ``gib`` GiB, or None for 0 (disabled)."""
    check_number(GIB_NAME, gib, 0, note=" (0 disables it)")
    return PrefixStore(int(gib * GIB)) if gib > 0 else None


def check_model(model: PreTrainedModel) -> None:
    """``InputError`` for models whose cache cannot be cut at a prefix (sliding-window layers); a model not on
    tokensieve attention is switched to it (``ensure_tokensieve_attention``)."""
    ensure_tokensieve_attention(model)
    if has_sliding_layers(model):
        raise InputError(
            f"the prefix cache needs a model whose layers all use full attention; "
            f"{model.config.get_text_config().model_type!r} has sliding-window layers"
        )


class _Stop(Exception):
    """Raised at layer r's attention once what the filter pass needs from it is taken."""

    def __init__(self, value: Any) -> None:
        super().__init__("stopped at the filter layer")
        self.value = value


def _seeded(cache: DynamicCache, keys: list[torch.Tensor], values: list[torch.Tensor], tokens: int) -> DynamicCache:
    """``cache`` holding the first ``tokens`` entries of the given layers (slices: never written in place)."""
    for i, (k, v) in enumerate(zip(keys, values)):
        cache.update(k[:, :, :tokens], v[:, :, :tokens], i)
    return cache


def refusal(method: Method) -> str | None:
    """Why ``method`` cannot run with a prefix cache, or None when it can: its ``capabilities.prefix_reuse``,
    then its own ``prefix_refusal()`` (its parameters). The one rule for the API, the CLI and the server."""
    if not method.capabilities.prefix_reuse:
        return f"the prefix cache supports methods {', '.join(supported())}; got {method.name!r}"
    return method.prefix_refusal()


def refusal_on(model: PreTrainedModel, method: Method) -> str | None:
    """Why a prefix cache cannot serve ``method`` on ``model``: :func:`refusal`, then the model's own rule
    (:func:`check_model`); None when it can."""
    why = refusal(method)
    if why is None:
        try:
            check_model(model)
        except InputError as exc:
            why = str(exc)
    return why


class CachedPrefix:
    """The prefix cache's side of one prefill, handed to the method's ``prefix_prefill``.

    ``take(tail)`` finds the prompt's longest stored prefix (computing and storing its first ``store_tokens``
    tokens when the store holds fewer), counts a hit or a miss and returns ``start``: the leading tokens whose
    state is reused, leaving at least ``tail`` tokens to compute. Then ``seed`` fills a cache with those
    tokens' keys and values, ``keys`` gives one layer's, and ``finish`` adds ``prefix_cached_tokens`` and
    ``prefix_stored_tokens`` to the state's details.
    """

    def __init__(self, reuse: PrefixReuse, model: PreTrainedModel, input_ids: torch.Tensor) -> None:
        self._reuse, self._model, self._ids = reuse, model, input_ids
        self._state: PrefixState | None = None
        self._have = self._reused = self.start = self._cached = 0

    def take(self, tail: int) -> int:
        n = self._ids.shape[1]
        self._state, self._have, self._reused = self._reuse._prefix(self._model, self._ids)
        self.start = max(0, min(self._have, n - tail))
        self._cached = self._reuse._count(self.start, self._reused)
        return self.start

    def seed(self, cache: DynamicCache, layers: int | None = None) -> DynamicCache:
        """``cache`` holding the first ``start`` tokens of layers ``0..layers-1`` (default: every layer with values)."""
        if self._state is not None and self.start:
            n = len(self._state.values) if layers is None else layers
            _seeded(cache, self._state.keys[:n], self._state.values[:n], self.start)
        return cache

    def keys(self, layer: int) -> torch.Tensor | None:
        """Layer ``layer``'s keys [1, kv_heads, start, head_dim] of the reused tokens (None when none are)."""
        if self._state is None or not self.start:
            return None
        return self._state.keys[layer][:, :, : self.start]

    def finish(self, state: DecodeState) -> DecodeState:
        state.details.update(
            prefix_cached_tokens=self._cached, prefix_stored_tokens=self._reuse._stored(self._have, self._reused)
        )
        return state


class PrefixReuse(Method):
    """``inner`` (full, snapkv or gemfilter) with its prompt prefix taken from ``store``.

    ``store_tokens``: how many leading prompt tokens to store for later requests (e.g. the system
    prompt and document, not the question); ``None`` or 0 stores nothing (reuse only). Answers equal the
    inner method's up to float rounding (same greedy tokens); ``details`` gain ``prefix_cached_tokens``
    (prompt tokens whose state came from the store, computed by an earlier request) and
    ``prefix_stored_tokens`` (tokens this request computed and stored). ``salt``: the tenant's key
    (``PrefixStore``): only prefixes stored with the same salt are reused, and what it stores is seen by
    that salt only.
    """

    def __init__(
        self, inner: Method, store: PrefixStore, store_tokens: int | None = None, salt: str | None = None
    ) -> None:
        why = refusal(inner)
        if why is not None:
            raise InputError(why)
        if store_tokens is not None:
            check_int("store_tokens", store_tokens, 0, note=" or None")
        self.inner = inner
        self.store = store
        self.store_tokens = store_tokens or 0
        if salt is not None and not isinstance(salt, str):
            raise InputError(f"salt must be a string or None, got {salt!r}")
        self.salt = salt
        self.name = inner.name  # the runner's static path and results see the inner method
        self.capabilities = dataclasses.replace(inner.capabilities, batch=False)  # one prompt at a time

    name: ClassVar[str] = "prefix"  # type: ignore[misc]  # replaced per instance by the inner method's name

    def params(self) -> dict[str, Any]:
        return self.inner.params()

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.inner.prepare(model, tokenizer)

    def validate(self, model: PreTrainedModel, prompt_len: int) -> None:
        check_model(model)
        self.inner.validate(model, prompt_len)
        if self._net(model) is not model:
            check_model(self._net(model))

    def _net(self, model: PreTrainedModel) -> PreTrainedModel:
        """The model whose prefix state is cached: the inner method's ``prefix_net`` (GemFilter's draft) or ``model``."""
        return self.inner.prefix_net(model)

    def _source(self, model: PreTrainedModel) -> str | None:
        """The ``PrefixState.source`` of this method's entries: the draft's name and identity, None for ``model``."""
        net = self._net(model)
        return None if net is model else f"{net.name_or_path or type(net).__name__}@{id(net)}"

    def forward_kwargs(self, state: DecodeState) -> dict[str, Any]:
        return self.inner.forward_kwargs(state)

    def step(self, model: PreTrainedModel, state: DecodeState, token_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.step(model, state, token_ids)

    def warm(self, model: PreTrainedModel, input_ids: torch.Tensor) -> int:
        """Compute and store the first ``store_tokens`` tokens of ``input_ids`` [1, n] ahead of any
        question (nothing when they are cached already); returns the prefix tokens now held."""
        check_model(model)
        self.store.bind(model)
        self.validate(model, int(input_ids.shape[1]))
        _, have, _ = self._prefix(model, input_ids)
        return have

    # -- prefill

    def prefill(self, model: PreTrainedModel, input_ids: torch.Tensor) -> DecodeState:
        if input_ids.shape[0] != 1:
            raise InputError(f"the prefix cache runs one prompt at a time, got batch size {input_ids.shape[0]}")
        check_model(model)
        self.store.bind(model)
        return self.inner.prefix_prefill(model, input_ids, CachedPrefix(self, model, input_ids))

    def _layers(self, model: PreTrainedModel) -> tuple[int, int]:
        """(key layers, value layers) a cached prefix needs for the inner method."""
        return self.inner.prefix_layers(model)

    def _prefix(self, model: PreTrainedModel, ids: torch.Tensor) -> tuple[PrefixState | None, int, int]:
        """The cached prefix, extended to ``store_tokens`` (and stored) when shorter: (state, tokens it
        holds for this prompt, tokens taken from the store)."""
        n = ids.shape[1]
        k_layers, v_layers = self._layers(model)
        source = self._source(model)
        shared, entry = self.store.match(ids[0], k_layers, v_layers, self.salt, source)
        if entry is not None:
            entry = PrefixState(
                entry.ids[:shared],
                [k[:, :, :shared] for k in entry.keys[:k_layers]],
                [v[:, :, :shared] for v in entry.values[:v_layers]],
                self.salt,
                source,
            )
        want = min(self.store_tokens, n)
        if want <= shared:
            return entry, shared, shared
        net = self._net(model)
        state = self._extend(net, ids[:, :want].to(net.device), entry, shared, k_layers, v_layers)
        state.source = source
        self.store.put(state)
        return state, want, shared

    @torch.inference_mode()
    def _extend(
        self,
        model: PreTrainedModel,
        ids: torch.Tensor,
        entry: PrefixState | None,
        have: int,
        k_layers: int,
        v_layers: int,
    ) -> PrefixState:
        """The state of ``ids`` [1, L], computing tokens ``have..L-1`` on top of ``entry``."""
        cache = DynamicCache(config=model.config)
        if entry is not None and have:
            _seeded(cache, entry.keys[:v_layers], entry.values[:v_layers], have)
        new = ids[:, have:]
        pos = torch.arange(have, ids.shape[1], device=ids.device)[None]
        kwargs: dict[str, Any] = {}
        r_keys = None
        if k_layers > v_layers:  # GemFilter: stop at layer r once its keys are computed
            r = v_layers

            def hook(module, query, key, value, attention_mask, **kw):
                if module.layer_idx == r:
                    raise _Stop(key[:, :, -new.shape[1] :])
                return None

            kwargs[HOOK_KWARG] = hook
        try:
            model(
                input_ids=new, position_ids=pos, use_cache=True, logits_to_keep=1, **cache_kwarg(model, cache), **kwargs
            )
        except _Stop as stop:
            r_keys = stop.value
        keys = [cache.layers[i].keys for i in range(v_layers)]
        values = [cache.layers[i].values for i in range(v_layers)]
        if r_keys is not None:
            old = entry.keys[v_layers][:, :, :have] if entry is not None and have else r_keys[:, :, :0]
            keys.append(torch.cat([old, r_keys], dim=2))
        return PrefixState(ids[0].detach().cpu().clone(), keys, values, self.salt)

    def _stored(self, have: int, reused: int) -> int:
        return have if have > reused else 0

    def _count(self, start: int, reused: int) -> int:
        """Count a hit or a miss; returns the prompt tokens whose state came from the store (computed by
        earlier requests; a prefix this request computed and stored is not counted)."""
        st, cached = self.store.stats, min(start, reused)
        if cached > 0:
            st.hits += 1
            st.reused_tokens += cached
        else:
            st.misses += 1
        return cached


def common_prefix(a: torch.Tensor | list[int], b: torch.Tensor | list[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share."""
    x = torch.as_tensor(a).reshape(-1).cpu()
    y = torch.as_tensor(b).reshape(-1).cpu()
    m = min(x.numel(), y.numel())
    diff = (x[:m] != y[:m]).nonzero()
    return int(diff[0, 0]) if diff.numel() else m


def chat_prefix_tokens(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], input_ids: torch.Tensor
) -> int:
    """The reusable prefix of a chat prompt: everything before the last line of the last user message.

    The chat template is applied to the messages with the last user message's final line (its text
    after the last line break; all of it when it has none) removed, and the prefix is the number of
    leading tokens that rendering shares with ``input_ids`` (the real prompt). A document in a system
    message or an earlier turn, or a document followed by a question on its own last line, is thus
    cached, and the question is not.
    """
    from tokensieve.engine.runner import encode_prompt

    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last is None:
        return 0
    content = messages[last].get("content", "")
    cut = content.rstrip("\n").rfind("\n")
    head = content[: cut + 1] if cut >= 0 else ""
    trimmed = [dict(m) for m in messages]
    if head.strip():
        trimmed[last]["content"] = head
    else:
        trimmed = trimmed[:last]
    if not trimmed or not any(m.get("content", "").strip() for m in trimmed):
        return 0
    use_template = getattr(tokenizer, "chat_template", None) is not None
    try:
        ids = encode_prompt(tokenizer, trimmed, use_chat_template=use_template)
    except Exception:  # a template that refuses the trimmed conversation: no prefix
        return 0
    return common_prefix(ids, input_ids)


def text_prefix_tokens(tokenizer: PreTrainedTokenizerBase, text: str, input_ids: torch.Tensor) -> int:
    """The reusable prefix of a raw text prompt: everything before its last line."""
    cut = text.rstrip("\n").rfind("\n")
    if cut <= 0 or not text[:cut].strip():
        return 0
    ids = tokenizer(text[: cut + 1], return_tensors="pt")["input_ids"]
    return common_prefix(ids, input_ids)
