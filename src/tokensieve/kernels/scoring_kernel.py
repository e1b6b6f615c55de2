"""Fused Triton kernels for ``scoring.attention_scores`` (causal, no mask): the attention each key receives.

``scoring.attention_scores`` is the one entry point; it calls ``attention_scores_triton`` here when its
``kernel`` argument picks this path. The torch path there writes every query block's softmax out in
float32 (an ``n x n`` matrix over the whole prompt, block by block); H2O's prefill needs all ``n`` queries, so
that traffic made its prefill 7-8x slower than full attention. Here nothing of size ``n x n`` is stored:

1. ``_row_lse``: one program per (batch, query head, query block) runs over the visible keys with an
   online max / sum and stores each query row's log-sum-exp (base 2), ``[batch, q_heads, q_len]`` float32.
   Skipped when the caller has the rows' log-sum-exp from its attention pass (``row_lse``: H2O's prefill
   takes it from SDPA's flash kernel), which leaves one extra pass over ``QK^T`` instead of two.
2. ``_column_sums``: one program per (batch, KV head, key block) runs over the query heads of its group
   and the query blocks that can see the block (causal: queries at or after the keys), recomputes the
   logits with ``tl.dot`` (float32 accumulation of half inputs), and sums ``exp2(logit - lse)`` over the
   queries, so colsum[k] = sum_{h in group} sum_{q >= k} softmax_h[q, k]. The sums are kept per (row, key)
   in registers and reduced over the rows once, at the end.

Both kernels apply the causal mask only on the blocks that straddle the diagonal; blocks wholly visible run
without it.

The queries are the last ``q_len`` positions of the keys (bottom-right causal alignment), as in
``scoring``. Logits are scaled by ``scaling * log2(e)`` so both kernels use ``exp2``; the stored LSE is in
that base and only ever read back by ``_column_sums``.

On CPU tensors the same kernels run under Triton's interpreter, which is how the tests compare them with
the torch path on a machine without a GPU. Triton decides between compiling and interpreting when it is
imported (``TRITON_INTERPRET=1``; torch imports Triton when it is installed), so one process runs the
kernels on the GPU or on the CPU, not both. Triton is optional: ``available()`` says whether it imported.
"""

from __future__ import annotations

import math
from typing import Any

import torch

LOG2E = 1.4426950408889634

try:  # optional: scoring.attention_scores only comes here when Triton imports
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is not installed
    triton = None
    tl = None


def available() -> bool:
    """Whether Triton imported (it is optional; the torch path covers every case without it)."""
    return triton is not None


# The kernels, undecorated; jitted below when Triton imported.


