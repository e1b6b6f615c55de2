"""GemFilter: early layers select the prompt tokens the full model runs on.

Shi et al., "Discovering the Gems in Early Layers: Accelerating Long-Context
LLMs with 1000x Input Token Reduction", 2024 (arXiv:2409.17422).

Algorithm (parameters, defaults and measurements in ``docs/gemfilter.md``):

1. Filter pass: run decoder layers ``0 .. r-1`` and layer ``r``'s attention up to
   its post-RoPE queries and keys; stop there (no MLP of layer ``r``, no later
   layer, no KV cache, no logits).
2. Score every prompt token from those queries and keys, sum over heads.
3. Smooth with a 1-D average pool (kernel 5, stride 1, padding 2).
4. Keep the ``min(k, n)`` best tokens, sorted back into prompt order.
5. Run the full model from scratch on the kept ids at fresh positions
   ``0 .. k-1``, then decode normally.

With ``k >= n`` every token would be kept: the filter pass is skipped and the
prefill is plain full attention (``details["filter_skipped"] = True``).

Two scorings:

* ``"paper"``: raw inner products of the **last** query with every key,
  ``q_last . k_j`` summed over heads, exactly as the paper's code.
* ``"window"``: softmax attention (scaled, causal) of the last ``window_size``
  queries, summed over heads and those queries (SnapKV-style observation
  window). On small models it recalls the needle far more reliably; which one
  is the default is decided by measurement (README, "GemFilter scoring").
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from tokensieve.core.attention import HOOK_KWARG, ensure_tokensieve_attention
from tokensieve.core.draft import as_draft, check_draft, filter_layer_of, input_device, load_draft
from tokensieve.core.scoring import attention_scores, head_sum, paper_scores, span_topk
from tokensieve.errors import InputError, check_choice, check_int
from tokensieve.methods.base import (
    Capabilities,
    DecodeState,
    Method,
    cache_kwarg,
    full_prefill,
    has_sliding_layers,
    max_positions,
    num_layers,
)
from tokensieve.methods.eviction import DEFAULT_DILATION, check_span_rule

SCORINGS = ("paper", "window")
FILTER_ATTENTIONS = ("auto", "dense", "local")
# "auto" runs the local pass from this prompt length on, dense below it. Measured on an H100 (Llama-3.1-8B shape,
# w = 2048, benchmarks/results/gpu/gemfilter_local_h100.json): local was slower than dense at 8k (0.44 vs 0.18 s)
# and 32k (0.77 vs 0.63 s) and twice as fast at 128k (2.48 vs 4.84 s).
LOCAL_FROM_TOKENS = 65536
DEFAULT_N_INITIAL = 4  # sink tokens every filter-pass query sees with filter_attention="local"
DEFAULT_N_RECENT = (
    2048  # recent tokens (itself included) every filter-pass query sees with "local" (measured: docs/gemfilter.md)
)
LOCAL_QUERY_CHUNK = 1024  # queries per SDPA call of the local filter attention
DEFAULT_WINDOW_SIZE = 16  # scoring queries of the "window" scoring
DEFAULT_KERNEL = 5  # average-pool kernel (the paper's)

# Filter layers (0-based) for known model shapes: (model_type, layers, hidden) -> r.
# Llama-3.1-8B, Mistral-Nemo-12B and Phi-3.5-mini are the paper's values; the two
# embedded models were chosen by `tokensieve calibrate` (README, "Filter layers").
KNOWN_FILTER_LAYERS: dict[tuple[str, int, int], int] = {
    ("llama", 32, 4096): 13,  # Llama-3.1-8B-Instruct
    ("mistral", 40, 5120): 19,  # Mistral-Nemo-12B-Instruct
    ("phi3", 32, 3072): 19,  # Phi-3.5-mini-instruct
    ("llama", 30, 576): 18,  # SmolLM2-135M(-Instruct)
    ("gemma3_text", 18, 640): 11,  # Gemma-3-270M
    ("qwen2", 28, 1536): 12,  # Qwen2.5(-Coder)-1.5B(-Instruct): calibrate 2k/4k x 3 depths, window recall 0.99 at 12
    (
        "qwen2",
        24,
        896,
    ): 11,  # Qwen2.5(-Coder)-0.5B(-Instruct): calibrate 2k/4k x 5 depths, window scoring recall 1.00 from 11
}


def default_filter_layer(model: PreTrainedModel) -> int:
    """Known filter layer for this model's shape, else ``int(0.45 * L)``.

    The fallback sits where the paper's three models put it (13/32, 19/40,
    19/32 of the depth, i.e. 0.41-0.59); run ``tokensieve calibrate`` to find a
    measured value for a new model.
    """
    cfg = model.config.get_text_config()
    key = (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size)
    return KNOWN_FILTER_LAYERS.get(key, int(0.45 * cfg.num_hidden_layers))


CHUNKED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


class _ChunkDone(Exception):
    """Raised at layer r once a non-final chunk's keys are stored: nothing else of it is needed."""


