"""How methods score tokens by attention, and pick tokens from those scores: the one copy of each rule.

Every method that ranks prompt tokens by attention goes through this module:
GemFilter (filter layer), SnapKV (observation window), H2O (accumulated
attention), LazyLLM (last token) and ``tokensieve calibrate``.

Shapes, as the attention hook sees them (post-RoPE, before GQA repetition)::

    query: [batch, q_heads, q_len, head_dim]    the last q_len positions of the keys
    key:   [batch, kv_heads, kv_len, head_dim]  q_heads = kv_heads * group

Scores come back **per KV head**, ``[batch, kv_heads, kv_len]``, summed over
the chosen queries and over the ``group`` query heads that share the KV head
(``head_sum`` sums over KV heads too). They are float32, or float64 when the
inputs are float64. Causal alignment is bottom-right: query ``i`` (of
``q_len``) sits at position ``kv_len - q_len + i`` and sees keys
``0 .. kv_len - q_len + i``.

Memory is linear in ``kv_len``: queries are taken ``query_chunk`` at a time,
so at most ``q_heads x query_chunk x kv_len`` logits exist at once, never an
``n x n`` matrix. With ``key_chunk`` the keys are also read ``key_chunk`` at a
time (no copy of all keys in float32, for prompts of a million tokens); the
softmax then takes two passes: the log-sum-exp of every query row over all key
chunks, then the probabilities chunk by chunk.

``attention_scores`` is also the one place that picks between that torch path and the fused Triton
kernels of ``scoring_kernel`` (``kernel="auto"|"torch"|"triton"``): the kernels never write the
probabilities out, which is what made H2O's prefill (all ``n`` queries) 7-8x slower than full attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Logits formed at once when no query chunk is given (2**26 floats = 256 MiB in float32;
# the softmax needs about as much again).
DEFAULT_SCORE_ELEMENTS = 1 << 26

POOLINGS = ("avg", "max")

# How attention_scores computes: "torch" (query chunks, any device and dtype, masks), "triton" (the fused
# kernels of scoring_kernel: no mask), "auto" (triton where it applies and pays, else torch).
SCORE_KERNELS = ("auto", "torch", "triton")
# "auto" takes the fused kernels from this many queries on (H2O's prefill). Fewer queries (SnapKV's window,
# LazyLLM's last token, H2O's decoding steps) make small probability blocks, which the torch path writes cheaply.
KERNEL_MIN_QUERIES = 256


def _score_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (scores are never computed in half precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _half_on_cuda(*tensors: torch.Tensor) -> bool:
    return all(t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) for t in tensors)


def matmul_fp32(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a [..., m, k] @ b_t [..., k, n]`` with a float32 result (float64 for float64 inputs).

    On CUDA, half-precision inputs go to the tensor cores as they are and accumulate into a float32
    result (cuBLAS ``out_dtype``): no float32 copy of either operand, and matmul speed instead of
    float32's (16x slower on an H100). Elsewhere the inputs are upcast first.
    """
    if _half_on_cuda(a, b_t) and a.dtype == b_t.dtype:
        out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b_t.reshape(-1, *b_t.shape[-2:]), out_dtype=torch.float32)
        return out.reshape(*a.shape[:-2], a.shape[-2], b_t.shape[-1])
    dtype = _score_dtype(a, b_t)
    return torch.matmul(a.to(dtype), b_t.to(dtype))


