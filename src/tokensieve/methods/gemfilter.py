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
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from tokensieve.attention import HOOK_KWARG
from tokensieve.errors import InputError
from tokensieve.methods.base import DecodeState, Method, cache_kwarg, full_prefill, num_layers
from tokensieve.methods.eviction import check_int
from tokensieve.scoring import attention_scores, head_sum, paper_scores, pool_scores, sorted_topk

SCORINGS = ("paper", "window")
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
        from tokensieve.attention import repeat_kv

        g = query.shape[1] // key.shape[1]
        return F.scaled_dot_product_attention(query, repeat_kv(key, g), repeat_kv(value, g), attn_mask=mask, scale=scale)


class _FilterDone(Exception):
    """Raised inside layer r's attention to stop the filter pass early."""

    def __init__(self, scores: torch.Tensor):
        super().__init__("filter pass finished")
        self.scores = scores


def token_scores(
    query: torch.Tensor, key: torch.Tensor, scaling: float, scoring: str = "window",
    window_size: int = DEFAULT_WINDOW_SIZE, key_chunk: int | None = None,
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


def pool_and_select(scores: torch.Tensor, k: int, kernel: int = DEFAULT_KERNEL) -> torch.Tensor:
    """GemFilter's selection: average-pool ``scores`` [n] (stride 1, same length), keep the sorted top-``min(k, n)``."""
    return sorted_topk(pool_scores(scores, kernel, "avg"), k)


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
        kernel: average-pool kernel (odd; 1 disables smoothing).
        chunk_size: when set and the prompt is longer, the filter pass runs layer by layer
            over chunks of this many tokens, so only one layer's keys/values and the hidden
            states are resident (for prompts whose full KV would not fit, e.g. 1M tokens).
            Same scores as the one-shot pass up to float rounding. Llama-style models
            without sliding-window layers only.
    """

    name: ClassVar[str] = "gemfilter"
    renamed: ClassVar[dict[str, str]] = {"window": "window_size"}
    topk: int = 1024
    filter_layer: int | None = None
    scoring: str = "window"
    window_size: int = DEFAULT_WINDOW_SIZE
    kernel: int = DEFAULT_KERNEL
    chunk_size: int | None = None

    def resolved_layer(self, model: PreTrainedModel) -> int:
        return default_filter_layer(model) if self.filter_layer is None else self.filter_layer

    def validate(self, model: PreTrainedModel, prompt_len: int) -> None:
        if not isinstance(self.topk, int) or self.topk <= 0:
            raise InputError(f"topk must be a positive integer, got {self.topk!r}")
        n_layers = num_layers(model)
        r = self.resolved_layer(model)
        if not isinstance(r, int) or not 0 <= r < n_layers:
            # Still a plain ValueError: tests/test_bench.py pins "error: ValueError" in bench status rows.
            raise InputError(f"filter_layer must be in [0, {n_layers - 1}] for this model, got {r!r}")
        if self.scoring not in SCORINGS:
            raise InputError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        check_int("window_size", self.window_size, 1)
        check_int("kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise InputError(f"kernel must be a positive odd integer, got {self.kernel}")
        if self.chunk_size is not None:
            if self.chunk_size < self.window_size:
                raise InputError(f"chunk_size must be >= window_size ({self.window_size}), got {self.chunk_size}")
            cfg = model.config.get_text_config()
            if cfg.model_type not in CHUNKED_MODEL_TYPES or any(
                t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])
            ):
                raise InputError(
                    f"chunk_size needs a model with only full-attention layers of type {CHUNKED_MODEL_TYPES}, "
                    f"got {cfg.model_type!r}"
                )

    @torch.inference_mode()
    def scores(self, model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
        """Filter pass: per-token scores [n] from layer ``r`` (before pooling)."""
        if input_ids.shape[0] != 1:
            raise InputError(f"GemFilter runs one prompt at a time, got batch size {input_ids.shape[0]}")
        r = self.resolved_layer(model)
        if self.chunk_size is not None and input_ids.shape[1] > self.chunk_size:
            return self._chunked_scores(model, input_ids, r)

        def hook(module, query, key, value, attention_mask, **kwargs):
            if module.layer_idx == r:
                raise _FilterDone(token_scores(query, key, module.scaling, self.scoring, self.window_size))
            return None

        try:
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1, **{HOOK_KWARG: hook})
        except _FilterDone as done:
            return done.scores[0]
        raise RuntimeError(f"filter layer {r} never ran its attention: is the model using tokensieve attention?")

    def _chunked_scores(self, model: PreTrainedModel, input_ids: torch.Tensor, r: int) -> torch.Tensor:
        """Filter pass layer by layer over chunks: resident are the hidden states [1, n, D] and one
        layer's keys/values [1, kv_heads, n, head_dim], never the KV of all filter layers."""
        base = model.model
        n, dev = input_ids.shape[1], input_ids.device
        starts = list(range(0, n, self.chunk_size))
        if len(starts) > 1 and n - starts[-1] < self.window_size:
            starts.pop()  # the last chunk must hold all scoring queries
        bounds = list(zip(starts, starts[1:] + [n]))
        hidden = base.embed_tokens(input_ids)  # [1, n, D]
        for li in range(r + 1):
            layer = base.layers[li]
            keys = values = None  # [1, kv_heads, n, head_dim], filled chunk by chunk
            for s, e in bounds:
                pos = torch.arange(s, e, device=dev)[None]
                rope = base.rotary_emb(hidden[:, s:e], pos)

                def hook(module, query, key, value, attention_mask, s=s, e=e, **kwargs):
                    nonlocal keys, values
                    if keys is None:
                        keys = key.new_empty(key.shape[0], key.shape[1], n, key.shape[3])
                        values = value.new_empty(keys.shape) if li < r else None  # layer r only scores keys
                    keys[:, :, s:e] = key
                    if li == r:
                        if e < n:
                            raise _ChunkDone()
                        raise _FilterDone(token_scores(query, keys, module.scaling, self.scoring, self.window_size,
                                                       key_chunk=self.chunk_size))
                    values[:, :, s:e] = value
                    out = causal_chunk_attention(query, keys[:, :, :e], values[:, :, :e], module.scaling)
                    return out.transpose(1, 2).contiguous(), None  # [1, chunk, q_heads, head_dim]

                try:
                    out = layer(hidden[:, s:e], attention_mask=None, position_ids=pos, position_embeddings=rope,
                                use_cache=False, **cache_kwarg(layer, None), **{HOOK_KWARG: hook})
                except _ChunkDone:
                    continue
                except _FilterDone as done:
                    return done.scores[0]
                hidden[:, s:e] = out[0] if isinstance(out, tuple) else out
            del keys, values
        raise RuntimeError("chunked filter pass ended without scoring")

    def select(self, model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
        """Sorted indices [min(k, n)] of the prompt tokens GemFilter keeps (no filter pass when ``k >= n``)."""
        n = input_ids.shape[1]
        if self.topk >= n:
            return torch.arange(n, device=input_ids.device)
        return pool_and_select(self.scores(model, input_ids), self.topk, self.kernel)

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
        state.details.update(filter_layer=self.resolved_layer(model), filter_s=filter_s, filter_skipped=False)
        return state

    def prefill_batch(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DecodeState:
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
        state.details.update(filter_layer=self.resolved_layer(model), filter_s=0.0 if skipped else filter_s, filter_skipped=skipped)
        return state