def _row_lse(
    Q,
    K,
    LSE,
    scale2,
    q_len,
    kv_len,
    offset,
    group,
    hkv,
    sqb,
    sqh,
    sqn,
    sqd,
    skb,
    skh,
    skn,
    skd,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # batch * q_heads + query head
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # the last query blocks (most keys) start first
    hq = hkv * group
    bi = pid_bh // hq
    h = pid_bh % hq
    kh = h // group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    q = tl.load(
        Q + bi.to(tl.int64) * sqb + h.to(tl.int64) * sqh + rows[:, None].to(tl.int64) * sqn + dims[None, :] * sqd,
        mask=row_ok[:, None] & (dims[None, :] < D),
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + bi.to(tl.int64) * skb + kh.to(tl.int64) * skh
    q_pos = rows + offset  # the rows' positions among the keys
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    # keys below n_full are visible to every row of the block (whole key blocks up to the first row's
    # position): no mask there; keys from k_end on are visible to none of its rows
    n_full = ((pid_m * BLOCK_M + offset + 1) // BLOCK_N) * BLOCK_N
    k_end = tl.minimum(kv_len, offset + (pid_m + 1) * BLOCK_M)
    for n0 in range(0, n_full, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + cols[None, :].to(tl.int64) * skn + dims[:, None] * skd, mask=dims[:, None] < D, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION) * scale2
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    for n0 in range(n_full, k_end, BLOCK_N):  # the diagonal: causal mask
        cols = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(
            k_base + cols[None, :].to(tl.int64) * skn + dims[:, None] * skd,
            mask=(cols[None, :] < kv_len) & (dims[:, None] < D),
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION) * scale2
        visible = (cols[None, :] <= q_pos[:, None]) & (cols[None, :] < kv_len)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log2(l_i)
    tl.store(LSE + pid_bh.to(tl.int64) * q_len + rows, lse, mask=row_ok)


def _column_sums(
    Q,
    K,
    LSE,
    OUT,
    scale2,
    q_len,
    kv_len,
    offset,
    group,
    hkv,
    sqb,
    sqh,
    sqn,
    sqd,
    skb,
    skh,
    skn,
    skd,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_bk = tl.program_id(0)  # batch * kv_heads + KV head
    pid_n = tl.program_id(1)  # the first key blocks (most queries) start first
    bi = pid_bk // hkv
    kh = pid_bk % hkv
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < kv_len
    k = tl.load(
        K + bi.to(tl.int64) * skb + kh.to(tl.int64) * skh + cols[None, :].to(tl.int64) * skn + dims[:, None] * skd,
        mask=col_ok[None, :] & (dims[:, None] < D),
        other=0.0,
    )  # [BLOCK_D, BLOCK_N]
    if UPCAST:
        k = k.to(tl.float32)
    # probabilities summed per (row, key) over the query blocks, reduced over the rows once at the end
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # query blocks from m_start on see some key of this block; from m_full on, every key (no mask there)
    m_start = (tl.maximum(pid_n * BLOCK_N - offset, 0) // BLOCK_M) * BLOCK_M
    m_full = ((tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - offset, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    m_mid = tl.minimum(m_full, q_len)
    for j in range(0, group):
        h = kh * group + j
        lse_row = LSE + (bi * hkv * group + h).to(tl.int64) * q_len
        q_base = Q + bi.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        for m0 in range(m_start, m_mid, BLOCK_M):  # the diagonal: causal mask
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < q_len
            q = tl.load(
                q_base + rows[:, None].to(tl.int64) * sqn + dims[None, :] * sqd,
                mask=row_ok[:, None] & (dims[None, :] < D),
                other=0.0,
            )
            if UPCAST:
                q = q.to(tl.float32)
            lse = tl.load(lse_row + rows, mask=row_ok, other=0.0)
            s = tl.dot(q, k, input_precision=PRECISION) * scale2
            visible = (cols[None, :] <= rows[:, None] + offset) & row_ok[:, None] & col_ok[None, :]
            acc += tl.exp2(tl.where(visible, s - lse[:, None], float("-inf")))
        for m0 in range(m_full, q_len, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < q_len
            q = tl.load(
                q_base + rows[:, None].to(tl.int64) * sqn + dims[None, :] * sqd,
                mask=row_ok[:, None] & (dims[None, :] < D),
                other=0.0,
            )
            if UPCAST:
                q = q.to(tl.float32)
            # rows past q_len get lse = inf, so exp2 gives 0; keys past kv_len are not stored
            lse = tl.load(lse_row + rows, mask=row_ok, other=float("inf"))
            s = tl.dot(q, k, input_precision=PRECISION) * scale2
            acc += tl.exp2(s - lse[:, None])
    tl.store(OUT + pid_bk.to(tl.int64) * kv_len + cols, tl.sum(acc, axis=0), mask=col_ok)


# GPU block shapes, timed once per head dim on the first call (Triton's autotuner; a shape that does not fit
# the GPU's shared memory is dropped). Not measured on a GPU when written: the autotuner picks among them.
GPU_CONFIGS = [(64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2)]  # block_m, block_n, warps, stages

if triton is not None:  # jitted once; Triton reads TRITON_INTERPRET when it is imported and here
    _ROW_LSE = triton.jit(_row_lse)
    _COLUMN_SUMS = triton.jit(_column_sums)
    INTERPRETED = type(_ROW_LSE).__name__ == "InterpretedFunction"
    if not INTERPRETED:  # both kernels only store their results, so the autotuner's repeated runs are harmless
        _configs = [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in GPU_CONFIGS
        ]
        _ROW_LSE_TUNED = triton.autotune(_configs, key=["D", "UPCAST", "PRECISION"])(triton.jit(_row_lse))
        _COLUMN_SUMS_TUNED = triton.autotune(_configs, key=["D", "UPCAST", "PRECISION"])(triton.jit(_column_sums))


def next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def interpreting(device: torch.device, what: str) -> bool:
    """Whether a kernel on ``device`` runs under the interpreter (CPU tensors), checked against how Triton was
    imported: a process interprets or compiles, not both. ``what`` names the kernel in the error."""
    interpret = device.type == "cpu"
    if interpret != INTERPRETED:
        raise RuntimeError(
            f"the Triton {what} kernel got {device.type} tensors but Triton was imported "
            f"{'with' if INTERPRETED else 'without'} TRITON_INTERPRET=1 (set it before importing torch to run on the CPU)"
        )
    return interpret


def dot_mode(dtype: torch.dtype, interpret: bool) -> tuple[bool, str]:
    """(upcast, input_precision) for ``tl.dot`` on ``dtype`` tiles.

    Triton's interpreter multiplies bfloat16 tiles wrongly in tl.dot (errors of 1e10 on a 16 x 16 product
    with Triton 3.9), so there the tiles are upcast to float32 first; on the GPU they go to the tensor cores.
    float32 operands get full-precision products (tf32 would round them); half operands ignore the setting.
    """
    upcast = interpret and dtype == torch.bfloat16
    return upcast, "ieee" if dtype == torch.float32 or upcast else "tf32"


def attention_scores_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    row_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scoring.attention_scores`` without a mask, by the two fused kernels: [batch, kv_heads, kv_len] float32.

    query: [batch, q_heads, q_len, head_dim]; key: [batch, kv_heads, kv_len, head_dim], ``q_len <= kv_len``,
    float16, bfloat16 or float32 (float32 logits: full-precision dot products, not TF32), any strides.
    ``block_m`` / ``block_n``: query / key block sizes (powers of two >= 16); by default 16 under the
    interpreter and chosen by Triton's autotuner among ``GPU_CONFIGS`` on a GPU.
    ``row_lse``: each query row's log-sum-exp of its scaled logits (natural log, [batch, q_heads, q_len]) when
    the attention pass already computed it (SDPA's flash kernel does): the first kernel is then skipped.
    Shapes are checked by the caller (``scoring.attention_scores``).
    """
    if query.dtype != key.dtype or query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            f"the Triton scoring kernel takes float16, bfloat16 or float32 query and key of one dtype, "
            f"got {query.dtype} and {key.dtype}"
        )
    if query.device != key.device:
        raise ValueError(f"query and key on different devices: {query.device} and {key.device}")
    b, hq, q_len, d = query.shape
    hkv, kv_len = key.shape[1], key.shape[2]
    group = hq // hkv
    if not available():
        raise RuntimeError("the fused scoring kernel needs Triton (pip install triton)")
    interpret = interpreting(query.device, "scoring")
    tuned = not interpret and block_m is None and block_n is None
    bm = block_m or (16 if interpret else 64)
    bn = block_n or (16 if interpret else 64)
    for name, v in (("block_m", bm), ("block_n", bn)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    block_d = max(16, next_pow2(d))
    upcast, precision = dot_mode(query.dtype, interpret)
    scale2 = float(scaling) * LOG2E
    offset = kv_len - q_len
    out = torch.zeros(b, hkv, kv_len, dtype=torch.float32, device=key.device)
    if q_len == 0 or kv_len == 0 or b == 0:
        return out
    if row_lse is not None and tuple(row_lse.shape) != (b, hq, q_len):
        raise ValueError(f"row_lse must be [batch, q_heads, q_len] = {[b, hq, q_len]}, got {list(row_lse.shape)}")
    strides = (*query.stride(), *key.stride())
    meta: dict[str, Any] = dict(D=d, BLOCK_D=block_d, PRECISION=precision, UPCAST=upcast)
    lse_kernel, column_sums = (_ROW_LSE_TUNED, _COLUMN_SUMS_TUNED) if tuned else (_ROW_LSE, _COLUMN_SUMS)
    if not tuned:
        meta |= dict(BLOCK_M=bm, BLOCK_N=bn) | ({} if interpret else dict(num_warps=4, num_stages=3))
    if not interpret:  # Triton's default (fused multiply-adds), said explicitly: 3.9 warns when it is left implicit
        meta["enable_fp_fusion"] = True

    def grid(rows: int, heads: int, block: str) -> Any:
        return lambda m: (heads, triton.cdiv(rows, m[block]))

    if row_lse is None:
        lse = torch.empty(b, hq, q_len, dtype=torch.float32, device=key.device)
        lse_kernel[grid(q_len, b * hq, "BLOCK_M")](
            query, key, lse, scale2, q_len, kv_len, offset, group, hkv, *strides, **meta
        )
    else:  # the kernels work in base 2
        lse = (row_lse.float() * LOG2E).contiguous()
    column_sums[grid(kv_len, b * hkv, "BLOCK_N")](
        query, key, lse, out, scale2, q_len, kv_len, offset, group, hkv, *strides, **meta
    )
    return out
