"""Perplexity of a text file, for full attention and for any method.

Two modes:

* ``decode`` (any method): the file is cut into consecutive windows of
  ``length`` tokens; a window's first ``length - score_tokens`` tokens are the
  prompt, prefilled by the method (selection, eviction, pruning, as when
  answering), and its last ``score_tokens`` tokens are fed one at a time through
  the method's decoding step (teacher forcing), summing the negative
  log-likelihood of each. It measures how well the method's compressed state
  predicts what follows, i.e. the loss a method causes while generating.
  With full attention it equals the plain perplexity of those tokens given the
  window (tested).
* ``sliding`` (full attention only): Hugging Face's strided perplexity: windows
  of ``length`` tokens every ``stride`` tokens, one forward each, scoring the
  tokens not scored by an earlier window. It is the classic number to compare
  with other tools; methods change the prompt or cache, not a single forward,
  so they are not defined for it.

Streaming perplexity over millions of tokens with a bounded cache is the
``tokensieve stream`` command's job, not this one.

A result line holds ``nll`` (sum over the scored tokens, nats), ``tokens`` and
``ppl``; reports aggregate ``exp(sum nll / sum tokens)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokensieve.core.memory import PeakMemory, synchronize
from tokensieve.engine.runner import score_continuation
from tokensieve.errors import InputError
from tokensieve.evaluation.harness import Sample, Task
from tokensieve.methods import Method

PPL_MODES = ("decode", "sliding")


class PerplexityTask(Task):
    name = "ppl"

    def __init__(
        self,
        text: str,
        lengths: list[int],
        samples: int = 4,
        mode: str = "decode",
        score_tokens: int = 64,
        stride: int | None = None,
        text_name: str = "pg19",
    ):
        if mode not in PPL_MODES:
            raise InputError(f"perplexity mode {mode!r} is not one of {', '.join(PPL_MODES)}")
        if mode == "decode" and any(n <= score_tokens for n in lengths):
            raise InputError(f"every length must exceed --score-tokens {score_tokens}, got lengths {lengths}")
        if score_tokens < 1:
            raise InputError(f"score_tokens must be >= 1, got {score_tokens}")
        if stride is not None and stride < 1:
            raise InputError(f"stride must be >= 1, got {stride}")
        self.text, self.lengths, self.n_samples, self.mode = text, list(lengths), samples, mode
        self.score_tokens, self.stride, self.text_name = score_tokens, stride, text_name

    def config(self) -> dict[str, Any]:
        return {
            "text": self.text_name,
            "mode": self.mode,
            "score_tokens": self.score_tokens if self.mode == "decode" else None,
            "stride": self.stride if self.mode == "sliding" else None,
        }

    def samples(self, tokenizer: PreTrainedTokenizerBase) -> Iterator[Sample]:
        need = max(self.lengths) * (self.n_samples + 1)
        ids = tokenizer(self.text[: need * 8], add_special_tokens=False)["input_ids"]
        for n in self.lengths:
            stride = self.stride or n // 2
            if self.mode == "decode":
                starts = [i * n for i in range(self.n_samples) if (i + 1) * n <= len(ids)]
            else:
                starts = [i * stride for i in range(self.n_samples) if i * stride + n <= len(ids)]
            if not starts:
                raise InputError(f"the text has {len(ids)} tokens, fewer than one window of {n}")
            for i, s in enumerate(starts):
                scored = self.score_tokens if self.mode == "decode" else (n - 1 if i == 0 else min(stride, n - 1))
                yield Sample(f"{self.mode}/{n}/{i}", n, ids[s : s + n], [], {"start": s, "scored": scored})

    def evaluate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        sample: Sample,
        method: Method,
        allow_long: bool,
    ) -> dict[str, Any]:
        ids = torch.tensor([sample.input_ids], device=model.device)  # [1, n]
        if self.mode == "sliding":
            if method.name != "full":
                raise InputError(
                    f"sliding perplexity is defined for full attention only, not {method.name!r}; use --mode decode"
                )
            return sliding_nll(model, ids, sample.meta["scored"])
        return decode_nll(model, tokenizer, ids, method, sample.meta["scored"], allow_long)


def _fields(nll: float, tokens: int, **extra: Any) -> dict[str, Any]:
    return {"nll": nll, "tokens": tokens, "ppl": math.exp(nll / tokens), "score": None} | extra


@torch.inference_mode()
def sliding_nll(model: PreTrainedModel, ids: torch.Tensor, scored: int) -> dict[str, Any]:
    """NLL of the last ``scored`` tokens of ``ids`` [1, n] from one full forward."""
    with PeakMemory(model.device) as mem:
        synchronize(model.device)
        t0 = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False).logits[0, -scored - 1 : -1].float()  # [scored, vocab]
        nll = F.cross_entropy(logits, ids[0, -scored:], reduction="sum").item()
        synchronize(model.device)
        dt = time.perf_counter() - t0
    n = ids.shape[1]
    return _fields(nll, scored, prompt_tokens=n, kept_tokens=n, kv_kept=n, ttft_s=dt, peak_memory_bytes=mem.peak_bytes)


def decode_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    ids: torch.Tensor,
    method: Method,
    scored: int,
    allow_long: bool = False,
) -> dict[str, Any]:
    """Prefill ``ids[:, :-scored]`` with ``method``, then teacher-force the last ``scored`` tokens through its
    decoding step (the runner's ``score_continuation``: the same prepare/validate/prefill/step as answering)."""
    prompt, target = ids[:, :-scored], ids[0, -scored:]  # [1, n - scored], [scored]
    res = score_continuation(model, tokenizer, prompt, target, method, allow_long=allow_long)
    kv = res.kv_tokens_prefill
    return _fields(
        res.total_nll,
        scored,
        prompt_tokens=res.prompt_tokens,
        kept_tokens=res.kept_tokens,
        kv_kept=res.kv_kept,
        kv_tokens_prefill=sum(kv) / len(kv) if kv else None,
        kv_bytes_prefill=res.kv_bytes_prefill,
        ttft_s=res.ttft_s,
        decode_tokens_per_s=res.decode_tokens_per_s,
        peak_memory_bytes=res.peak_memory_bytes,
    )
