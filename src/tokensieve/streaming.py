"""Streaming language modelling with a bounded KV cache and position shifting.

A text far longer than the model's context is fed in chunks; after each chunk
an eviction *policy* decides which KV entries stay. Three policies:

* :class:`SepLLMPolicy`: the budgeted SepLLM cache ("SepCache"; Chen et al.,
  "SepLLM: Accelerate Large Language Models by Compressing One Segment into One
  Separator", ICML 2025): ``a`` initial tokens, up to ``s`` separator tokens,
  a local window of the ``w`` newest tokens, and a total capacity ``c``.
* :class:`StreamingLLMPolicy`: attention sinks + recent window (Xiao et al.,
  "Efficient Streaming Language Models with Attention Sinks", ICLR 2024).
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
   model's own ``rotary_emb`` (cos/sin tables),
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
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from tokensieve.attention import HOOK_KWARG, repeat_kv
from tokensieve.methods.base import max_positions, num_layers
from tokensieve.methods.sepllm import sepcache_keep
from tokensieve.methods.streamingllm import keep_sinks_and_recent


class ContextFullError(ValueError):
    """Full attention reached the model's maximum position (pass ``allow_long=True`` to run past it)."""


def _check_sizes(**sizes: int) -> None:
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")


# ----------------------------------------------------------------------------- policies


def _unless_all(keep: torch.Tensor, stream_idx: torch.Tensor) -> torch.Tensor | None:
    """``keep`` (sorted indices), or None when it keeps every entry."""
    return None if keep.numel() == stream_idx.numel() else keep


