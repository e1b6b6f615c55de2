"""Rotary position embedding (RoPE) applied and undone outside the model, from the model's own tables.

A position-shifting cache (``tokensieve.engine.streaming``) stores keys **without**
RoPE and rotates them at whatever positions they hold in the cache at each
step; new keys come out of the model rotated at their positions and are
un-rotated before they are stored. This module has the two pieces: the
cos/sin tables, taken from the model's own ``rotary_emb`` (so any scaling the
model applies, and Gemma 3's per-layer-type tables, come for free), and the
rotation with its inverse. Llama-style ``rotate_half`` RoPE; a partial
rotary dimension (the first ``rot_dim`` dims rotate) is handled.

It is a module of its own, not part of the cache, because it is model
arithmetic with no policy in it: it is tested on its own (rotate then
un-rotate is the identity; rotating by the model's tables equals the model's
own keys), and any other position-shifting code can use it.
"""

from __future__ import annotations

import inspect

import torch
from transformers import PreTrainedModel


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d]: (x1, x2) -> (-x2, x1), the halves of the last dim (Llama-style RoPE)."""
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
    out = (xr * cos + rotate_half(xr) * sin).to(x.dtype)
    return out if xp.shape[-1] == 0 else torch.cat((out, xp), dim=-1)


class RopeTables:
    """cos/sin [positions, rot_dim] from the model's own ``rotary_emb``, per layer type, grown on demand."""

    def __init__(self, model: PreTrainedModel):
        base = model.get_decoder() if hasattr(model, "get_decoder") else model
        rotary = getattr(base, "rotary_emb", None) or getattr(getattr(model, "model", None), "rotary_emb", None)
        if rotary is None:
            raise ValueError(
                f"position shifting needs a model with a Llama-style rotary embedding (decoder.rotary_emb); "
                f"{type(model).__name__} has none"
            )
        self.rotary = rotary
        self.takes_layer_type = "layer_type" in inspect.signature(rotary.forward).parameters
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
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


# rope_type values whose inv_freq depends on the sequence length (recomputed inside rotary_emb's forward).
DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


def accurate_rope(
    rotary: torch.nn.Module, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [1, len(positions), head_dim] in ``dtype``, for a Llama-style ``rotary_emb``, with the
    angles ``position * inv_freq`` formed and reduced in float64.

    ``transformers`` forms the angles in float32: at position ``p`` the product is rounded to
    float32's spacing there (0.0625 rad at 1M, 0.25-0.5 rad at 4M), so the relative angle between
    two tokens, the only thing attention sees, is off by up to that much in the fast dimensions
    (``tests/methods/test_gemfilter_local.py`` measures it). Here the model's own ``inv_freq`` (its RoPE
    scaling included) and ``attention_scaling`` are used, only the arithmetic is float64, so the
    result equals the model's tables to float32 rounding at small positions. Rotary embeddings
    whose ``inv_freq`` changes with the length (``rope_type`` dynamic/longrope) fall back to the
    model's own forward. positions: [len] integer.
    """
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None or getattr(rotary, "rope_type", "default") in DYNAMIC_ROPE_TYPES:
        dummy = torch.zeros(1, 1, 1, device=positions.device, dtype=dtype)
        return rotary(dummy, positions[None])
    freqs = positions.to(torch.float64)[:, None] * inv_freq.to(device=positions.device, dtype=torch.float64)[None]
    emb = torch.cat((freqs, freqs), dim=-1)[None]  # [1, len, head_dim]
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
