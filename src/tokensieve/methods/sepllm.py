"""SepLLM, training-free: initial tokens + separators + a local window.

Chen et al., "SepLLM: Accelerate Large Language Models by Compressing One
Segment into One Separator", ICML 2025 (arXiv:2412.12094).

Separator tokens (``.`` ``,`` ``?`` ``!`` ``;`` ``:`` and newlines, plus BOS)
are taken to summarise the segment before them. In the training-free design
every query ``i`` attends only to

* the first ``n_initial`` tokens,
* every separator token before it,
* its ``n_recent`` preceding tokens and itself (``i - n_recent <= j <= i``),

at the tokens' original positions. The prompt is computed under that mask (in
blocks of ``block_size`` queries, each against only the keys some of its
queries may see, so no ``n x n`` mask is formed); the cache then keeps only the
entries later tokens may still see: the initial tokens, all separators and
the last ``n_recent`` tokens. Each decoded token attends to those and itself;
afterwards the entry that left the window is evicted unless it is initial or
a separator. The cache grows only by separators. The rule is the pure
function ``sepllm_visible`` (which keys a query sees) and ``sepllm_keep``
(which entries a later token may still see).

The budgeted cache of the paper's streaming setting ("SepCache": ``a``
initial tokens, at most ``s`` separators, a local window of ``w``, capacity
``c``, oldest separators evicted first) is the pure function
``sepcache_keep``; ``tokensieve.engine.streaming`` applies it to a position-shifted
cache.

Separator ids come from the model's tokenizer
(``tokensieve.core.separators.separator_token_ids``) when the runner calls
``prepare``; pass ``separator_ids`` to use your own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase

from tokensieve.core.attention import sdpa
from tokensieve.core.cache import EvictionCache
from tokensieve.core.separators import separator_token_ids
from tokensieve.decode.slots import SlotPolicy, SlotState
from tokensieve.errors import InputError, check_int
from tokensieve.methods.base import Capabilities, DecodeState
from tokensieve.methods.eviction import AttnOutput, EvictionMethod, LayerCall


def sepllm_rule(
    i: torch.Tensor, j: torch.Tensor, j_is_separator: torch.Tensor, n_initial: int, n_recent: int
) -> torch.Tensor:
    """SepLLM's attention rule, elementwise (the one copy: inference, cache eviction and training masks call it).

    ``i``: query positions, ``j``: key positions, ``j_is_separator``: whether each key is a separator, all
    broadcastable to one shape (scalars inside a FlexAttention ``mask_mod``). True where the query at ``i``
    may attend to the key at ``j``: ``j <= i`` and the key is one of the first ``n_initial`` tokens, a
    separator, or one of the query's ``n_recent`` preceding tokens (``j >= i - n_recent``).
    """
    return (j <= i) & ((j < n_initial) | j_is_separator | (j >= i - n_recent))


def sepllm_visible(
    query_pos: torch.Tensor, key_pos: torch.Tensor, key_is_separator: torch.Tensor, n_initial: int, n_recent: int
) -> torch.Tensor:
    """SepLLM's training-free rule: bool [q, k], whether the query at ``query_pos[i]`` may attend to the key at ``key_pos[j]``.

    query_pos: [q], key_pos: [k] original positions; key_is_separator: [k] bool (``sepllm_rule`` per pair).
    """
    return sepllm_rule(query_pos[:, None], key_pos[None, :], key_is_separator[None, :], n_initial, n_recent)


def sepllm_keep(
    positions: torch.Tensor, is_separator: torch.Tensor, n_initial: int, n_recent: int, next_position: int
) -> torch.Tensor:
    """Bool [n]: the cache entries (original ``positions`` [n], ``is_separator`` [n]) that a token at
    ``next_position`` or later may still see under ``sepllm_visible``: initial tokens, separators,
    and the last ``n_recent`` positions before ``next_position``.
    """
    query = torch.tensor([next_position], device=positions.device)
    return sepllm_visible(query, positions, is_separator, n_initial, n_recent)[0]


def sepcache_keep(
    stream_pos: torch.Tensor, is_separator: torch.Tensor, n_initial: int, n_separators: int, n_recent: int, budget: int
) -> torch.Tensor:
    """SepCache's keep rule (the budgeted SepLLM cache): sorted indices [kept] of the entries that stay.

    stream_pos: [n] increasing stream index of each entry, is_separator: [n] bool. The cache is,
    in stream order, [initial | separators | past window | local window]. While ``n <= budget``
    everything stays (tokens leaving the local window wait in the past window). Over the
    budget it is compressed: the first ``n_initial`` tokens of the stream and the ``n_recent``
    newest entries stay; of the rest only separators, at most ``n_separators`` of them, the
    **oldest evicted first**. Afterwards at most ``n_initial + n_separators + n_recent`` remain.
    """
    n = stream_pos.numel()
    idx = torch.arange(n, device=stream_pos.device)
    if n <= budget:
        return idx
    initial = stream_pos < n_initial
    local = idx >= n - n_recent
    middle_seps = idx[is_separator & ~initial & ~local]  # ascending: oldest first
    kept_seps = middle_seps[max(0, middle_seps.numel() - n_separators) :]
    keep = initial | local
    keep[kept_seps] = True
    return idx[keep]


class SeparatorSlots(SlotState):
    """SepLLM's rule on a static decoder's slots (one row): every slot carries its position and whether its token
    is a separator; after each step the entry that leaves the window is freed for the next step unless it is an
    initial token or a separator, else the next unused slot is taken (the buffer is sized for the whole answer,
    since separators accumulate)."""

    def __init__(self, decoder: Any) -> None:
        super().__init__(decoder)
        cap, dev, n_layers = decoder.capacity, self.size.device, len(decoder.keys)
        self.stamp = [torch.zeros(cap, dtype=torch.long, device=dev) for _ in range(n_layers)]  # positions
        self.is_sep = [torch.zeros(cap, dtype=torch.bool, device=dev) for _ in range(n_layers)]
        self.free = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(n_layers)]  # the next step's slot
        self.used = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(n_layers)]  # slots used
        self.limits = torch.zeros(2, dtype=torch.long, device=dev)  # n_initial, n_recent
        # token id -> is a separator: a fixed-shape table filled in place by load, so that a step captured before
        # (the driver captures a decoder once, then loads each prompt) reads the separators of the prompt loaded
        vocab = decoder.model.config.get_text_config().vocab_size
        self.sep_table = torch.zeros(vocab, dtype=torch.bool, device=dev)

    def load(self, policy: SlotPolicy | None, cache: Cache, lengths: list[int]) -> None:
        super().load(policy, cache, lengths)
        self.limits.copy_(torch.tensor([policy.n_initial, policy.n_recent], dtype=torch.long))
        vocab = self.sep_table.numel()
        self.sep_table.zero_()
        ids = [i for i in policy.separator_ids if 0 <= i < vocab]
        self.sep_table[torch.tensor(ids, dtype=torch.long, device=self.sep_table.device)] = True
        for i, n in enumerate(lengths):
            pos = cache.sync_positions(i)[0, 0]  # [n] original positions (the same in every head)
            self.stamp[i].fill_(-1)
            self.stamp[i][:n].copy_(pos)
            self.is_sep[i].zero_()
            self.is_sep[i][:n].copy_(self.sep_table[cache.token_ids[0, pos]])
            self.free[i].fill_(n)
            self.used[i].fill_(n)

    def begin_step(self) -> None:
        pass  # the visible prefix is each layer's slots used

    def write(self, li: int, key: torch.Tensor, value: torch.Tensor) -> None:
        # the slot the previous step freed, or the next unused one
        dec, slot = self.decoder, self.free[li]
        dec.keys[li].index_copy_(2, slot, key)
        dec.values[li].index_copy_(2, slot, value)
        self.stamp[li].index_copy_(0, slot, dec.position[0])
        self.is_sep[li].index_copy_(0, slot, self.sep_table[dec.token[0]])
        self.used[li].copy_(torch.maximum(self.used[li], slot + 1))

    def visible(self, li: int) -> torch.Tensor:
        return (self.decoder.slot_ids < self.used[li]) & self.decoder.valid  # every slot in use: what the cache holds

    def limit(self, li: int) -> torch.Tensor:
        return self.used[li]

    def after(self, li: int, visible: torch.Tensor | None, received: torch.Tensor | None) -> None:
        """The entry at position ``p - n_recent`` leaves the next token's view unless it is an initial token or a
        separator; its slot is the next step's, else the next unused slot."""
        n_initial, window = self.limits[0:1], self.limits[1:2]
        stamp = self.stamp[li]
        leaving = (stamp == self.decoder.position[0] - window) & (stamp >= n_initial) & ~self.is_sep[li]  # at most one
        self.free[li].copy_(torch.where(leaving.any(), leaving.int().argmax(), self.used[li]))

    def entries(self) -> list[int]:
        return [int(u) - int(f < u) for u, f in zip(self.used, self.free)]  # the slots used, less the one freed