def spans(end: int, chunk: int | None) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``0 .. end`` in pieces of ``chunk`` (one piece without a chunk)."""
    if chunk is None or chunk >= end:
        return [(0, end)]
    return [(s, min(end, s + chunk)) for s in range(0, end, chunk)]


def _check_heads(query: torch.Tensor, key: torch.Tensor) -> int:
    hq, hkv = query.shape[1], key.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    return hq // hkv


def uses_kernel(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, kernel: str) -> bool:
    """Whether ``attention_scores`` takes the fused Triton kernels for these arguments (``kernel`` checked here)."""
    if kernel not in SCORE_KERNELS:
        raise ValueError(f"kernel must be one of {SCORE_KERNELS}, got {kernel!r}")
    if kernel == "torch":
        return False
    if kernel == "triton":
        if attention_mask is not None:
            raise ValueError("kernel='triton' takes no attention_mask (causal only); use kernel='torch' or 'auto'")
        return True
    if attention_mask is not None or query.shape[2] < KERNEL_MIN_QUERIES:
        return False
    if not (_half_on_cuda(query, key) and query.dtype == key.dtype):
        return False
    from tokensieve.kernels import scoring_kernel  # optional Triton: imported only when a GPU call may use it

    return scoring_kernel.available() and not scoring_kernel.INTERPRETED


def attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    *,
    attention_mask: torch.Tensor | None = None,
    query_chunk: int | None = None,
    key_chunk: int | None = None,
    kernel: str = "torch",
    row_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention each key receives, summed over the queries and the query heads of its KV head.

    query: [batch, q_heads, q_len, head_dim]; key: [batch, kv_heads, kv_len, head_dim],
    ``q_len <= kv_len``; the queries are the last ``q_len`` positions (causal, bottom-right).
    ``attention_mask``: optional boolean mask (True = may attend) broadcastable to
    [batch, 1, q_len, kv_len], combined with the causal rule. ``query_chunk``: queries per
    block (default: as many as keep a block under ``DEFAULT_SCORE_ELEMENTS`` logits).
    ``key_chunk``: read the keys this many at a time, two-pass softmax (default: all at once).
    ``kernel``: ``"torch"`` (the chunked path below), ``"triton"`` (``scoring_kernel``'s fused kernels:
    causal only, float16/bfloat16/float32, memory linear in ``kv_len`` whatever the chunks) or ``"auto"``
    (triton for at least ``KERNEL_MIN_QUERIES`` half-precision CUDA queries without a mask, when Triton
    imports; else torch). ``row_lse``: the query rows' log-sum-exp (natural log, [batch, q_heads, q_len])
    from the attention pass, which saves the kernels their first pass (the torch path does not read it).
    Returns [batch, kv_heads, kv_len] (float32, float64 for float64 inputs). A query row
    whose every key is masked gives NaN, as softmax does.
    """
    b, hq, q_len, d = query.shape
    hkv, kv_len = key.shape[1], key.shape[2]
    g = _check_heads(query, key)
    offset = kv_len - q_len
    if offset < 0:
        raise ValueError(f"more queries ({q_len}) than keys ({kv_len})")
    if uses_kernel(query, key, attention_mask, kernel):
        from tokensieve.kernels.scoring_kernel import attention_scores_triton

        return attention_scores_triton(query, key, scaling, row_lse=row_lse)
    dtype = _score_dtype(query, key)
    span = kv_len if key_chunk is None else max(1, min(key_chunk, kv_len))
    if query_chunk is None:
        query_chunk = max(1, DEFAULT_SCORE_ELEMENTS // max(1, hq * span))
    mask = None
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            raise TypeError(f"attention_mask must be boolean (True = may attend), got {attention_mask.dtype}")
        m4 = attention_mask.reshape((1,) * (4 - attention_mask.dim()) + tuple(attention_mask.shape))
        mask = torch.broadcast_to(m4, (m4.shape[0], 1, q_len, kv_len))  # [batch or 1, 1, q_len, kv_len]
    native = _half_on_cuda(query, key)  # half precision on CUDA: matmuls on the tensor cores, float32 results
    keys = key.to(dtype) if key_chunk is None and not native else key  # one float copy, or none / per chunk
    acc = torch.zeros(b, hkv, kv_len, dtype=dtype, device=key.device)
    for q0 in range(0, q_len, query_chunk):
        q1 = min(q_len, q0 + query_chunk)
        c, end = q1 - q0, offset + q1  # keys from `end` on are invisible to every query of this block
        q = query[:, :, q0:q1].reshape(b, hkv, g * c, d)  # row = (head in group, query)
        q = q if native else q.to(dtype)
        q_pos = (torch.arange(q0, q1, device=key.device) + offset).repeat(g)  # [g*c], the row's position
        m = None if mask is None else mask[:, :, q0:q1].repeat(1, 1, g, 1)  # [b or 1, 1, g*c, kv_len]

        def logits(s: int, e: int) -> torch.Tensor:
            """Scaled logits of the block's rows over keys s..e-1, -inf where invisible: [b, hkv, g*c, e-s]."""
            lg = matmul_fp32(q, keys[:, :, s:e].transpose(-1, -2)) * scaling
            visible = torch.arange(s, e, device=key.device)[None, :] <= q_pos[:, None]  # [g*c, e-s]
            if m is not None:
                visible = visible & m[..., s:e]  # [b or 1, 1, g*c, e-s]
            return lg.masked_fill(~visible, float("-inf"))

        pieces = spans(end, None if key_chunk is None else span)
        if len(pieces) == 1:
            acc[..., :end] += logits(0, end).softmax(dim=-1).sum(dim=2)
            continue
        # Two passes: log-sum-exp of each row over all key chunks, then the probabilities.
        lse = torch.stack([logits(s, e).logsumexp(dim=-1) for s, e in pieces]).logsumexp(dim=0)[
            ..., None
        ]  # [b, hkv, g*c, 1]
        for s, e in pieces:
            acc[..., s:e] += (logits(s, e) - lse).exp().sum(dim=2)
    return acc


def paper_scores(query: torch.Tensor, key: torch.Tensor, *, key_chunk: int | None = None) -> torch.Tensor:
    """Raw inner products of the **last** query with every key, ``q_last . k_j``, summed over each KV head's query heads.

    The GemFilter paper's scoring (no scaling, no softmax). query: [batch, q_heads, q_len, head_dim];
    key: [batch, kv_heads, kv_len, head_dim]. Returns [batch, kv_heads, kv_len]. Keys are read
    ``key_chunk`` at a time when given.
    """
    b, hq, _, d = query.shape
    hkv, kv_len = key.shape[1], key.shape[2]
    g = _check_heads(query, key)
    dtype = _score_dtype(query, key)
    # sum_{h in group} q_h . k = (sum_{h in group} q_h) . k: exact, no repetition of the keys.
    q = query[:, :, -1, :].to(dtype).reshape(b, hkv, g, d).sum(dim=2)  # [b, hkv, d]
    parts = [torch.einsum("bhd,bhnd->bhn", q, key[:, :, s:e].to(dtype)) for s, e in spans(kv_len, key_chunk)]
    return torch.cat(parts, dim=-1)


def head_sum(scores: torch.Tensor) -> torch.Tensor:
    """Scores [batch, kv_heads, n] summed over the KV heads: [batch, n]."""
    return scores.sum(dim=1)


def pool_scores(scores: torch.Tensor, kernel: int, pooling: str = "avg") -> torch.Tensor:
    """1-D pooling of ``scores`` [..., n] along the last dim: stride 1, same length, zero padding counted.

    ``kernel`` odd (1 returns the scores unchanged); ``pooling`` is ``"avg"`` or ``"max"``.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    n = scores.shape[-1]
    if kernel <= 1 or n == 0:
        return scores
    x = scores.reshape(-1, 1, n)  # [rows, 1, n]
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
    return pool(x, kernel_size=kernel, stride=1, padding=kernel // 2).reshape(scores.shape)


def sorted_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``min(k, n)`` best ``scores`` [..., n] along the last dim, in ascending (prompt) order."""
    idx = torch.topk(scores, min(k, scores.shape[-1]), dim=-1).indices
    return torch.sort(idx, dim=-1).values


def span_rank(scores: torch.Tensor, kernel: int, pooling: str = "avg", dilation: int = 1) -> torch.Tensor:
    """The span-aware ranking of tokens by ``scores`` [..., n]: indices [..., n], best first.

    The scores are pooled (``pool_scores(scores, kernel, pooling)``), then *dilated*: each token takes the
    best pooled score within ``dilation // 2`` positions of it (a max filter of odd width ``dilation``), so
    the neighbours of a high-scoring token rank as high as it does and a top-k keeps whole spans around
    each peak (the value that follows a matched key, the rest of a number) instead of isolated tokens.
    Ties of the dilated score (the tokens around one peak) are broken by the distance to that peak
    (nearer first), then by the pooled score, then by position (earlier first): a budget that cuts a
    span keeps its middle. ``dilation = 1`` is plain pooled ranking.
    """
    pooled = pool_scores(scores, kernel, pooling)
    n = scores.shape[-1]
    if dilation <= 1 or n == 0:
        return torch.sort(pooled, dim=-1, descending=True, stable=True).indices
    x = pooled.reshape(-1, 1, n)
    dilated, peak = F.max_pool1d(x, dilation, stride=1, padding=dilation // 2, return_indices=True)
    dilated, peak = dilated.reshape(pooled.shape), peak.reshape(pooled.shape)
    distance = (peak - torch.arange(n, device=scores.device)).abs()
    order = torch.sort(pooled, dim=-1, descending=True, stable=True).indices  # least significant key first
    order = order.gather(-1, torch.sort(distance.gather(-1, order), dim=-1, stable=True).indices)
    return order.gather(-1, torch.sort(dilated.gather(-1, order), dim=-1, descending=True, stable=True).indices)


def span_scores(scores: torch.Tensor, kernel: int, pooling: str = "avg", dilation: int = 1) -> torch.Tensor:
    """Scores [..., n] whose top-k is the top-k of :func:`span_rank`: the pooled scores themselves for
    ``dilation = 1``, else each token's rank turned into a score (``n`` for the best, 1 for the last), so
    every top-k helper (``sorted_topk``, ``topk_with_recent``) applies the span rule unchanged."""
    if dilation <= 1:
        return pool_scores(scores, kernel, pooling)
    n = scores.shape[-1]
    order = span_rank(scores, kernel, pooling, dilation)
    dtype = torch.float64 if n > 1 << 24 else torch.float32  # integer ranks stay exact
    ranks = torch.arange(n, 0, -1, device=scores.device, dtype=dtype).expand(order.shape)
    return torch.empty(order.shape, dtype=dtype, device=scores.device).scatter_(-1, order, ranks)


def span_topk(scores: torch.Tensor, k: int, kernel: int, pooling: str = "avg", dilation: int = 1) -> torch.Tensor:
    """Indices of the ``min(k, n)`` best tokens of ``scores`` [..., n] under :func:`span_rank`, in prompt order.

    With ``dilation = 1`` this is ``sorted_topk(pool_scores(scores, kernel, pooling), k)`` (the paper's rule
    for ``kernel = 5, pooling = "avg"``).
    """
    return sorted_topk(span_scores(scores, kernel, pooling, dilation), k)


def topk_with_recent(scores: torch.Tensor, budget: int, n_recent: int) -> torch.Tensor:
    """Entry indices [batch, heads, budget]: the last ``n_recent`` entries (always kept) plus the
    ``budget - n_recent`` best-scoring earlier ones, per head, in ascending order.

    scores: [batch, heads, n] with ``n > budget >= n_recent``; the recent entries' own scores are not read.
    """
    b, h, n = scores.shape
    if not n > budget >= n_recent >= 0:
        raise ValueError(f"need n > budget >= n_recent >= 0, got n={n}, budget={budget}, n_recent={n_recent}")
    top = torch.topk(scores[..., : n - n_recent], budget - n_recent, dim=-1).indices  # [b, h, budget - n_recent]
    recent = torch.arange(n - n_recent, n, device=scores.device).expand(b, h, n_recent)
    return torch.sort(torch.cat([top, recent], dim=-1), dim=-1).values
