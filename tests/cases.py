"""The one case registry: every registered method x its typical parameters, with what it can do read from the method
registry. The contract matrix (tests/methods/test_contract.py), the static-decode equivalence (tests/decode), the
batch equivalence (tests/engine/test_batch.py) and the prefix-cache equivalence (tests/engine/test_prefix_cache.py)
are parametrized from here, each over the cases whose ``capabilities`` say the method takes part. A newly registered
method gets all four tests by adding one ``Case``; ``test_every_method_has_a_case`` fails until it does.

A case's ``lossy`` settings are its typical (compressing) parameters; ``variants`` are further typical settings
(named) that the decode, batch and prefix tests run too. The contract's budget bounds (``max_kv`` / ``max_kept``)
hold for ``lossy``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from tokensieve.methods import METHODS
from tokensieve.methods.base import Capabilities

BUDGET = 40  # the lossy budget (entries, tokens) of the bounded methods
SEPS = (3, 4, 5)  # separator ids for SepLLM on the tiny vocabulary (TinyTokenizer / tiny_model's VOCAB)
FAMILIES = ["llama", "qwen2", "gemma3"]  # the contract's model families
STATIC_FAMILIES = ["llama", "qwen2"]  # families whose every layer attends fully: the static path, batches, prefixes


def sepllm_bound(ids: torch.Tensor, n_initial: int = 4, n_recent: int = 8) -> int:
    """Entries SepLLM may hold after the prompt: initial + separators + recent window (a slow count)."""
    seq = ids[0].tolist()
    n = len(seq)
    return sum(1 for i, t in enumerate(seq) if i < n_initial or t in SEPS or i >= n - n_recent)


@dataclass(frozen=True)
class Case:
    """One registered method and its typical parameters."""

    method: str
    noop: dict[str, Any]  # settings under which the method must equal full attention exactly
    lossy: dict[str, Any] | None  # its typical compressing settings (None: the method never compresses)
    max_kv: Callable[[torch.Tensor], int] | None = None  # bound on KV entries per layer after the prompt (lossy)
    max_kept: Callable[[int], int] | None = None  # bound on prompt tokens the output was computed from (lossy)
    extra: dict[str, Any] = field(default_factory=dict)  # settings common to every setting of the case
    kv_depends_on_content: bool = False  # the lossy KV count depends on the prompt's tokens, not only its length
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # more typical settings, by name

    @property
    def capabilities(self) -> Capabilities:
        return METHODS[self.method].capabilities

    def settings(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(id, parameters) of every typical setting: the lossy one (or the no-op one), then the variants."""
        yield self.method, (self.lossy if self.lossy is not None else self.noop) | self.extra
        for name, params in self.variants.items():
            yield f"{self.method}-{name}", params | self.extra


CASES = [
    Case("full", {}, None),
    Case(
        "gemfilter",
        {"topk": 10_000},
        {"topk": BUDGET},
        max_kv=lambda ids: BUDGET,
        max_kept=lambda n: BUDGET,
        variants={
            "layer2": {"topk": 48, "filter_layer": 2},
            "layer2-paper": {"topk": 48, "filter_layer": 2, "scoring": "paper"},
        },
    ),
    Case(
        "snapkv",
        {"budget": 10_000},
        {"budget": BUDGET},
        max_kv=lambda ids: BUDGET,
        variants={"window8": {"budget": 64, "window_size": 8}},
    ),
    Case("h2o", {"budget": 10_000}, {"budget": BUDGET}, max_kv=lambda ids: BUDGET),
    Case("streamingllm", {"budget": 10_000}, {"budget": BUDGET}, max_kv=lambda ids: BUDGET),
    Case(
        "sepllm",
        {"n_recent": 10_000},
        {"n_recent": 8},
        max_kv=sepllm_bound,
        extra={"separator_ids": SEPS},
        kv_depends_on_content=True,
        variants={"window16": {"separator_ids": (3, 4, 5, 6, 7, 8), "n_recent": 16}},
    ),
    Case(
        "lazyllm",
        {"keep_fractions": (1.0, 1.0, 1.0)},
        {"keep_fractions": (0.5, 0.5, 0.5)},
        max_kept=lambda n: math.ceil(n * 0.5**3),
        variants={"schedule": {"prune_layers": (1, 2, 4), "keep_fractions": (0.6, 0.7, 0.5)}},
    ),
]
BY_METHOD = {c.method: c for c in CASES}


def case_params(select: Callable[[Capabilities], bool], variants: bool = True) -> list[Any]:
    """``pytest.param(method, params, id=...)`` for every typical setting (``variants=False``: the lossy one only) of
    every case whose method's capabilities satisfy ``select``: the parametrization of the decode, batch and prefix
    tests."""
    return [
        pytest.param(c.method, params, id=name)
        for c in CASES
        if select(c.capabilities)
        for name, params in (c.settings() if variants else [next(c.settings())])
    ]


def params_of(method: str, variant: str | None = None) -> dict[str, Any]:
    """A case's typical parameters: its lossy (or no-op) setting, or the named variant."""
    c = BY_METHOD[method]
    return dict(c.settings())[method if variant is None else f"{method}-{variant}"]