@dataclass(frozen=True)
class SeparatorPolicy(SlotPolicy):
    """SepLLM's slot policy: the first ``n_initial`` tokens, every token in ``separator_ids`` and the ``n_recent``
    tokens before the next one stay; no fixed budget (``budget`` is None: separators accumulate)."""

    n_initial: int
    n_recent: int
    separator_ids: tuple[int, ...]
    budget: ClassVar[None] = None  # unbounded
    state_type: ClassVar[type[SlotState]] = SeparatorSlots

    def __post_init__(self) -> None:
        if not (self.n_initial >= 0 and self.n_recent >= 0):
            raise ValueError(f"bad {self}: needs n_initial >= 0 and n_recent >= 0")


@dataclass
class SepLLM(EvictionMethod):
    """SepLLM training-free (Chen et al., 2025): initial + separator + neighbouring tokens.

    Parameters:
        n_initial: first tokens every query sees (``a``; the paper uses 3 or 4;
            formerly ``initial``).
        n_recent: preceding tokens every query sees besides itself (``w``; the
            paper's configs use 256; formerly ``window``); ``n_recent >= n + new tokens``
            is exactly full attention.
        separator_ids: token ids that count as separators; ``None`` derives them
            from the tokenizer in ``prepare`` (punctuation, newlines, BOS).
        include_space: with derived ids, also count a lone space token.
        block_size: prompt queries whose masked attention is computed at once.
    """

    name: ClassVar[str] = "sepllm"
    capabilities: ClassVar[Capabilities] = Capabilities(static_decode="evict")
    renamed: ClassVar[dict[str, str]] = {"initial": "n_initial", "window": "n_recent"}
    n_initial: int = 4
    n_recent: int = 256
    separator_ids: tuple[int, ...] | None = None
    include_space: bool = False
    block_size: int = 1024

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        if self.separator_ids is None and getattr(self, "_tokenizer", None) is not tokenizer:
            self._derived_ids = separator_token_ids(tokenizer, self.include_space)
            self._tokenizer = tokenizer

    def separators(self, device: torch.device) -> torch.Tensor:
        """Separator ids (int64 [s]) in use."""
        if self.separator_ids is not None:
            return torch.tensor(list(self.separator_ids), dtype=torch.long, device=device)
        ids = getattr(self, "_derived_ids", None)
        if ids is None:
            raise InputError(
                "SepLLM has no separator ids: pass separator_ids=... or call prepare(model, tokenizer) "
                "(tokensieve.generate does this)"
            )
        return ids.to(device)

    def validate(self, model: PreTrainedModel, prompt_len: int) -> None:
        check_int("n_initial", self.n_initial, 0)
        check_int("n_recent", self.n_recent, 0)
        check_int("block_size", self.block_size, 1)
        if self.separator_ids is not None:
            if isinstance(self.separator_ids, (str, bytes)) or not isinstance(self.separator_ids, (list, tuple)):
                raise InputError(f"separator_ids must be a list of token ids, got {self.separator_ids!r}")
            vocab = model.config.get_text_config().vocab_size
            bad = [i for i in self.separator_ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab]
            if bad:
                raise InputError(f"separator_ids must be token ids in [0, {vocab}), got {bad[:5]}")

    def prefill(self, model: PreTrainedModel, input_ids: torch.Tensor) -> DecodeState:
        self._sep = self.separators(input_ids.device)
        return super().prefill(model, input_ids)

    def prefill_cache(self, model: PreTrainedModel, input_ids: torch.Tensor) -> tuple[EvictionCache, dict[str, Any]]:
        """``EvictionMethod.prefill_cache``, with the separator ids in use taken first (as ``prefill`` does)."""
        self._sep = self.separators(input_ids.device)
        return super().prefill_cache(model, input_ids)

    def _is_separator(self, cache: EvictionCache, positions: torch.Tensor) -> torch.Tensor:
        """Whether the tokens at ``positions`` are separators."""
        return torch.isin(cache.token_ids[0, positions], self._sep)

    def attend(self, call: LayerCall) -> AttnOutput:
        """The prompt under SepLLM's mask, block by block; decoding steps attend to what the cache kept."""
        query, key, value, cache = call.query, call.key, call.value, call.cache
        n = key.shape[2]
        if not call.prefill or n - 1 <= self.n_recent:  # every query sees every entry it may: plain attention
            return call.sdpa()
        pos = torch.arange(n, device=key.device)
        is_sep = self._is_separator(cache, pos)  # [n]
        special_idx = (is_sep | (pos < self.n_initial)).nonzero().squeeze(-1)  # seen by every later query
        outs = []
        for q0 in range(0, n, self.block_size):
            q1 = min(n, q0 + self.block_size)
            lo = max(0, q0 - self.n_recent)
            # Keys any query of the block may see: special ones before `lo`, all of [lo, q1).
            idx = torch.cat([special_idx[special_idx < lo], pos[lo:q1]])  # [m], ascending
            mask = sepllm_visible(pos[q0:q1], idx, is_sep[idx], self.n_initial, self.n_recent)[
                None, None
            ]  # [1, 1, c, m]
            if call.attention_mask is not None and call.attention_mask.dtype == torch.bool:
                mask = mask & call.attention_mask[:, :, q0:q1][..., idx]
            out, _ = sdpa(call.module, query[:, :, q0:q1], key[:, :, idx], value[:, :, idx], mask, **call.kwargs)
            outs.append(out)  # [b, c, q_heads, head_dim]
        return torch.cat(outs, dim=1), None

    def slot_policy(self) -> SeparatorPolicy:
        # the entry that leaves the window each step goes unless it is an initial token or a separator
        return SeparatorPolicy(self.n_initial, self.n_recent, tuple(int(i) for i in self._sep.tolist()))

    def evict(self, call: LayerCall) -> None:
        """Keep what later tokens may still see: initial tokens, separators, the recent window."""
        cache, li = call.cache, call.layer_idx
        pos = cache.positions[li][0, 0]  # [entries] original positions, the same for every head
        keep = sepllm_keep(
            pos, self._is_separator(cache, pos), self.n_initial, self.n_recent, next_position=cache.seen_tokens(li)
        )
        if not bool(keep.all()):
            cache.keep(li, keep.nonzero().squeeze(-1))
