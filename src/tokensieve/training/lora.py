"""A low-rank adapter (LoRA) of tokensieve's own, for post-training under SepLLM's mask with less memory.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022 (arXiv:2106.09685): a frozen
weight ``W`` (out x in) is adapted by ``B @ A`` with ``A`` (r x in) drawn small and random and ``B`` (out x r)
zero, scaled by ``alpha / r``; the layer computes ``x W^T + b + (x A^T B^T) * alpha / r``, so the adapted model
equals the original at initialisation and only ``r * (in + out)`` numbers per layer train (with their gradients
and optimizer state). After training ``merge`` folds ``B @ A * alpha / r`` into ``W`` and puts the plain
``nn.Linear`` back, so the saved model is an ordinary Hugging Face folder.

``add_lora(model, rank, alpha, targets)`` wraps the chosen projections in place and freezes every other
parameter; ``adapter_state(model)`` / ``load_adapter_state(model, state)`` read and write the adapter tensors;
``unwrapped(model)`` is a context in which the model holds its plain (unmerged) base layers, for saving the base.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tokensieve.errors import InputError, check_choice, check_int, check_number

# Which projections each --lora-targets value adapts, by the module's attribute name (Llama, Qwen2/3, Mistral,
# Gemma 3 and most decoder families on transformers name them so).
ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
TARGETS = {"attn": ATTN_NAMES, "attn+mlp": ATTN_NAMES + MLP_NAMES}
MAX_RANK = 1024
ADAPTER_FILE = "adapter.safetensors"


class LoRALinear(nn.Module):
    """``base`` (frozen) plus the trainable low-rank update ``lora_B @ lora_A`` scaled by ``alpha / rank``.

    ``lora_A`` [rank, in] is drawn uniform in +-1/sqrt(in) (``nn.Linear``'s own default range) from
    ``generator``; ``lora_B`` [out, rank] starts at zero, so the output equals ``base``'s exactly at first.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        bound = 1.0 / math.sqrt(base.in_features)
        a = torch.empty(rank, base.in_features, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)
        return self.base(x) + update * self.scale

    def delta(self) -> torch.Tensor:
        """The update to the base weight, ``lora_B @ lora_A * alpha / rank`` [out, in]."""
        return (self.lora_B @ self.lora_A) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def check_lora(rank: int, alpha: float, targets: str) -> None:
    """``InputError`` for a rank outside 0..MAX_RANK, an alpha outside (0, 65536] or unknown targets."""
    check_int("lora_rank", rank, 0, MAX_RANK)
    check_number("lora_alpha", alpha, 0.0, 65536.0, above=True)
    check_choice("lora_targets", targets, tuple(TARGETS))


def _targets(model: nn.Module, targets: str) -> list[tuple[nn.Module, str, nn.Linear]]:
    names = TARGETS[targets]
    found = []
    for _, module in model.named_modules():
        for child_name, child in module.named_children():
            if child_name in names and isinstance(child, nn.Linear):
                found.append((module, child_name, child))
    return found


def add_lora(model: nn.Module, rank: int, alpha: float, targets: str = "attn", seed: int = 0) -> int:
    """Wrap ``model``'s ``targets`` projections (``"attn"``: q/k/v/o; ``"attn+mlp"``: also gate/up/down) in
    ``LoRALinear`` in place and freeze every other parameter; returns how many layers were wrapped.

    ``A`` is drawn from a generator seeded with ``seed`` (the same adapter whatever ran before). ``InputError``
    when the model has no such projection, is already wrapped, or ``rank`` exceeds a projection's smaller side.
    """
    check_lora(rank, alpha, targets)
    if rank == 0:
        raise InputError("lora_rank 0 means no adapter; expected a rank of 1 to 1024 to add one")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise InputError("the model already holds a LoRA adapter; merge it (merge_lora) before adding another")
    found = _targets(model, targets)
    if not found:
        raise InputError(
            f"{type(model).__name__} has no {'/'.join(TARGETS[targets])} linear layers to adapt; "
            "expected a decoder with q_proj/k_proj/v_proj/o_proj attention projections"
        )
    smallest = min(min(lin.in_features, lin.out_features) for _, _, lin in found)
    if rank > smallest:
        raise InputError(f"lora_rank {rank} exceeds the smallest adapted projection's side ({smallest})")
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for parent, name, lin in found:
        setattr(parent, name, LoRALinear(lin, rank, alpha, g))
    return len(found)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """The model's ``LoRALinear`` modules with their qualified names, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors, ``{"<module>.lora_A": ..., "<module>.lora_B": ...}`` (detached, contiguous)."""
    out = {}
    for name, m in lora_layers(model):
        out[f"{name}.lora_A"] = m.lora_A.detach().contiguous()
        out[f"{name}.lora_B"] = m.lora_B.detach().contiguous()
    return out


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from ``adapter_state``) into the wrapped model's adapters; ``InputError`` when the names
    or shapes differ (another model, rank or target set)."""
    own = adapter_state(model)
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise InputError(
            f"the adapter does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}; "
            "expected one saved from the same model, rank and targets"
        )
    with torch.no_grad():
        for name, m in lora_layers(model):
            for part in ("lora_A", "lora_B"):
                src = state[f"{name}.{part}"]
                dst = getattr(m, part)
                if src.shape != dst.shape:
                    raise InputError(
                        f"adapter tensor {name}.{part} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
                    )
                dst.copy_(src)


@contextmanager
def unwrapped(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, the model holds its plain base ``nn.Linear`` layers (the adapters set aside, unmerged): what
    ``save_pretrained`` writes then is the frozen base model. The adapters are put back on exit."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.base)
                swapped.append((parent, name, child))
    try:
        yield model
    finally:
        for parent, name, wrapper in swapped:
            setattr(parent, name, wrapper)


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (``W += B @ A * alpha / rank``) and restore the plain
    ``nn.Linear`` layers in place; returns how many were merged. Every parameter requires grad again afterwards,
    as in a freshly loaded model."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.base.weight += child.delta().to(child.base.weight.dtype)
                setattr(parent, name, child.base)
                n += 1
    for p in model.parameters():
        p.requires_grad_(True)
    return n


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of ``model``."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