@dataclass
class StreamPolicy:
    """Decides which cache entries survive after each chunk."""

    name: ClassVar[str] = "base"

    @property
    def capacity(self) -> int | None:
        """Most entries the cache holds between chunks (None: unbounded)."""
        return None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad parameter."""

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
    """StreamingLLM (Xiao et al., ICLR 2024): ``init_size`` attention sinks + the ``window`` newest tokens.

    Parameters:
        init_size: the first tokens of the stream, kept forever (the paper's 4 sinks).
        cache_size: total budget ``c`` of KV entries per layer.
        window: recent tokens kept; default ``cache_size - init_size`` (the
            whole budget). Must be at most ``cache_size - init_size``.
    """

    name: ClassVar[str] = "streamingllm"
    init_size: int = 4
    cache_size: int = 800
    window: int | None = None

    @property
    def recent(self) -> int:
        return self.cache_size - self.init_size if self.window is None else self.window

    @property
    def capacity(self) -> int:
        return self.init_size + self.recent

    def validate(self) -> None:
        _check_sizes(init_size=self.init_size, cache_size=self.cache_size)
        if self.window is not None:
            _check_sizes(window=self.window)
            if self.init_size + self.window > self.cache_size:
                raise ValueError(
                    f"window={self.window} is larger than the budget: init_size + window = "
                    f"{self.init_size + self.window} > cache_size={self.cache_size}"
                )
        if self.recent < 1:
            raise ValueError(
                f"StreamingLLM needs a recent window of at least 1 token, got init_size={self.init_size}, "
                f"cache_size={self.cache_size}, window={self.window}"
            )

    def keep(self, stream_idx: torch.Tensor, is_sep: torch.Tensor) -> torch.Tensor | None:
        return _unless_all(keep_sinks_and_recent(stream_idx.numel(), self.init_size, self.recent, stream_idx.device), stream_idx)


@dataclass
class SepLLMPolicy(StreamPolicy):
    """Budgeted SepLLM cache ("SepCache", Chen et al., ICML 2025), as used for streaming.

    The cache is, in stream order, [initial | separators | past window | local window]:

    * initial (``init_size`` = a): the first ``a`` tokens of the stream, never evicted;
    * local window (``local_size`` = w): the ``w`` newest tokens;
    * past window: tokens that left the local window since the last compression,
      all kept until the cache exceeds ``cache_size``;
    * separators (``sep_size`` = s): separator tokens (``.`` ``,`` ``?`` ``!``
      ``;`` ``:`` newlines, BOS) that left the local window.

    When, after a chunk, the cache holds more than ``cache_size`` = c entries it
    is compressed: the past window keeps only its separators, which join the
    separator part; if that part then holds more than ``s`` separators, the
    **oldest separators are evicted first**. The cache then holds at most
    ``a + s + w < c`` entries, so it never exceeds ``c`` between chunks.
    Paper's streaming setting: a=4, s=64, w=256, c=800.
    """

    name: ClassVar[str] = "sepllm"
    init_size: int = 4
    sep_size: int = 64
    local_size: int = 256
    cache_size: int = 800

    @property
    def capacity(self) -> int:
        return self.cache_size

    def validate(self) -> None:
        _check_sizes(
            init_size=self.init_size, sep_size=self.sep_size, local_size=self.local_size, cache_size=self.cache_size
        )
        if self.local_size < 1:
            raise ValueError(f"local_size (w) must be at least 1, got {self.local_size}")
        if self.local_size >= self.cache_size:
            raise ValueError(
                f"local window larger than the budget: local_size={self.local_size} >= cache_size={self.cache_size}"
            )
        total = self.init_size + self.sep_size + self.local_size
        if total >= self.cache_size:
            raise ValueError(
                f"SepLLM needs init_size + sep_size + local_size < cache_size (a + s + w < c), got "
                f"{self.init_size} + {self.sep_size} + {self.local_size} = {total} >= {self.cache_size}"
            )

    def keep(self, stream_idx: torch.Tensor, is_sep: torch.Tensor) -> torch.Tensor | None:
        keep = sepcache_keep(stream_idx, is_sep, self.init_size, self.sep_size, self.local_size, self.cache_size)
        return _unless_all(keep, stream_idx)


POLICIES: dict[str, type[StreamPolicy]] = {
    FullPolicy.name: FullPolicy,
    StreamingLLMPolicy.name: StreamingLLMPolicy,
    SepLLMPolicy.name: SepLLMPolicy,
}


def make_policy(name: str, **params: Any) -> StreamPolicy:
    """A validated policy from its name; parameters it does not have are ignored only if None."""
    if name not in POLICIES:
        raise ValueError(f"unknown streaming method {name!r}; expected one of: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    allowed = {f.name for f in fields(cls)}
    bad = sorted(k for k, v in params.items() if k not in allowed and v is not None)
    if bad:
        raise ValueError(f"streaming method {name!r} has no parameter(s) {', '.join(bad)}; it has: {', '.join(sorted(allowed)) or 'none'}")
    policy = cls(**{k: v for k, v in params.items() if k in allowed and v is not None})
    policy.validate()
    return policy


# ----------------------------------------------------------------------------- rotary helpers


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate ``x`` [batch, heads, seq, head_dim] by cos/sin [seq, rot_dim] (``inverse`` undoes it).

    Only the first ``rot_dim`` dims rotate (partial rotary); math in float32.
    """
    rd = cos.shape[-1]
    xr, xp = x[..., :rd].float(), x[..., rd:]
    cos, sin = cos.float(), sin.float()
    if inverse:
        norm = cos * cos + sin * sin  # = attention_scaling^2 (1 for plain RoPE)
        cos, sin = cos / norm, -sin / norm
    out = (xr * cos + _rotate_half(xr) * sin).to(x.dtype)
    return out if xp.shape[-1] == 0 else torch.cat((out, xp), dim=-1)


class RopeTables:
    """cos/sin [positions, rot_dim] from the model's own ``rotary_emb``, per layer type, grown on demand."""

    def __init__(self, model: PreTrainedModel):
        base = model.get_decoder() if hasattr(model, "get_decoder") else model
        rotary = getattr(base, "rotary_emb", None) or getattr(getattr(model, "model", None), "rotary_emb", None)
        if rotary is None:
            raise ValueError(
                f"streaming needs a model with a Llama-style rotary embedding (decoder.rotary_emb); "
                f"{type(model).__name__} has none"
            )
        self.rotary = rotary
        self.takes_layer_type = "layer_type" in inspect.signature(rotary.forward).parameters
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.max_positions = max_positions(model)
        self._tables: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, n: int, layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions 0..n-1, each [n, rot_dim]."""
        key = layer_type if self.takes_layer_type else None
        have = self._tables.get(key)
        if have is None or have[0].shape[0] < n:
            size = max(n, 2 * have[0].shape[0] if have is not None else 1024)
            if self.max_positions is not None and n <= self.max_positions:
                # never ask rotary_emb for positions the stream does not use (dynamic RoPE
                # variants rescale once they see positions past the maximum)
                size = min(size, self.max_positions)
            pos = torch.arange(size, device=self.device)[None]  # [1, size]
            dummy = torch.zeros(1, 1, 1, device=self.device, dtype=torch.float32)
            args = (dummy, pos, layer_type) if self.takes_layer_type else (dummy, pos)
            with torch.no_grad():
                cos, sin = self.rotary(*args)
            have = (cos[0].float(), sin[0].float())  # [size, rot_dim]
            self._tables[key] = have
        return have[0][:n], have[1][:n]


# ----------------------------------------------------------------------------- the streamer


class Streamer:
    """Feeds a token stream through ``model`` in chunks with a bounded, position-shifted KV cache.

    ``separator_ids``: token ids that count as separators (SepLLM; see
    ``tokensieve.separators.separator_token_ids``). ``allow_long``: let full
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
        self.model = model
        self.policy = policy
        self.allow_long = allow_long
        self.max_positions = max_positions(model)
        self.rope = RopeTables(model)
        self.device = self.rope.device
        self.separator_ids = (
            separator_ids.to(self.device) if separator_ids is not None else torch.empty(0, dtype=torch.long, device=self.device)
        )
        n_layers = num_layers(model)
        self.keys: list[torch.Tensor | None] = [None] * n_layers  # [1, kv_heads, L, head_dim], pre-RoPE
        self.values: list[torch.Tensor | None] = [None] * n_layers  # [1, kv_heads, L, head_dim]
        self.stream_idx = torch.empty(0, dtype=torch.long, device=self.device)  # [L]
        self.is_sep = torch.empty(0, dtype=torch.bool, device=self.device)  # [L]
        self.tokens_seen = 0
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
            raise ValueError("feed() got an empty chunk")
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
            raise ValueError("streaming does not support attention logit soft-capping")
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


# ----------------------------------------------------------------------------- perplexity over a stream


@dataclass
class StreamPoint:
    tokens_seen: int
    cache_entries: int  # per layer, after the chunk's eviction
    kv_bytes: int
    window_ppl: float  # perplexity of the tokens scored in this window
    running_ppl: float  # perplexity of everything scored so far
    tokens_per_s: float  # over the whole run so far


@dataclass
class StreamResult:
    method: str
    params: dict[str, Any]
    chunk_size: int
    tokens_seen: int
    tokens_scored: int
    perplexity: float | None
    tokens_per_s: float
    seconds: float
    max_cache_entries: int
    mean_cache_entries: float
    max_kv_bytes: int
    max_position_used: int
    model_max_positions: int | None
    stopped: str  # why the stream ended
    points: list[StreamPoint] = field(default_factory=list)
    nll: list[float] = field(default_factory=list, repr=False)  # per scored token (token i+1 given 0..i)

    def to_dict(self, with_nll: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_nll:
            d.pop("nll")
        return d


def _ppl(nll_sum: float, n: int) -> float:
    return math.exp(nll_sum / n) if n else float("nan")


def stream_perplexity(
    model: PreTrainedModel,
    token_ids: torch.Tensor,
    policy: StreamPolicy,
    separator_ids: torch.Tensor | None = None,
    chunk_size: int = 64,
    max_tokens: int | None = None,
    allow_long: bool = False,
    window: int = 1024,
    progress: Callable[[StreamPoint, int], None] | None = None,
) -> StreamResult:
    """Stream ``token_ids`` [N] through ``model`` and score every next token.

    Token ``i+1`` is scored by the logits at token ``i``, i.e. given what the
    cache held then (``N - 1`` scored tokens). Full attention without
    ``allow_long`` stops, with ``stopped`` saying so, at the model's maximum
    position. ``window``: tokens per point of the windowed perplexity curve.
    ``progress(point, n_done)`` is called after every chunk.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    ids = token_ids.reshape(-1)
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to measure perplexity, got {ids.numel()}")
    streamer = Streamer(model, policy, separator_ids, allow_long=allow_long)
    cap = policy.capacity
    limit = streamer.max_positions
    if cap is not None and limit is not None and cap + chunk_size > limit and not allow_long:
        raise ValueError(
            f"cache_size + chunk_size = {cap} + {chunk_size} passes the model's maximum of {limit} positions; "
            f"use a smaller cache or chunk"
        )
    n = ids.numel()
    nll: list[float] = []
    points: list[StreamPoint] = []
    total_nll, win_nll, win_n, cache_sum, chunks = 0.0, 0.0, 0, 0, 0
    max_entries = max_bytes = 0
    prev_last: torch.Tensor | None = None  # logits [vocab] of the previous chunk's last token
    stopped = "end of text" if max_tokens is None or max_tokens >= token_ids.numel() else f"max_tokens={max_tokens}"
    t0 = time.perf_counter()
    pos = 0
    while pos < n:
        chunk = ids[pos : pos + chunk_size]
        try:
            logits = streamer.feed(chunk)  # [C, vocab]
        except ContextFullError as exc:
            stopped = str(exc)
            break
        # scores: previous chunk's last logits -> chunk[0]; logits[j] -> chunk[j+1]; last -> next chunk[0]
        preds = logits[:-1] if prev_last is None else torch.cat((prev_last[None], logits[:-1]))
        targets = chunk[1:] if prev_last is None else chunk
        if targets.numel():
            lp = torch.log_softmax(preds, dim=-1).gather(1, targets.to(preds.device)[:, None])[:, 0]
            vals = (-lp).tolist()
            for v in vals:
                nll.append(v)
                total_nll += v
                win_nll += v
                win_n += 1
        prev_last = logits[-1]
        pos += chunk.numel()
        chunks += 1
        entries, nbytes = streamer.cache_len, streamer.kv_bytes()
        cache_sum += entries
        max_entries, max_bytes = max(max_entries, entries), max(max_bytes, nbytes)
        elapsed = time.perf_counter() - t0
        point = StreamPoint(
            tokens_seen=pos, cache_entries=entries, kv_bytes=nbytes, window_ppl=_ppl(win_nll, win_n),
            running_ppl=_ppl(total_nll, len(nll)), tokens_per_s=pos / elapsed if elapsed > 0 else 0.0,
        )
        if win_n >= window or pos >= n:
            points.append(point)
            win_nll, win_n = 0.0, 0
        if progress is not None:
            progress(point, pos)
    if win_n:  # a partial window left when the stream stopped early
        points.append(StreamPoint(pos, streamer.cache_len, streamer.kv_bytes(), _ppl(win_nll, win_n), _ppl(total_nll, len(nll)), 0.0))
    seconds = time.perf_counter() - t0
    return StreamResult(
        method=policy.name, params=policy.params(), chunk_size=chunk_size, tokens_seen=streamer.tokens_seen,
        tokens_scored=len(nll), perplexity=_ppl(total_nll, len(nll)) if nll else None,
        tokens_per_s=streamer.tokens_seen / seconds if seconds > 0 else 0.0, seconds=seconds,
        max_cache_entries=max_entries, mean_cache_entries=cache_sum / chunks if chunks else 0.0,
        max_kv_bytes=max_bytes, max_position_used=streamer.max_position_used, model_max_positions=limit,
        stopped=stopped, points=points, nll=nll,
    )


def plot_stream(results: list[StreamResult], path: str | Path, title: str = "") -> Path:
    """Windowed perplexity and KV-cache size vs tokens seen, one line per result (PNG)."""
    from tokensieve.evaluation.plots import plt, save_figure

    colors = {"full": "#F0496E", "streamingllm": "#EBB839", "sepllm": "#0CD79F"}
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for r in results:
        xs = [p.tokens_seen for p in r.points]
        c = colors.get(r.method)
        ax1.plot(xs, [p.window_ppl for p in r.points], label=r.method, color=c, lw=1.2)
        ax2.plot(xs, [p.kv_bytes / 2**20 for p in r.points], label=r.method, color=c, lw=1.2)
        if r.model_max_positions and r.method == "full":
            for ax in (ax1, ax2):
                ax.axvline(r.model_max_positions, color="grey", ls=":", lw=1)
    ax1.set_yscale("log")
    ax1.set_ylabel("perplexity (per window)")
    ax1.legend(fontsize=8)
    ax2.set_ylabel("KV cache (MiB)")
    ax2.set_xlabel("tokens seen")
    ax1.set_title(title, fontsize=9)
    return save_figure(fig, path)
