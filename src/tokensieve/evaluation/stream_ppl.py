"""Perplexity over a token stream fed through a bounded, position-shifted cache (``tokensieve stream``).

``stream_perplexity`` feeds a text chunk by chunk through a
``tokensieve.engine.streaming.Streamer`` and scores every next token from what the
cache held at that moment; it records a windowed-perplexity curve, cache size,
KV bytes and throughput. ``tokensieve.evaluation.plots.plot_stream`` draws the
curves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokensieve.engine.runner import feed_stream, open_stream
from tokensieve.engine.streaming import StreamPolicy
from tokensieve.errors import InputError


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
    interrupted: bool = False  # stopped by ``should_stop`` (Ctrl-C, SIGTERM): the figures cover the chunks fed

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
    ppl_window: int = 1024,
    progress: Callable[[StreamPoint, int], None] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    should_stop: Callable[[], str | None] | None = None,
) -> StreamResult:
    """Stream ``token_ids`` [N] through ``model`` and score every next token.

    Token ``i+1`` is scored by the logits at token ``i``, i.e. given what the
    cache held then (``N - 1`` scored tokens). Full attention without
    ``allow_long`` stops, with ``stopped`` saying so, at the model's maximum
    position. ``ppl_window``: tokens per point of the windowed perplexity curve.
    ``progress(point, n_done)`` is called after every chunk. The stream is opened and fed by the
    runner (``open_stream``/``feed_stream``); separator ids come from ``tokenizer`` unless given.
    ``should_stop()`` is asked after every chunk: a reason (e.g. ``"interrupted (SIGTERM)"``) ends the stream
    there, and the result covers the chunks fed so far with ``interrupted`` set and ``stopped`` the reason.
    """
    if ppl_window < 1:
        raise InputError(f"ppl_window must be >= 1, got {ppl_window}")
    ids = token_ids.reshape(-1)
    if max_tokens is not None:
        if max_tokens < 2:
            raise InputError(f"max_tokens must be >= 2, got {max_tokens}")
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise InputError(f"need at least 2 tokens to measure perplexity, got {ids.numel()}")
    streamer = open_stream(model, policy, tokenizer, separator_ids, chunk_size, allow_long)
    limit = streamer.max_positions
    n = ids.numel()
    nll: list[float] = []
    points: list[StreamPoint] = []
    total_nll, win_nll, win_n, cache_sum, chunks = 0.0, 0.0, 0, 0, 0
    max_entries = max_bytes = 0
    prev_last: torch.Tensor | None = None  # logits [vocab] of the previous chunk's last token
    stopped = "end of text" if max_tokens is None or max_tokens >= token_ids.numel() else f"max_tokens={max_tokens}"
    t0 = time.perf_counter()
    pos = 0
    for chunk, logits in feed_stream(streamer, ids, chunk_size):  # [C], [C, vocab]
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
            tokens_seen=pos,
            cache_entries=entries,
            kv_bytes=nbytes,
            window_ppl=_ppl(win_nll, win_n),
            running_ppl=_ppl(total_nll, len(nll)),
            tokens_per_s=pos / elapsed if elapsed > 0 else 0.0,
        )
        if win_n >= ppl_window or pos >= n:
            points.append(point)
            win_nll, win_n = 0.0, 0
        if progress is not None:
            progress(point, pos)
        reason = should_stop() if should_stop is not None else None
        if reason and pos < n:
            stopped, interrupted = reason, True
            break
    else:
        interrupted = False
    if streamer.stopped is not None and not interrupted:
        stopped = streamer.stopped
    if win_n:  # a partial window left when the stream stopped early
        points.append(
            StreamPoint(
                pos, streamer.cache_len, streamer.kv_bytes(), _ppl(win_nll, win_n), _ppl(total_nll, len(nll)), 0.0
            )
        )
    seconds = time.perf_counter() - t0
    return StreamResult(
        method=policy.name,
        params=policy.params(),
        chunk_size=chunk_size,
        tokens_seen=streamer.tokens_seen,
        tokens_scored=len(nll),
        perplexity=_ppl(total_nll, len(nll)) if nll else None,
        tokens_per_s=streamer.tokens_seen / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        max_cache_entries=max_entries,
        mean_cache_entries=cache_sum / chunks if chunks else 0.0,
        max_kv_bytes=max_bytes,
        max_position_used=streamer.max_position_used,
        model_max_positions=limit,
        stopped=stopped,
        points=points,
        nll=nll,
        interrupted=interrupted,
    )
