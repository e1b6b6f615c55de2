"""A split-KV ("flash-decoding") Triton kernel for the attention of the static decoder's one-token step.

``decode.StaticDecoder._attend`` attends one new token per row over a capacity buffer ``[batch, kv_heads,
capacity, head_dim]`` of which a prefix of slots is in use. Its torch path multiplies the queries by every slot's
key, writes the float32 scores out, masks them, takes the softmax, casts it and multiplies by every slot's value:
several passes over float32 intermediates, and keys/values read over the whole capacity. Here each visible key
and value is read once and nothing beyond the slots in use:

1. ``_split_partials``: one program per (batch * KV head, split of the capacity). The ``group`` query heads that
   share the KV head are the rows of one ``tl.dot`` tile (padded to 16 rows, ``tl.dot``'s minimum). The program
   runs over its split's key blocks below ``limit`` (read on the device: the same compiled launch serves every
   step, as a captured CUDA graph needs), with an online softmax in float32 (base 2), and stores its partial
   result: the running max ``m``, the sum ``l`` and the unnormalised ``acc = sum_k exp2(s_k - m) v_k``. A split
   wholly at or beyond ``limit`` runs no block and stores ``m = -inf, l = 0, acc = 0``.
2. ``_combine``: one program per (batch * KV head, query head of the group) rescales the splits' partials to a
   common max and divides: ``out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s``. A row with nothing
   visible (cannot happen in the decoder: the new token is always visible) gets zeros, not NaN.

The number of splits depends on the capacity only (never on ``limit``), so the grid and the partials' shapes are
fixed for a decoder and its graph. A slot is a candidate when ``slot < limit`` and ``valid[row, slot]`` (False: a
left pad); keys and values of other slots are not loaded, whatever they hold.

The Triton helpers (interpreter or GPU, ``tl.dot``'s operand modes) are ``scoring_kernel``'s; on CPU tensors the
kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` set before torch is imported), which is how the
tests check them without a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

try:  # torch >= 2.6: user Triton kernels that torch.compile traces into its graph (no graph break)
    from torch.library import triton_op, wrap_triton
except ImportError:  # pragma: no cover
    triton_op = wrap_triton = None

from tokensieve.kernels.scoring_kernel import LOG2E, available, dot_mode, interpreting, next_pow2, tl, triton

__all__ = ["available", "decode_attention_triton", "splits_for"]

# GPU launch shape (not measured on a GPU when written): keys per block, warps, pipeline stages. At head_dim 128 in
# bfloat16 a stage holds a 64-key block of keys and of values (32 KiB), well within an H100's shared memory.
GPU_BLOCK_N, GPU_WARPS, GPU_STAGES = 64, 4, 3
# Splits: at least SPLIT_MIN keys each (a shorter split costs more in partials written and combined than it
# spreads), at most MAX_SPLITS per (batch, KV head): 8 KV heads x 64 splits = 512 programs at batch 1, a few
# per SM of an H100 (132), each reading its keys and values once.
SPLIT_MIN, MAX_SPLITS = 256, 64


def _split_partials(
    Q,
    K,
    V,
    VALID,
    LIMIT,
    M,
    L,
    ACC,
    scale2,
    group,
    hkv,
    cap,
    split_len,
    sqb,
    sqh,
    sqg,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sab,
    san,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # batch * kv_heads + KV head
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    bi = pid_bh // hkv
    kh = pid_bh % hkv
    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < group
    dim_ok = dims < D
    q = tl.load(
        Q + bi.to(tl.int64) * sqb + kh.to(tl.int64) * sqh + rows[:, None] * sqg + dims[None, :] * sqd,
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + bi.to(tl.int64) * skb + kh.to(tl.int64) * skh
    v_base = V + bi.to(tl.int64) * svb + kh.to(tl.int64) * svh
    valid_row = VALID + bi.to(tl.int64) * sab
    limit = tl.minimum(tl.load(LIMIT).to(tl.int32), cap)  # on the device: one launch for every step
    start = split * split_len
    end = tl.minimum(start + split_len, limit)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):  # no iteration when the split starts at or beyond limit
        cols = n0 + tl.arange(0, BLOCK_N)
        ok = cols < end
        ok = ok & (tl.load(valid_row + cols.to(tl.int64) * san, mask=ok, other=0) != 0)  # pads are never read
        k = tl.load(
            k_base + cols[None, :].to(tl.int64) * skn + dims[:, None] * skd,
            mask=ok[None, :] & dim_ok[:, None],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        v = tl.load(
            v_base + cols[:, None].to(tl.int64) * svn + dims[None, :] * svd,
            mask=ok[:, None] & dim_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # (float32 whatever the scale's type: under torch.compile a Python float arrives as float64)
        s = (tl.dot(q, k, input_precision=PRECISION) * scale2).to(tl.float32)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: exp2(-inf) = 0, no NaN
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    part = pid_bh.to(tl.int64) * n_splits + split  # partials [batch * kv_heads, splits, group(, D)]
    tl.store(M + part * group + rows, m_i, mask=row_ok)
    tl.store(L + part * group + rows, l_i, mask=row_ok)
    tl.store(ACC + (part * group + rows[:, None]) * D + dims[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])


def _combine(
    M,
    L,
    ACC,
    OUT,
    group,
    n_splits,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # (batch * kv_heads + KV head) * group + query head of the group
    bh = pid // group
    r = pid % group
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    s_ok = splits < n_splits
    at = (bh.to(tl.int64) * n_splits + splits) * group + r
    m = tl.load(M + at, mask=s_ok, other=float("-inf"))
    l = tl.load(L + at, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty splits weigh 0
    total = tl.sum(w * l, axis=0)
    acc = tl.load(ACC + at[:, None] * D + dims[None, :], mask=s_ok[:, None] & (dims[None, :] < D), other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(total == 0.0, 1.0, total)  # nothing visible: zeros
    tl.store(OUT + pid.to(tl.int64) * D + dims, out.to(OUT.dtype.element_ty), mask=dims < D)


if triton is not None:
    _SPLIT_PARTIALS = triton.jit(_split_partials)
    _COMBINE = triton.jit(_combine)


def _launch(kernel: Any) -> Any:
    """``kernel`` as ``torch.compile`` can trace it (``wrap_triton``; an ordinary launch outside compile)."""
    return wrap_triton(kernel) if wrap_triton is not None else kernel


def splits_for(cap: int, block_n: int, split_len: int | None = None) -> tuple[int, int]:
    """(splits, keys per split) for a buffer of ``cap`` slots: a function of the capacity alone, so a decoder's
    launch shape never changes; ``split_len`` (a multiple of ``block_n``) overrides the rule."""
    if split_len is None:
        n = min(MAX_SPLITS, max(1, -(-cap // SPLIT_MIN)))
        split_len = -(-(-(-cap // n)) // block_n) * block_n  # noqa: B002  ceil(cap / n), up to whole blocks
    elif split_len < block_n or split_len % block_n:
        raise ValueError(f"split_len must be a positive multiple of block_n ({block_n}), got {split_len}")
    return max(1, -(-cap // split_len)), split_len


def decode_attention_triton(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    limit: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    *,
    block_n: int | None = None,
    split_len: int | None = None,
) -> torch.Tensor:
    """Softmax attention of ``q`` over the slots ``slot < limit`` with ``valid``: [batch, kv_heads, group, head_dim].

    q: [batch, kv_heads, group, head_dim] (the query heads sharing each KV head, any strides); keys, values:
    [batch, kv_heads, capacity, head_dim] of q's dtype (float16, bfloat16 or float32); limit: int64 [1] on the
    device, the number of leading slots that are candidates (read by the kernel, never by the host); valid:
    bool [batch, capacity] (False: a pad slot, never attended). Logits are ``scaling * q.k``, accumulated in
    float32; the result is in q's dtype. ``block_n`` (keys per block, a power of two >= 16) and ``split_len``
    (keys per split) default to 16 and ``splits_for``'s rule under the interpreter, ``GPU_BLOCK_N`` on a GPU.
    Nothing here reads the device or depends on ``limit``'s value, so the call can be captured in a CUDA graph.
    """
    if not available():
        raise RuntimeError("the decode attention kernel needs Triton (pip install triton)")
    if (
        q.dtype not in (torch.float16, torch.bfloat16, torch.float32)
        or keys.dtype != q.dtype
        or values.dtype != q.dtype
    ):
        raise TypeError(
            f"the Triton decode kernel takes float16, bfloat16 or float32 q, keys and values of one dtype, "
            f"got {q.dtype}, {keys.dtype} and {values.dtype}"
        )
    if (
        q.dim() != 4
        or keys.dim() != 4
        or keys.shape != values.shape
        or q.shape[:2] != keys.shape[:2]
        or q.shape[3] != keys.shape[3]
    ):
        raise ValueError(
            f"q must be [batch, kv_heads, group, head_dim] and keys/values [batch, kv_heads, capacity, "
            f"head_dim] alike, got {list(q.shape)}, {list(keys.shape)} and {list(values.shape)}"
        )
    b, hkv, group, d = q.shape
    cap = keys.shape[2]
    if valid.dtype != torch.bool or tuple(valid.shape) != (b, cap):
        raise ValueError(f"valid must be bool [batch, capacity] = {[b, cap]}, got {valid.dtype} {list(valid.shape)}")
    if limit.numel() != 1 or limit.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"limit must be one int32/int64 element, got {limit.dtype} {list(limit.shape)}")
    if len({q.device, keys.device, values.device, limit.device, valid.device}) != 1:
        raise ValueError(
            f"q, keys, values, limit and valid must be on one device, got {q.device}, {keys.device}, "
            f"{values.device}, {limit.device} and {valid.device}"
        )
    interpret = interpreting(q.device, "decode attention")
    bn = block_n or (16 if interpret else GPU_BLOCK_N)
    if bn < 16 or bn & (bn - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {bn}")
    _, split = splits_for(cap, bn, split_len)
    return _attention_op(q, keys, values, limit, valid, float(scaling), bn, split, interpret)


def _attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    limit: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    block_n: int,
    split_len: int,
    interpret: bool,
) -> torch.Tensor:
    """The two launches (arguments checked by ``decode_attention_triton``); registered as a torch op below."""
    b, hkv, group, d = q.shape
    cap = keys.shape[2]
    n_splits = -(-cap // split_len)
    out = torch.empty(b, hkv, group, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    upcast, precision = dot_mode(q.dtype, interpret)
    block_d = max(16, next_pow2(d))
    m = torch.empty(b * hkv, n_splits, group, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(b * hkv, n_splits, group, d, dtype=torch.float32, device=q.device)
    gpu = {} if interpret else dict(num_warps=GPU_WARPS, num_stages=GPU_STAGES)
    flags = valid  # bool, loaded as Triton's i1 (a dtype view here would not lower under torch.compile)
    _launch(_SPLIT_PARTIALS)[(b * hkv, n_splits)](
        q,
        keys,
        values,
        flags,
        limit,
        m,
        l,
        acc,
        scaling * LOG2E,
        group,
        hkv,
        cap,
        split_len,
        *q.stride(),
        *keys.stride(),
        *values.stride(),
        *flags.stride(),
        D=d,
        BLOCK_G=max(16, next_pow2(group)),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        PRECISION=precision,
        UPCAST=upcast,
        **gpu,
    )
    _launch(_COMBINE)[(b * hkv * group,)](
        m,
        l,
        acc,
        out,
        group,
        n_splits,
        D=d,
        BLOCK_S=next_pow2(n_splits),
        BLOCK_D=block_d,
        **({} if interpret else dict(num_warps=GPU_WARPS)),
    )
    return out


# One op for eager calls and for torch.compile (StaticDecoder(compile=True) fuses the rest of the step around it).
_attention_op = (
    triton_op("tokensieve::decode_attention", mutates_args=())(_attention)
    if triton_op is not None and triton is not None
    else _attention
)
