"""Prompt -> answer for any method, with time to first token, peak memory and tokens kept."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokensieve.errors import InputError, PromptTooLongError
from tokensieve.memory import PeakMemory, synchronize
from tokensieve.methods import Method, make_method
from tokensieve.methods.base import cache_stats, max_positions

Messages = Sequence[dict[str, str]]


@dataclass
class GenerationResult:
    text: str
    method: str
    params: dict[str, Any]
    prompt_tokens: int
    kept_tokens: int  # prompt tokens the model computed its output from
    ttft_s: float  # prefill + first token
    decode_tokens_per_s: float | None  # None when fewer than two tokens were generated
    peak_memory_bytes: int
    kv_tokens_prefill: list[int]  # KV entries per layer right after prefill
    kv_tokens_final: list[int]  # ... and at the end of generation
    kv_bytes_prefill: int
    kv_bytes_final: int
    generated_tokens: int
    token_ids: list[int] = field(repr=False)
    kept_indices: list[int] | None = field(default=None, repr=False)
    details: dict[str, Any] = field(default_factory=dict)
    step_times_s: list[float] = field(default_factory=list, repr=False)  # wall time of each decoding step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt_or_messages: str | Messages, use_chat_template: bool | None = None
) -> torch.Tensor:
    """Token ids [1, n]. Chat models get their chat template (with the generation prompt)."""
    messages = (
        [{"role": "user", "content": prompt_or_messages}] if isinstance(prompt_or_messages, str) else list(prompt_or_messages)
    )
    if not messages or not any(m.get("content", "").strip() for m in messages):
        raise ValueError("the prompt is empty")
    if use_chat_template is None:
        use_chat_template = getattr(tokenizer, "chat_template", None) is not None
    if use_chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return ids["input_ids"]
    text = "\n\n".join(m["content"] for m in messages)
    return tokenizer(text, return_tensors="pt")["input_ids"]


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if src is None:
            continue
        ids.update(src if isinstance(src, (list, tuple)) else [src])
    return ids


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_or_messages: str | Messages | torch.Tensor,
    method: str | Method = "full",
    max_new_tokens: int = 64,
    allow_long: bool = False,
    **method_params: Any,
) -> GenerationResult:
    """Answer a prompt with ``method`` (greedy decoding) and measure it.

    ``prompt_or_messages`` is a string, a list of chat messages, or token ids
    [1, n] (used as they are). ``method_params`` go to the method's dataclass
    (e.g. ``topk=512`` for GemFilter).
    """
    m = make_method(method, **method_params)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model.device
    if torch.is_tensor(prompt_or_messages):
        input_ids = prompt_or_messages.reshape(1, -1)
        if input_ids.numel() == 0:
            raise ValueError("the prompt is empty")
    else:
        input_ids = encode_prompt(tokenizer, prompt_or_messages)
    input_ids = input_ids.to(device)
    n = input_ids.shape[1]
    limit = max_positions(model)
    if limit is not None and n > limit and not allow_long:
        raise PromptTooLongError(
            f"prompt has {n} tokens, more than the model's maximum of {limit} positions; "
            f"shorten it or pass allow_long=True (--allow-long) to run anyway"
        )
    m.prepare(model, tokenizer)
    m.validate(model, n)
    stops = stop_token_ids(model, tokenizer)

    out_ids: list[int] = []
    with torch.inference_mode(), PeakMemory(device) as mem:
        synchronize(device)
        t0 = time.perf_counter()
        state = m.prefill(model, input_ids)
        token = state.logits.argmax(dim=-1, keepdim=True)  # [1, 1]
        out_ids.append(int(token))
        ttft = time.perf_counter() - t0
        kv_pre, kv_bytes_pre = cache_stats(state.cache)
        t1 = t_step = time.perf_counter()
        steps: list[float] = []
        while len(out_ids) < max_new_tokens and out_ids[-1] not in stops:
            logits = m.step(model, state, token)
            token = logits.argmax(dim=-1, keepdim=True)
            out_ids.append(int(token))  # int() waits for the device: each step is timed whole
            now = time.perf_counter()
            steps.append(now - t_step)
            t_step = now
        synchronize(device)
        decode_s = time.perf_counter() - t1
    kv_fin, kv_bytes_fin = cache_stats(state.cache)
    text_ids = [t for t in out_ids if t not in stops]
    kept = state.kept_indices
    return GenerationResult(
        text=tokenizer.decode(text_ids, skip_special_tokens=True).strip(),
        method=m.name,
        params=m.params(),
        prompt_tokens=n,
        kept_tokens=int(kept.numel()) if kept is not None else int(state.details.get("kept_tokens", n)),
        ttft_s=ttft,
        decode_tokens_per_s=(len(out_ids) - 1) / decode_s if len(out_ids) > 1 and decode_s > 0 else None,
        peak_memory_bytes=mem.peak_bytes,
        kv_tokens_prefill=kv_pre,
        kv_tokens_final=kv_fin,
        kv_bytes_prefill=kv_bytes_pre,
        kv_bytes_final=kv_bytes_fin,
        generated_tokens=len(out_ids),
        token_ids=out_ids,
        kept_indices=kept.tolist() if kept is not None else None,
        details=dict(state.details),
        step_times_s=steps,
    )


def selection_text(
    tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor | list[int], kept_indices: list[int], gap: str = " [...] "
) -> str:
    """The kept tokens as text, with ``gap`` wherever a span of the prompt was dropped."""
    ids = input_ids.reshape(-1).tolist() if torch.is_tensor(input_ids) else list(input_ids)
    n = len(ids)
    pieces, run, prev = [], [], -1
    for i in kept_indices:
        if run and i != prev + 1:  # a dropped span between two runs
            pieces += [tokenizer.decode(run), gap]
            run = []
        elif not run and i > 0:  # the prompt's start was dropped
            pieces.append(gap)
        run.append(ids[i])
        prev = i
    if run:
        pieces.append(tokenizer.decode(run))
    if kept_indices and kept_indices[-1] < n - 1:
        pieces.append(gap)
    return "".join(pieces)
