"""GemFilter: early layers select the prompt tokens the full model runs on.

Shi et al., "Discovering the Gems in Early Layers: Accelerating Long-Context
LLMs with 1000x Input Token Reduction", 2024 (arXiv:2409.17422).

Algorithm (see ``shared/papers/methods.md``):

1. Filter pass: run decoder layers ``0 .. r-1`` and layer ``r``'s attention up to
   its post-RoPE queries and keys; stop there (no MLP of layer ``r``, no later
   layer, no KV cache, no logits).
2. Score every prompt token from those queries and keys, sum over heads.
3. Smooth with a 1-D average pool (kernel 5, stride 1, padding 2).
4. Keep the ``min(k, n)`` best tokens, sorted back into prompt order.
5. Run the full model from scratch on the kept ids at fresh positions
   ``0 .. k-1``, then decode normally.

Two scorings:

* ``"paper"``: raw inner products of the **last** query with every key,
  ``q_last . k_j`` summed over heads, exactly as the paper's code.
* ``"window"``: softmax attention (scaled, causal) of the last ``window``
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
from tokensieve.methods.base import DecodeState, Method, full_prefill, num_layers

SCORINGS = ("paper", "window")

# Filter layers (0-based) for known model shapes: (model_type, layers, hidden) -> r.
# Llama-3.1-8B, Mistral-Nemo-12B and Phi-3.5-mini are the paper's values; the two
# embedded models were chosen by `tokensieve calibrate` (README, "Filter layers").
KNOWN_FILTER_LAYERS: dict[tuple[str, int, int], int] = {
    ("llama", 32, 4096): 13,  # Llama-3.1-8B-Instruct
    ("mistral", 40, 5120): 19,  # Mistral-Nemo-12B-Instruct
    ("phi3", 32, 3072): 19,  # Phi-3.5-mini-instruct
    ("llama", 30, 576): 15,  # SmolLM2-135M(-Instruct)
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


class _FilterDone(Exception):
    """Raised inside layer r's attention to stop the filter pass early."""

    def __init__(self, scores: torch.Tensor):
        super().__init__("filter pass finished")
        self.scores = scores


def token_scores(
    query: torch.Tensor, key: torch.Tensor, scaling: float, scoring: str = "window", window: int = 16
) -> torch.Tensor:
    """Importance of each prompt token, summed over heads.

    query: [batch, q_heads, n, head_dim], key: [batch, kv_heads, n, head_dim]
    (post-RoPE, before GQA repetition). Returns float32 [batch, n]. Memory is
    linear in ``n``: only the scoring queries' rows of attention are formed.
    """
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    if scoring == "paper":
        # sum_h q_h . k_{kv(h)} = sum_kv (sum_{h in group kv} q_h) . k_kv : exact, no repeat of keys.
        q = query[:, :, -1, :].reshape(b, hkv, g, d).sum(2)  # [b, hkv, d]
        return torch.einsum("bhd,bhnd->bn", q.float(), key.float())
    if scoring == "window":
        w = min(window, n)
        q = query[:, :, -w:, :].reshape(b, hkv, g * w, d)  # [b, hkv, g*w, d], row = (head-in-group, query)
        logits = torch.matmul(q.float(), key.float().transpose(-1, -2)) * scaling  # [b, hkv, g*w, n]
        q_pos = torch.arange(n - w, n, device=query.device).repeat(g)  # [g*w]
        causal = torch.arange(n, device=query.device)[None, :] <= q_pos[:, None]  # [g*w, n]
        logits = logits.masked_fill(~causal, float("-inf"))
        return logits.softmax(dim=-1).sum(dim=(1, 2))  # [b, n]
    raise ValueError(f"unknown GemFilter scoring {scoring!r}; expected one of {SCORINGS}")


def pool_and_select(scores: torch.Tensor, k: int, kernel: int = 5) -> torch.Tensor:
    """Average-pool ``scores`` [n] (stride 1, same length) and return the sorted top-``min(k, n)`` indices."""
    n = scores.shape[-1]
    if kernel > 1:
        scores = F.avg_pool1d(scores.view(1, 1, n), kernel_size=kernel, stride=1, padding=kernel // 2).view(n)
    idx = torch.topk(scores, min(k, n)).indices
    return torch.sort(idx).values


@dataclass
class GemFilter(Method):
    """GemFilter (Shi et al., 2024): select the top-k prompt tokens with an early layer.

    Parameters:
        topk: tokens kept (the paper's default 1024); ``k >= n`` keeps the whole prompt.
        filter_layer: 0-based layer ``r`` whose attention scores the tokens; ``None``
            takes the known value for the model (``default_filter_layer``).
        scoring: ``"window"`` (softmax of the last ``window`` queries) or ``"paper"``
            (raw ``q_last . k``).
        window: scoring queries for ``"window"``.
        kernel: average-pool kernel (odd; 1 disables smoothing).
    """

    name: ClassVar[str] = "gemfilter"
    topk: int = 1024
    filter_layer: int | None = None
    scoring: str = "window"
    window: int = 16
    kernel: int = 5

    def resolved_layer(self, model: PreTrainedModel) -> int:
        return default_filter_layer(model) if self.filter_layer is None else self.filter_layer

    def validate(self, model: PreTrainedModel, prompt_len: int) -> None:
        if not isinstance(self.topk, int) or self.topk <= 0:
            raise ValueError(f"topk must be a positive integer, got {self.topk!r}")
        n_layers = num_layers(model)
        r = self.resolved_layer(model)
        if not isinstance(r, int) or not 0 <= r < n_layers:
            raise ValueError(f"filter_layer must be in [0, {n_layers - 1}] for this model, got {r!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.window <= 0:
            raise ValueError(f"window must be positive, got {self.window}")
        if self.kernel <= 0 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd integer, got {self.kernel}")

    @torch.inference_mode()
    def scores(self, model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
        """Filter pass: per-token scores [n] from layer ``r`` (before pooling)."""
        if input_ids.shape[0] != 1:
            raise ValueError(f"GemFilter runs one prompt at a time, got batch size {input_ids.shape[0]}")
        r = self.resolved_layer(model)

        def hook(module, query, key, value, attention_mask, **kwargs):
            if module.layer_idx == r:
                raise _FilterDone(token_scores(query, key, module.scaling, self.scoring, self.window))
            return None

        try:
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1, **{HOOK_KWARG: hook})
        except _FilterDone as done:
            return done.scores[0]
        raise RuntimeError(f"filter layer {r} never ran its attention: is the model using tokensieve attention?")

    def select(self, model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
        """Sorted indices [min(k, n)] of the prompt tokens GemFilter keeps."""
        return pool_and_select(self.scores(model, input_ids), self.topk, self.kernel)

    def prefill(self, model: PreTrainedModel, input_ids: torch.Tensor) -> DecodeState:
        t0 = time.perf_counter()
        idx = self.select(model, input_ids)
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize()
        filter_s = time.perf_counter() - t0
        # Second pass from scratch on the kept ids; positions are 0..k-1 by default.
        state = full_prefill(model, input_ids[:, idx])
        state.kept_indices = idx
        state.details.update(filter_layer=self.resolved_layer(model), filter_s=filter_s)
        return state