def causal_chunk_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the last ``q`` positions over ``S >= q`` keys, causal aligned bottom-right.

    query: [1, q_heads, q, d]; key/value: [1, kv_heads, S, d] -> [1, q_heads, q, d]. Uses a
    ``CausalBias`` so fused kernels run without an explicit [q, S] mask on GPU.
    """
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(query.shape[2], key.shape[2])
    try:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True)
    except (RuntimeError, TypeError):  # kernels without GQA support for this bias: repeat the KV heads
        from tokensieve.core.attention import repeat_kv

        g = query.shape[1] // key.shape[1]
        return F.scaled_dot_product_attention(
            query, repeat_kv(key, g), repeat_kv(value, g), attn_mask=mask, scale=scale
        )


def local_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, n_initial: int, n_recent: int) -> torch.Tensor:
    """Boolean mask [q, K] (True = may attend): key position ``j`` is visible to query position ``i``
    iff ``j <= i`` and (``j < n_initial`` or ``j > i - n_recent``): the sinks plus the last ``n_recent``
    tokens, itself included. q_pos: [q], k_pos: [K] absolute positions."""
    causal = k_pos[None, :] <= q_pos[:, None]
    return causal & ((k_pos[None, :] < n_initial) | (k_pos[None, :] > q_pos[:, None] - n_recent))


def _sdpa_masked(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """SDPA with a boolean mask [q, K], GQA handled: query [1, hq, q, d], key/value [1, hkv, K, d] -> [1, hq, q, d].

    On CUDA the KV heads are repeated (a block is small) so that the memory-efficient kernel, which
    takes a mask but not ``enable_gqa``, runs instead of the math fallback.
    """
    if query.device.type == "cuda" and query.shape[1] != key.shape[1]:
        from tokensieve.core.attention import repeat_kv

        g = query.shape[1] // key.shape[1]
        return F.scaled_dot_product_attention(
            query, repeat_kv(key, g), repeat_kv(value, g), attn_mask=mask, scale=scale
        )
    try:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True)
    except (RuntimeError, TypeError):  # kernels without GQA support for a mask: repeat the KV heads
        from tokensieve.core.attention import repeat_kv

        g = query.shape[1] // key.shape[1]
        return F.scaled_dot_product_attention(
            query, repeat_kv(key, g), repeat_kv(value, g), attn_mask=mask, scale=scale
        )


LOCAL_KERNELS = ("auto", "sdpa", "flex")
_FLEX: dict[str, Any] = {}


def _flex_fn() -> Any:
    """``flex_attention`` compiled once per process (its Triton kernel is what makes it fast on CUDA), with
    dynamic sequence lengths so that a new prompt length does not compile again."""
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=True)
    return _FLEX["fn"]


def flex_local_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    n_initial: int,
    n_recent: int,
    compiled: bool = True,
) -> torch.Tensor:
    """:func:`local_attention` over contiguous positions with FlexAttention: one call, a block mask that
    skips every block outside the sinks and the band, so only ~``n * (n_initial + n_recent)`` scores are
    computed (no chunk loop, no dense masks). query [1, hq, q, d] (the last ``q`` of ``K`` positions),
    key/value [1, hkv, K, d] -> [1, hq, q, d]. ``compiled=False`` runs flex's eager reference (CPU tests).
    """
    from torch.nn.attention.flex_attention import flex_attention

    from tokensieve.kernels.flex import block_mask

    nq, nk = query.shape[2], key.shape[2]
    offset = nk - nq

    def visible(b, h, q_idx, kv_idx):  # the rule of local_mask, on absolute positions
        qa = q_idx + offset
        return (kv_idx <= qa) & ((kv_idx < n_initial) | (kv_idx > qa - n_recent))

    key_ = (nq, nk, n_initial, n_recent, str(query.device))
    cached_key, block = _FLEX.get("mask", (None, None))
    if cached_key != key_:  # one mask serves every layer of a pass (same shapes); built by a compiled kernel on CUDA
        block = block_mask(visible, None, None, nq, nk, device=query.device, compiled=compiled)
        _FLEX["mask"] = (key_, block)
    gqa = query.shape[1] != key.shape[1]
    if compiled:
        return _flex_fn()(query, key, value, block_mask=block, scale=scale, enable_gqa=gqa)
    with warnings.catch_warnings():  # "flex_attention called without torch.compile": intended (CPU reference)
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(query, key, value, block_mask=block, scale=scale, enable_gqa=gqa)


def local_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    n_initial: int,
    n_recent: int,
    query_chunk: int = LOCAL_QUERY_CHUNK,
    key_positions: torch.Tensor | None = None,
    kernel: str = "sdpa",
) -> torch.Tensor:
    """Causal attention restricted to the first ``n_initial`` and the last ``n_recent`` tokens (itself included).

    query: [1, q_heads, q, d]; key/value: [1, kv_heads, K, d] at the ascending absolute positions
    ``key_positions`` [K] (CPU, default ``0 .. K-1``); the queries are the last ``q`` of them.
    Returns [1, q_heads, q, d]. Queries are taken ``query_chunk`` at a time; a chunk of positions
    ``[s, e)`` reads only the sinks and keys at ``s - n_recent + 1 .. e - 1``, so time and memory
    are linear in ``q`` (``O(q * (n_initial + n_recent + query_chunk))``), never a ``q x K`` mask.
    ``kernel``: ``"sdpa"`` (those chunks) or ``"flex"`` (:func:`flex_local_attention`, contiguous
    positions only; compiled on CUDA, flex's eager reference elsewhere).
    """
    if kernel == "flex" and key_positions is None:
        return flex_local_attention(query, key, value, scale, n_initial, n_recent, compiled=query.device.type == "cuda")
    nq, K, dev = query.shape[2], key.shape[2], query.device
    kp = torch.arange(K) if key_positions is None else key_positions.cpu()  # [K]
    outs = []
    for a in range(0, nq, query_chunk):
        b = min(nq, a + query_chunk)
        i1 = K - nq + b  # keys up to the chunk's last query
        s, e = int(kp[K - nq + a]), int(kp[i1 - 1]) + 1  # absolute positions of the chunk's queries
        lo = max(min(n_initial, s), s - n_recent + 1)  # first non-sink position any query of the chunk sees
        ns = int(torch.searchsorted(kp, min(n_initial, lo)))  # sinks held below lo
        i0 = int(torch.searchsorted(kp, lo))
        k = torch.cat([key[:, :, :ns], key[:, :, i0:i1]], dim=2) if ns else key[:, :, i0:i1]
        v = torch.cat([value[:, :, :ns], value[:, :, i0:i1]], dim=2) if ns else value[:, :, i0:i1]
        k_pos = torch.cat([kp[:ns], kp[i0:i1]]).to(dev)
        mask = local_mask(torch.arange(s, e, device=dev), k_pos, n_initial, n_recent)  # [b-a, ns + i1-i0]
        outs.append(_sdpa_masked(query[:, :, a:b], k, v, mask, scale))
    return torch.cat(outs, dim=2)


def _rolling_keep(k_pos: torch.Tensor, end: int, n_initial: int, n_recent: int) -> torch.Tensor:
    """Which of the cached positions ``k_pos`` [K] a later query (position >= ``end``) can still see:
    the sinks and the last ``n_recent - 1`` positions before ``end``. Bool [K]."""
    return (k_pos < n_initial) | (k_pos >= end - (n_recent - 1))


def is_sliding_layer(module: torch.nn.Module) -> bool:
    """True for attention layers the model itself restricts to a sliding window (Gemma 3's local layers)."""
    return bool(getattr(module, "sliding_window", None))


class _FilterDone(Exception):
    """Raised inside layer r's attention to stop the filter pass early."""

    def __init__(self, scores: torch.Tensor):
        super().__init__("filter pass finished")
        self.scores = scores


def token_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    scoring: str = "window",
    window_size: int = DEFAULT_WINDOW_SIZE,
    key_chunk: int | None = None,
) -> torch.Tensor:
    """GemFilter's importance of each prompt token, summed over all heads: float [batch, n].

    query: [batch, q_heads, nq, head_dim] (the last nq positions), key: [batch, kv_heads, n, head_dim]
    (post-RoPE, before GQA repetition). ``"paper"``: ``q_last . k`` (``scoring.paper_scores``);
    ``"window"``: softmax attention of the last ``window_size`` queries
    (``scoring.attention_scores``). ``key_chunk`` reads the keys that many at a time
    (two-pass softmax), for prompts whose keys do not fit in float32 at once.
    """
    if scoring == "paper":
        return head_sum(paper_scores(query, key, key_chunk=key_chunk))
    if scoring == "window":
        return head_sum(attention_scores(query[:, :, -window_size:], key, scaling, key_chunk=key_chunk))
    raise InputError(f"unknown GemFilter scoring {scoring!r}; expected one of {SCORINGS}")


def pool_and_select(
    scores: torch.Tensor, k: int, kernel: int = DEFAULT_KERNEL, pooling: str = "avg", dilation: int = 1
) -> torch.Tensor:
    """GemFilter's selection: pool ``scores`` [n] (stride 1, same length), dilate by ``dilation``
    (``scoring.span_rank``), keep the sorted top-``min(k, n)``. The defaults are the paper's rule."""
    return span_topk(scores, k, kernel, pooling, dilation)


@dataclass
class GemFilter(Method):
    """GemFilter (Shi et al., 2024): select the top-k prompt tokens with an early layer.

    Parameters:
        topk: tokens kept (the paper's default 1024); ``k >= n`` keeps the whole prompt.
        filter_layer: 0-based layer ``r`` whose attention scores the tokens; ``None``
            takes the known value for the model (``default_filter_layer``).
        scoring: ``"window"`` (softmax of the last ``window_size`` queries) or ``"paper"``
            (raw ``q_last . k``).
        window_size: scoring queries for ``"window"`` (formerly ``window``).
        kernel: pooling kernel over the scores (odd; 1 disables smoothing).
        pooling: ``"avg"`` (the paper's) or ``"max"``.
        dilation: span width (odd; 1 = the paper's isolated top-k): after pooling each token ranks
            with the best score within ``dilation // 2`` positions, so every selected peak keeps its
            neighbours and an answer's whole span survives (``scoring.span_rank``).
        chunk_size: when set and the prompt is longer, the filter pass runs layer by layer
            over chunks of this many tokens, so only one layer's keys/values and the hidden
            states are resident (for prompts whose full KV would not fit, e.g. 1M tokens).
            Same scores as the one-shot pass up to float rounding. Llama-style models
            without sliding-window layers only. With ``filter_attention="local"`` the chunked
            pass instead streams each chunk through layers ``0..r`` (see ``_local_chunked_scores``):
            only layer ``r``'s keys grow with ``n``.
        filter_attention: ``"dense"`` (default; the paper: causal attention over the whole prefix in layers
            ``0..r-1``), ``"local"``, or ``"auto"`` (``"local"`` for prompts of ``LOCAL_FROM_TOKENS`` = 64k tokens or
            more on models without sliding-window layers, ``"dense"`` otherwise). Local is 2.5-6.7x faster from 8k
            to 128k on an H100 but measured less accurate on both embedded models (docs/gemfilter.md), so it is
            asked for, not defaulted to. ``"local"``: in layers ``0..r-1`` each token attends only to
            the first ``n_initial`` tokens and the last ``n_recent`` (itself included), so the
            filter pass costs time linear in ``n``. The scoring queries at layer ``r`` still
            read all ``n`` keys. Sliding-window layers keep their own window.
        n_initial: sink tokens seen by every query of the local filter pass.
        n_recent: recent-window width ``w`` of the local filter pass (``w >= n`` is dense;
            default 2048, so prompts up to 2048 tokens get exactly the paper's pass).
        local_kernel: how the one-shot local pass computes its attention: ``"sdpa"`` (query chunks
            with a mask), ``"flex"`` (one FlexAttention call over a block-sparse mask, compiled on
            CUDA) or ``"auto"`` (flex on CUDA, sdpa elsewhere). Same result up to float rounding.
        filter_model: a draft model of the same tokenizer that runs the filter pass. A name or path
            (loaded on the model's device), a model, a ``(model, tokenizer)`` pair or a ``DraftModel``
            (``tokensieve.core.draft``); None (default) is the model itself (SpecPrefill, Liu et al.,
            ICML 2025). Its tokenizer must be the model's (checked). ``filter_layer`` then means the
            draft's layer (default: the draft's known layer; its last layer is allowed); every other
            parameter applies to the draft's pass as it would to the model's; the second pass is the model's.
    """

    name: ClassVar[str] = "gemfilter"
    capabilities: ClassVar[Capabilities] = Capabilities(
        batch=True, static_decode="grow", prefix_reuse=True, selects_prompt=True, prompt_only=True
    )
    renamed: ClassVar[dict[str, str]] = {"window": "window_size"}
    topk: int = 1024
    filter_layer: int | None = None
    scoring: str = "window"
    window_size: int = DEFAULT_WINDOW_SIZE
    kernel: int = DEFAULT_KERNEL
    pooling: str = "avg"
    dilation: int = DEFAULT_DILATION
    chunk_size: int | None = None
    filter_attention: str = "dense"  # why not "local" or "auto" by default: docs/gemfilter.md (local filter pass)
    n_initial: int = DEFAULT_N_INITIAL
    n_recent: int = DEFAULT_N_RECENT
    local_kernel: str = "auto"
    filter_model: Any = None

    def __post_init__(self) -> None:
        self.filter_model = as_draft(self.filter_model)

    def params(self) -> dict[str, Any]:
        """The parameters, ``filter_model`` as its name (results stay JSON and never copy a model)."""
        out = super().params()
        if out["filter_model"] is not None:
            out["filter_model"] = str(out["filter_model"])
        return out

    def filter_net(self, model: PreTrainedModel) -> PreTrainedModel:
        """The model the filter pass runs on: the draft (``filter_model``; a name is loaded on first use) or
        ``model`` itself. A draft not yet checked against ``model`` is checked by its config here; ``prepare``
        checks the tokenizers themselves."""
        if self.filter_model is None:
            return model
        if isinstance(self.filter_model, str):
            self.filter_model = load_draft(self.filter_model, model)
        check_draft(self.filter_model, model)
        return self.filter_model.model

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Load a draft given by name (on ``model``'s device, in its dtype) and check its tokenizer against ``tokenizer``."""
        if self.filter_model is None:
            return
        if isinstance(self.filter_model, str):
            self.filter_model = load_draft(self.filter_model, model)
        check_draft(self.filter_model, model, tokenizer)

    def resolved_layer(self, model: PreTrainedModel) -> int:
        """The filter layer ``r`` of the filter pass for ``model`` (the draft's layer when there is a draft):
        ``filter_layer``, else the layer a filter-only model was loaded for, else the known value for its shape."""
        if self.filter_layer is not None:
            return self.filter_layer
        net = self.filter_net(model)
        loaded_for = filter_layer_of(net)
        return default_filter_layer(net) if loaded_for is None else loaded_for

    def validate(self, model: PreTrainedModel, prompt_len: int) -> None:
        check_int("topk", self.topk, 1)
        net = self.filter_net(model)
        n_layers = num_layers(net)
        r = self.resolved_layer(model)
        if not isinstance(r, int) or not 0 <= r < n_layers:
            # Still a plain ValueError: tests/bench/test_bench.py pins "error: ValueError" in bench status rows.
            whose = "the filter model" if net is not model else "this model"
            raise InputError(f"filter_layer must be in [0, {n_layers - 1}] for {whose}, got {r!r}")
        if net is not model:  # the draft must cover the positions the model does (past them: allow_long's choice)
            limit, own = max_positions(net), max_positions(model)
            n = prompt_len if own is None else min(prompt_len, own)
            if limit is not None and n > limit and self.topk < prompt_len:
                raise InputError(f"the prompt has {prompt_len} tokens, more than the filter model's {limit} positions")
        check_choice("scoring", self.scoring, SCORINGS)
        check_int("window_size", self.window_size, 1)
        check_span_rule(self.kernel, self.pooling, self.dilation)
        check_choice("filter_attention", self.filter_attention, FILTER_ATTENTIONS)
        check_choice("local_kernel", self.local_kernel, LOCAL_KERNELS)
        check_int("n_initial", self.n_initial, 0)
        check_int("n_recent", self.n_recent, 1)
        if self.chunk_size is not None:
            if self.chunk_size < self.window_size:
                raise InputError(f"chunk_size must be >= window_size ({self.window_size}), got {self.chunk_size}")
            cfg = net.config.get_text_config()
            if cfg.model_type not in CHUNKED_MODEL_TYPES or any(
                t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])
            ):
                raise InputError(
                    f"chunk_size needs a model with only full-attention layers of type {CHUNKED_MODEL_TYPES}, "
                    f"got {cfg.model_type!r}"
                )

    def uses_local(self, n: int, model: PreTrainedModel | None = None) -> bool:
        """Whether the filter pass over an ``n``-token prompt is the local one. ``"auto"`` takes it from
        ``LOCAL_FROM_TOKENS`` tokens on, and only on models whose layers all attend globally: on Gemma 3, whose
        filter layers are mostly sliding-window ones already, restricting its few global layers too lost
        0.21-0.23 of needle recall at 8k-16k (docs/gemfilter.md)."""
        if self.filter_attention != "auto":
            return self.filter_attention == "local"
        return n >= LOCAL_FROM_TOKENS and (model is None or not has_sliding_layers(model))

    @torch.inference_mode()
    def scores(self, model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
        """Filter pass: per-token scores [n] from layer ``r`` (before pooling), on the filter model's device.
        It runs on ``filter_net(model)`` (the draft, if any). A model not on tokensieve attention is switched
        first (``attention.ensure_tokensieve_attention``)."""
        r = self.resolved_layer(model)
        model = self.filter_net(model)
        ensure_tokensieve_attention(model)
        if input_ids.shape[0] != 1:
            raise InputError(f"GemFilter runs one prompt at a time, got batch size {input_ids.shape[0]}")
        input_ids = input_ids.to(input_device(model))
        local = self.uses_local(input_ids.shape[1], model)
        if self.chunk_size is not None and input_ids.shape[1] > self.chunk_size:
            if local:
                return self._local_chunked_scores(model, input_ids, r)
            return self._chunked_scores(model, input_ids, r)

        def hook(module, query, key, value, attention_mask, **kwargs):
            if module.layer_idx == r:
                raise _FilterDone(token_scores(query, key, module.scaling, self.scoring, self.window_size))
            if local:
                return self.local_layer_attention(module, query, key, value), None
            return None

        try:
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1, **{HOOK_KWARG: hook})
        except _FilterDone as done:
            return done.scores[0]
        raise RuntimeError(f"filter layer {r} never ran its attention: is the model using tokensieve attention?")

    def local_layer_attention(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """The local filter pass's attention of one whole layer: [1, n, q_heads, d] (the hook's layout).

        Full-attention layers see the sinks plus the last ``n_recent`` tokens; a sliding-window
        layer keeps its own window (``kv > q - sliding_window``, no sinks), also computed in
        query chunks so that no ``n x n`` mask is built.
        """
        kernel = self.local_kernel
        if kernel == "auto":
            kernel = "flex" if query.device.type == "cuda" else "sdpa"
        if is_sliding_layer(module):
            out = local_attention(query, key, value, module.scaling, 0, int(module.sliding_window), kernel=kernel)
        else:
            out = local_attention(query, key, value, module.scaling, self.n_initial, self.n_recent, kernel=kernel)
        return out.transpose(1, 2).contiguous()

    def _chunk_bounds(self, n: int) -> list[tuple[int, int]]:
        """(start, end) of the chunks of an ``n``-token prompt; the last chunk holds all scoring queries."""
        starts = list(range(0, n, self.chunk_size))
        if len(starts) > 1 and n - starts[-1] < self.window_size:
            starts.pop()
        return list(zip(starts, starts[1:] + [n]))

    def _chunked_scores(self, model: PreTrainedModel, input_ids: torch.Tensor, r: int) -> torch.Tensor:
        """Filter pass layer by layer over chunks: resident are the hidden states [1, n, D] and one
        layer's keys/values [1, kv_heads, n, head_dim], never the KV of all filter layers."""
        from tokensieve.core.rope import accurate_rope

        base = model.model
        n, dev = input_ids.shape[1], input_ids.device
        bounds = self._chunk_bounds(n)
        hidden = base.embed_tokens(input_ids)  # [1, n, D]
        for li in range(r + 1):
            layer = base.layers[li]
            keys = values = None  # [1, kv_heads, n, head_dim], filled chunk by chunk
            for s, e in bounds:
                pos = torch.arange(s, e, device=dev)[None]
                rope = accurate_rope(base.rotary_emb, pos[0], hidden.dtype)  # float64 angles: exact past 1M

                def hook(module, query, key, value, attention_mask, s=s, e=e, **kwargs):
                    nonlocal keys, values
                    if keys is None:
                        keys = key.new_empty(key.shape[0], key.shape[1], n, key.shape[3])
                        values = value.new_empty(keys.shape) if li < r else None  # layer r only scores keys
                    keys[:, :, s:e] = key
                    if li == r:
                        if e < n:
                            raise _ChunkDone()
                        raise _FilterDone(
                            token_scores(
                                query, keys, module.scaling, self.scoring, self.window_size, key_chunk=self.chunk_size
                            )
                        )
                    values[:, :, s:e] = value
                    out = causal_chunk_attention(query, keys[:, :, :e], values[:, :, :e], module.scaling)
                    return out.transpose(1, 2).contiguous(), None  # [1, chunk, q_heads, head_dim]

                try:
                    out = layer(
                        hidden[:, s:e],
                        attention_mask=None,
                        position_ids=pos,
                        position_embeddings=rope,
                        use_cache=False,
                        **cache_kwarg(layer, None),
                        **{HOOK_KWARG: hook},
                    )
                except _ChunkDone:
                    continue
                except _FilterDone as done:
                    return done.scores[0]
                hidden[:, s:e] = out[0] if isinstance(out, tuple) else out
            del keys, values
        raise RuntimeError("chunked filter pass ended without scoring")

    def _local_chunked_scores(self, model: PreTrainedModel, input_ids: torch.Tensor, r: int) -> torch.Tensor:
        """Local filter pass streamed chunk by chunk through layers ``0..r`` (all layers per chunk).

        Per layer ``< r`` only the sinks and the last ``n_recent - 1`` keys/values are kept
        ([1, kv_heads, <= n_initial + n_recent - 1 + chunk, head_dim]); layer ``r`` stores its keys
        for all ``n`` tokens ([1, kv_heads, n, head_dim], what the scoring reads). The prompt's
        hidden states are never held at once: resident memory is O(n) for layer ``r``'s keys plus
        O(r * (n_initial + n_recent + chunk)) for the rest. RoPE is computed in float64 from the
        positions (``rope.accurate_rope``), so positions past a million keep their angles.
        """
        from tokensieve.core.rope import accurate_rope

        base = model.model
        n, dev = input_ids.shape[1], input_ids.device
        bounds = self._chunk_bounds(n)
        cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [
            None
        ] * r  # (CPU k_pos [K], keys, values)
        keys_r: torch.Tensor | None = None  # [1, kv_heads, n, head_dim]
        for s, e in bounds:
            hidden = base.embed_tokens(input_ids[:, s:e])  # [1, e-s, D]
            pos, pos_cpu = torch.arange(s, e, device=dev), torch.arange(s, e)
            rope = accurate_rope(base.rotary_emb, pos, hidden.dtype)
            for li in range(r + 1):

                def hook(module, query, key, value, attention_mask, s=s, e=e, li=li, **kwargs):
                    nonlocal keys_r
                    if li == r:
                        if keys_r is None:
                            keys_r = key.new_empty(key.shape[0], key.shape[1], n, key.shape[3])
                        keys_r[:, :, s:e] = key
                        if e < n:
                            raise _ChunkDone()
                        raise _FilterDone(
                            token_scores(
                                query, keys_r, module.scaling, self.scoring, self.window_size, key_chunk=self.chunk_size
                            )
                        )
                    held = cache[li]
                    if held is None:
                        k_pos, k_all, v_all = pos_cpu, key, value
                    else:
                        k_pos = torch.cat([held[0], pos_cpu])  # [K], CPU
                        k_all, v_all = torch.cat([held[1], key], dim=2), torch.cat([held[2], value], dim=2)
                    out = local_attention(
                        query, k_all, v_all, module.scaling, self.n_initial, self.n_recent, key_positions=k_pos
                    )  # [1, q_heads, e-s, head_dim]
                    keep = _rolling_keep(k_pos, e, self.n_initial, self.n_recent)  # [K] bool, CPU
                    idx = keep.nonzero()[:, 0].to(key.device)
                    cache[li] = (k_pos[keep], k_all.index_select(2, idx), v_all.index_select(2, idx))
                    return out.transpose(1, 2).contiguous(), None  # [1, chunk, q_heads, head_dim]

                layer = base.layers[li]
                try:
                    out = layer(
                        hidden,
                        attention_mask=None,
                        position_ids=pos[None],
                        position_embeddings=rope,
                        use_cache=False,
                        **cache_kwarg(layer, None),
                        **{HOOK_KWARG: hook},
                    )
                except _ChunkDone:
                    break
                except _FilterDone as done:
                    return done.scores[0]
                hidden = out[0] if isinstance(out, tuple) else out
        raise RuntimeError("chunked filter pass ended without scoring")

    def select(self, model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
        """Sorted indices [min(k, n)] of the prompt tokens GemFilter keeps (no filter pass when ``k >= n``)."""
        n = input_ids.shape[1]
        if self.topk >= n:
            return torch.arange(n, device=input_ids.device)
        return self.pick(self.scores(model, input_ids)).to(input_ids.device)

    def pick(self, scores: torch.Tensor) -> torch.Tensor:
        """The kept indices (sorted) from filter-pass scores [n]: this instance's pooling, span rule and ``topk``."""
        return pool_and_select(scores, self.topk, self.kernel, self.pooling, self.dilation)

    def prefill(self, model: PreTrainedModel, input_ids: torch.Tensor) -> DecodeState:
        if input_ids.shape[0] != 1:
            raise InputError(f"GemFilter runs one prompt at a time, got batch size {input_ids.shape[0]}")
        n = input_ids.shape[1]
        if self.topk >= n:  # the selection would keep every token: no filter pass, plain full prefill
            state = full_prefill(model, input_ids)
            state.kept_indices = torch.arange(n, device=input_ids.device)
            state.details.update(filter_layer=self.resolved_layer(model), filter_s=0.0, filter_skipped=True)
            return state
        t0 = time.perf_counter()
        idx = self.select(model, input_ids)
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize()
        filter_s = time.perf_counter() - t0
        # Second pass from scratch on the kept ids; positions are 0..k-1 by default.
        state = full_prefill(model, input_ids[:, idx])
        state.kept_indices = idx
        state.details.update(
            filter_layer=self.resolved_layer(model), filter_s=filter_s, filter_skipped=False, **self.draft_details()
        )
        return state

    def draft_details(self) -> dict[str, Any]:
        """``{"filter_model": name}`` when a draft model selects, else ``{}`` (for a state's details)."""
        return {} if self.filter_model is None else {"filter_model": str(self.filter_model)}

    # -- prefix reuse: layers 0..r-1 (keys and values) and layer r's keys of a stored prefix

    def prefix_refusal(self) -> str | None:
        if self.chunk_size is not None:
            return (
                "the prefix cache runs GemFilter's dense filter pass only (chunk_size=None), "
                f"got chunk_size={self.chunk_size}"
            )
        if self.filter_attention == "local":
            return "the prefix cache runs GemFilter's dense filter pass only; got filter_attention='local'"
        return None

    def prefix_layers(self, model: PreTrainedModel) -> tuple[int, int]:
        r = self.resolved_layer(model)
        return r + 1, r

    def prefix_prefill(self, model: PreTrainedModel, input_ids: torch.Tensor, prefix: Any) -> DecodeState:
        """The filter pass runs the new tokens through layers ``0..r`` on top of the cached prefix; layer ``r``
        scores [cached keys + new keys] with the new tokens' queries (the last ``window_size``, or the last one
        for ``"paper"``); top-k over the whole prompt; the second pass runs from scratch on the kept ids (the
        kept tokens get new positions, so it cannot reuse a prefix)."""
        n = input_ids.shape[1]
        if self.uses_local(n, self.filter_net(model)):  # "auto" on a long prompt: the local pass, not cached yet
            return self.prefill(model, input_ids)
        if self.topk >= n:  # every token kept: a plain full prefill
            state = self.prefill(model, input_ids)
            state.details.update(prefix_cached_tokens=0, prefix_stored_tokens=0)
            return state
        r = self.resolved_layer(model)
        net = self.filter_net(model)  # the draft, if any: the cached prefix is its state (``prefix_net``)
        t0 = time.perf_counter()
        start = prefix.take(min(self.window_size, n) if self.scoring == "window" else 1)
        idx = self.pick(self._scores_after_prefix(net, input_ids.to(input_device(net)), prefix, start, r)).to(
            input_ids.device
        )
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize()
        filter_s = time.perf_counter() - t0
        with torch.inference_mode():
            state = full_prefill(model, input_ids[:, idx])
        state.kept_indices = idx
        state.details.update(filter_layer=r, filter_s=filter_s, filter_skipped=False, **self.draft_details())
        return prefix.finish(state)

    def prefix_net(self, model: PreTrainedModel) -> PreTrainedModel:
        """The model whose prefix state the prefix cache keeps for this method: the draft, if any."""
        return self.filter_net(model)

    @torch.inference_mode()
    def _scores_after_prefix(
        self, model: PreTrainedModel, input_ids: torch.Tensor, prefix: Any, start: int, r: int
    ) -> torch.Tensor:
        """The filter pass over tokens ``start..n-1`` on top of the prefix's first ``start`` tokens: scores [n]."""
        n = input_ids.shape[1]
        cache = prefix.seed(DynamicCache(config=model.config), layers=r)
        old_keys = prefix.keys(r)

        def hook(module, query, key, value, attention_mask, **kw):
            if module.layer_idx != r:
                return None
            own = key[:, :, -(n - start) :]
            keys = own if old_keys is None else torch.cat([old_keys, own], dim=2)
            raise _FilterDone(token_scores(query, keys, module.scaling, self.scoring, self.window_size))

        pos = torch.arange(start, n, device=input_ids.device)[None]
        try:
            model(
                input_ids=input_ids[:, start:],
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **cache_kwarg(model, cache),
                **{HOOK_KWARG: hook},
            )
        except _FilterDone as done:
            return done.scores[0]
        raise RuntimeError(f"filter layer {r} never ran its attention: is the model using tokensieve attention?")

    def prefill_batch(
        self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> DecodeState:
        """A left-padded batch: the filter pass runs per prompt (on its real tokens, exactly as alone), then the
        kept ids of all prompts run as one left-padded batch at positions 0..k_b-1. ``kept_rows``: per row [k_b]."""
        from tokensieve.methods.base import batch_prefill, left_pad  # (kept apart from the filter pass's imports)

        mask = attention_mask.bool()
        t0 = time.perf_counter()
        real = [input_ids[b, mask[b]] for b in range(input_ids.shape[0])]  # per row [n_b]
        rows = [self.select(model, r[None]) for r in real]  # per row [min(k, n_b)] sorted indices
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize()
        filter_s = time.perf_counter() - t0
        ids, kept_mask = left_pad([r[idx] for r, idx in zip(real, rows)])
        state = batch_prefill(model, ids, kept_mask)
        state.kept_rows = rows
        skipped = all(self.topk >= r.numel() for r in real)
        state.details.update(
            filter_layer=self.resolved_layer(model),
            filter_s=0.0 if skipped else filter_s,
            filter_skipped=skipped,
            **self.draft_details(),
        )
        return state
