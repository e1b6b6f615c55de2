"""The one driver: prompt -> (prepare, validate, prefill, step ...) for every entry point.

``prepare`` makes and validates a method for a prompt (``prepare_batch``: for several, left-padded
into one batch); ``drive`` runs its prefill and then its decoding step while a *chooser* supplies
tokens. ``generate`` (answers, greedy or sampled; used by the CLI, the evaluation tasks and the
benchmark) and ``score_continuation`` (teacher forcing, used by the perplexity task) are the two
choosers; ``generate_batch`` answers several prompts at once through the same ``drive`` (full
attention, GemFilter, SnapKV, StreamingLLM). Times to first token, peak memory and KV kept are
measured here and nowhere else. Streaming through a bounded cache has the same two stages:
``open_stream`` (prepare, validate) and ``feed_stream`` (the chunks, fed in order).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokensieve.core.attention import ensure_tokensieve_attention
from tokensieve.core.cache import EvictionCache
from tokensieve.core.memory import PeakMemory, synchronize
from tokensieve.core.separators import separator_token_ids
from tokensieve.decode.slots import decoder_size, slot_state_for, without_needless_eviction
from tokensieve.decode.static import DecoderPool, model_refusal
from tokensieve.engine.streaming import ContextFullError, Streamer, StreamPolicy
from tokensieve.errors import (
    ChatTemplateError,
    EmptyPromptError,
    InputError,
    PromptTooLongError,
    check_int,
    check_number,
)
from tokensieve.methods import METHODS, Method, make_method
from tokensieve.methods.base import Capabilities, DecodeState, batch_refused, cache_stats, left_pad, max_positions

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
    # KV entries the method kept after the prefill: the most any layer holds (``kv_kept_of``); set from
    # ``kv_tokens_prefill`` when not given (an engine that holds the KV itself, e.g. vLLM, gives it)
    kv_kept: int | None = None

    def __post_init__(self) -> None:
        if self.kv_kept is None:
            self.kv_kept = kv_kept_of(self.kv_tokens_prefill)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kv_kept_of(kv_tokens_prefill: Sequence[int]) -> int | None:
    """The KV entries a method kept after the prefill, as one number: the most any layer holds (an evicting
    method's budget, a selection method's kept tokens, the whole prompt for full attention; sliding-window layers
    of a model such as Gemma 3 hold fewer and do not count). ``None`` when no per-layer count is known.
    ``kept_tokens`` says how many prompt tokens the output was computed from; this says what the cache holds."""
    return max(kv_tokens_prefill) if kv_tokens_prefill else None


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt_or_messages: str | Messages, use_chat_template: bool | None = None
) -> torch.Tensor:
    """Token ids [1, n]. Chat models get their chat template (with the generation prompt)."""
    messages = check_messages(prompt_or_messages)
    if not messages or not any(m.get("content", "").strip() for m in messages):
        raise EmptyPromptError("the prompt is empty")
    if use_chat_template is None:
        use_chat_template = getattr(tokenizer, "chat_template", None) is not None
    if use_chat_template:
        try:
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        except Exception as exc:
            if type(exc).__module__.startswith("jinja2"):  # the template raised (e.g. roles must alternate)
                raise ChatTemplateError(f"the model's chat template rejected the messages: {exc}") from None
            raise
        return ids["input_ids"]
    text = "\n\n".join(m["content"] for m in messages)
    return tokenizer(text, return_tensors="pt")["input_ids"]


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (JSON's "\udcff" decodes to one): no tokenizer takes it
        raise InputError(f"{where} is not valid Unicode text ({exc.reason} at character {exc.start})") from None


def check_messages(prompt_or_messages: Any) -> list[dict[str, str]]:
    """A text prompt as one user message, or the chat messages checked: a list of ``{"role": str,
    "content": str}`` dicts of valid Unicode text; ``InputError`` otherwise."""
    if isinstance(prompt_or_messages, str):
        _check_text(prompt_or_messages, "the prompt")
        return [{"role": "user", "content": prompt_or_messages}]
    if isinstance(prompt_or_messages, (bytes, dict)) or not isinstance(prompt_or_messages, Sequence):
        raise InputError(
            f"a prompt is a string, a list of chat messages ({{'role': ..., 'content': ...}}) or token ids [1, n] "
            f"(a tensor), got {type(prompt_or_messages).__name__}"
        )
    messages = list(prompt_or_messages)
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}: {m!r:.60}")
        if not isinstance(m.get("role"), str):
            raise InputError(f"message {i} needs a 'role' string, got {m.get('role')!r:.60}")
        content = m.get("content", "")
        if not isinstance(content, str):
            raise InputError(f"message {i}'s content must be a string, got {type(content).__name__}")
        _check_text(content, f"message {i}'s content")
    return messages


def check_token_ids(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """Token ids given as a tensor: one prompt (``[n]`` or ``[1, n]``) of integer ids the model's embedding
    has; returned as ``[1, n]``. ``InputError`` for several rows (use ``generate_batch``), other
    shapes, non-integer dtypes and ids out of range."""
    if ids.dim() == 2 and ids.shape[0] != 1:
        raise InputError(
            f"token ids must be one prompt, [n] or [1, n], got shape {list(ids.shape)}; "
            f"for several prompts use generate_batch with one tensor per prompt"
        )
    if ids.dim() not in (1, 2):
        raise InputError(f"token ids must be one prompt, [n] or [1, n], got shape {list(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InputError(f"token ids must be an integer tensor, got dtype {ids.dtype}")
    ids = ids.reshape(1, -1)
    if ids.numel() == 0:
        raise InputError("the prompt is empty")
    try:
        vocab = int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError):
        vocab = int(model.config.get_text_config().vocab_size)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise InputError(f"token ids must be in [0, {vocab - 1}] for this model, got {lo if lo < 0 else hi}")
    return ids.long()


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if src is None:
            continue
        ids.update(src if isinstance(src, (list, tuple)) else [src])
    return ids


ALLOW_LONG_HINT = "or pass allow_long=True (--allow-long) to run anyway"


def check_prompt_length(
    tokens: int, limit: int | None, *, at_least: str | None = None, hint: str | None = None
) -> None:
    """The one prompt-length rule (API, CLI, server): ``PromptTooLongError`` when a prompt of ``tokens`` tokens
    passes the model's ``limit`` positions (None: no limit). ``at_least`` marks ``tokens`` as a lower bound and
    says how it was counted (the server's check before tokenizing); ``hint`` ends the message with what the
    caller can do besides shortening the prompt (``ALLOW_LONG_HINT`` where ``allow_long`` exists)."""
    if limit is None or tokens <= limit:
        return
    count = f"at least {tokens} tokens ({at_least})" if at_least else f"{tokens} tokens"
    raise PromptTooLongError(
        f"prompt has {count}, more than the model's maximum of {limit} positions; shorten it"
        + (f" {hint}" if hint else "")
    )


@dataclass
class Prepared:
    """A method made, prepared and validated for one prompt (``prepare``; several left-padded into one batch:
    ``prepare_batch``): what ``drive`` runs. ``generate``, ``generate_batch`` and ``vllm_adapter.select_tokens``
    take one as their prompt and run it as it is, without preparing it again (the server prepares each request
    once, when it arrives, and its worker runs that)."""

    method: Method
    input_ids: torch.Tensor  # [1, n] on the model's device ([batch, n], left-padded, for a batch)
    attention_mask: torch.Tensor | None = None  # [batch, n] bool (True = real token) for a batch; None: one prompt
    # ``drive`` records, right after the prefill, which prompt positions each layer's KV heads hold
    # (``details["kept_per_layer"]``: eviction methods on one prompt; the server's selection page asks for it)
    record_selection: bool = False


def prepare(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    prompt_or_messages: str | Messages | torch.Tensor,
    method: str | Method = "full",
    allow_long: bool = False,
    **method_params: Any,
) -> Prepared:
    """The one way into a run: make the method, encode the prompt, check its length, ``prepare`` and
    ``validate`` the method. Every entry point (generate, continuation scoring, bench, eval) calls it.

    ``prompt_or_messages`` is a string, a list of chat messages, or token ids [1, n] (used as they
    are). Raises ``PromptTooLongError`` past the model's maximum position unless ``allow_long``, and
    ``InputError`` for bad method parameters. A model not on tokensieve attention is switched to it
    first, with a warning (``attention.ensure_tokensieve_attention``; ``InputError`` where impossible).
    """
    ensure_tokensieve_attention(model)
    m = make_method(method, **method_params)
    if torch.is_tensor(prompt_or_messages):
        input_ids = check_token_ids(model, prompt_or_messages)
    else:
        check_messages(prompt_or_messages)
        if tokenizer is None:
            raise InputError("a text prompt needs a tokenizer; pass token ids [1, n] instead")
        input_ids = encode_prompt(tokenizer, prompt_or_messages)
    input_ids = input_ids.to(model.device)
    n = input_ids.shape[1]
    if not allow_long:
        check_prompt_length(n, max_positions(model), hint=ALLOW_LONG_HINT)
    if tokenizer is not None:
        m.prepare(model, tokenizer)
    m.validate(model, n)
    return Prepared(m, input_ids)


Prompt = str | Messages | torch.Tensor


def prepare_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    prompts: Sequence[Prompt],
    method: str | Method = "full",
    allow_long: bool = False,
    **method_params: Any,
) -> Prepared:
    """``prepare`` for several prompts: each is encoded, length-checked and validated as alone (errors name
    the prompt by its index), then all are left-padded into one batch with an attention mask. One prompt
    gives the single-prompt ``Prepared`` (no mask); more than one needs a method whose capabilities say ``batch``.
    """
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise InputError(
            f"prompts must be a non-empty list of prompts, got {type(prompts).__name__} of length "
            f"{len(prompts) if hasattr(prompts, '__len__') else '?'}"
        )
    if isinstance(prompts[0], dict):
        raise InputError("prompts is one conversation (a list of messages); pass a list of prompts, e.g. [messages]")
    runs = []
    for i, prompt in enumerate(prompts):
        try:
            runs.append(prepare(model, tokenizer, prompt, method, allow_long, **method_params))
        except InputError as exc:  # PromptTooLongError included
            raise type(exc)(f"prompt {i}: {exc}") from exc
    return join_prepared(runs)


def join_prepared(runs: Sequence[Prepared]) -> Prepared:
    """Prepared single prompts as one batch, left-padded, run with the first one's method instance: every run
    must have a method of the same name and parameters (each was validated for its own prompt), whose
    ``capabilities`` say ``batch`` when there are several. One run is returned as it is."""
    if not runs or not all(
        isinstance(r, Prepared) and r.attention_mask is None and r.input_ids.shape[0] == 1 for r in runs
    ):
        raise InputError("join_prepared takes a non-empty list of prepared single prompts (from prepare)")
    if len(runs) == 1:
        return runs[0]
    m = runs[0].method
    for i, r in enumerate(runs[1:], 1):
        if r.method.name != m.name or r.method.params() != m.params():
            raise InputError(
                f"prompt {i} was prepared for {r.method.name} {r.method.params()}, prompt 0 for {m.name} "
                f"{m.params()}; a batch runs one method with one set of parameters"
            )
    if not m.capabilities.batch:
        raise batch_refused(m.name)
    input_ids, mask = left_pad([r.input_ids[0] for r in runs])
    return Prepared(m, input_ids, mask)


def _given(run: Prepared, method: Any, method_params: dict[str, Any]) -> Prepared:
    """A ``Prepared`` passed as the prompt carries its method: ``InputError`` when another is given too."""
    if method_params or not (isinstance(method, str) and method == "full"):
        raise InputError(
            "a prepared prompt (tokensieve.runner.Prepared) carries its method; pass no method or parameters with it"
        )
    return run


# Given the logits [batch, vocab] that follow the i-th fed token (i = 0 after the prefill), a chooser
# returns the next token to feed [batch, 1], or None to stop.
Chooser = Callable[[torch.Tensor, int], "torch.Tensor | None"]


@dataclass
class Trace:
    """What ``drive`` measured: the final state, times and KV sizes."""

    state: DecodeState
    ttft_s: float  # prefill + choosing the first token
    decode_s: float  # every step after that (the copy into static buffers included, the capture not)
    step_times_s: list[float]
    peak_memory_bytes: int
    kv_tokens_prefill: list[int]
    kv_bytes_prefill: int
    kv_tokens_final: list[int]
    kv_bytes_final: int
    decode_path: str  # "graph" (static buffers, captured step), "static" (static buffers, no graph) or "eager"
    capture_s: float = 0.0  # one-off cost of capturing the step (0 when a captured decoder was reused)
    real_entries_prefill: list[int] | None = None  # batches: real (non-pad) KV entries per row, first layer
    real_entries_final: list[int] | None = None


def record_kept_per_layer(state: DecodeState, prompt_tokens: int) -> None:
    """``state.details["kept_per_layer"]`` for a one-prompt prefill into an eviction cache: ``{"layers": [layer
    indices], "kv_heads": h, "counts": [[per prompt position, how many of the layer's h KV heads hold it], ...]}``
    (``EvictionCache.prompt_coverage``); nothing for other caches (full attention, GemFilter: ``kept_indices``)."""
    if not isinstance(state.cache, EvictionCache) or state.kv_mask is not None:
        return
    layers, heads, counts = state.cache.prompt_coverage(prompt_tokens)
    state.details["kept_per_layer"] = {"layers": layers, "kv_heads": heads, "counts": counts.tolist()}


DECODE_MODES = ("auto", "static", "eager")


def supports_static(model: PreTrainedModel, cache: Any, method: Method | str) -> str | None:
    """``None`` when ``method`` (an instance or a registered name) decodes on the static path with this model and
    cache, else the reason it cannot: asked from the method's ``capabilities.static_decode``."""
    if isinstance(method, str):
        name, caps = method, METHODS[method].capabilities if method in METHODS else Capabilities()
    else:
        name, caps = method.name, method.capabilities
    if caps.static_decode is None:
        return f"{name} evicts or re-selects while decoding (eager path)"
    if caps.static_decode == "evict" and getattr(cache, "pad_counts", None):
        return f"{name} decodes a left-padded batch on the eager path (its sinks differ per row)"
    return model_refusal(model, cache)


def __getattr__(name: str) -> Any:
    if name == "STATIC_METHODS":  # the registered methods that decode on the static path
        return tuple(n for n in METHODS if METHODS[n].capabilities.static_decode is not None)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def drive(
    model: PreTrainedModel,
    run: Prepared,
    choose: Chooser,
    max_steps: int,
    decode: str = "auto",
    decoders: DecoderPool | None = None,
) -> Trace:
    """Prefill, then step while ``choose`` returns a token: the one loop behind every entry point.

    Greedy generation chooses the argmax; continuation scoring (teacher forcing) chooses the
    next target token; ``max_steps`` bounds the steps after the prefill. Timing is
    device-synchronised: the first choice closes the TTFT, and each step is timed whole.

    ``decode``: ``"auto"`` decodes on static KV buffers with a captured step (``tokensieve.decode.static``)
    where the method and model allow it and on the eager path otherwise; ``"static"`` insists
    (``InputError`` where unsupported); ``"eager"`` runs the method's own ``step``. ``decoders``
    keeps captured steps across calls (one capture per capacity bucket); without it a capture is
    made for this call alone. Its cost is reported as ``capture_s``, never as decode time.
    """
    if decode not in DECODE_MODES:
        raise InputError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    m, device = run.method, model.device
    with torch.inference_mode(), PeakMemory(device) as mem:
        synchronize(device)
        t0 = time.perf_counter()
        if run.attention_mask is None:
            state = m.prefill(model, run.input_ids)
        else:
            state = m.prefill_batch(model, run.input_ids, run.attention_mask)
        token = choose(state.logits, 0)
        synchronize(device)
        ttft = time.perf_counter() - t0
        kv_pre, kv_bytes_pre = cache_stats(state.cache)
        rows_pre = state.real_entries()
        if run.record_selection:
            record_kept_per_layer(state, int(run.input_ids.shape[1]))
        decoder, capture_s, path = None, 0.0, "eager"
        own = m.capabilities.static_decode == "own"  # e.g. LazyLLM (re-selects its tokens at every step)
        if token is not None and max_steps > 0 and decode != "eager":
            why = supports_static(model, state.cache, m)
            if why is not None and decode == "static":
                raise InputError(f"static decoding is not available here: {why}")
            if why is None:
                pool = decoders if decoders is not None else DecoderPool(model)
                evicts = m.capabilities.static_decode == "evict"
                policy = without_needless_eviction(m.slot_policy() if evicts else None, max(kv_pre), max_steps)
                if own:
                    decoder, made = m.static_decoder(pool, state, max_steps)
                else:
                    decoder, made = pool.get(
                        run.input_ids.shape[0], decoder_size(policy, max(kv_pre), max_steps), slot_state_for(policy)
                    )
                if made:
                    decoder.capture()
                    capture_s = decoder.capture_s
                path = "graph" if decoder.use_graph else "static"
        t1 = t_step = time.perf_counter()
        if decoder is not None:
            if own:
                m.load_static(decoder, state, max_steps)
            else:
                decoder.load(
                    state.cache,
                    state.next_position if state.positions is None else state.positions,
                    max_steps,
                    state.kv_mask,
                    policy,
                )
            state.cache = None  # the static buffers hold it now; free the prefill's copy
        steps: list[float] = []
        while token is not None and len(steps) < max_steps:
            logits = decoder.step(token) if decoder is not None else m.step(model, state, token)
            token = choose(logits, len(steps) + 1)
            synchronize(device)
            now = time.perf_counter()
            steps.append(now - t_step)
            t_step = now
        decode_s = time.perf_counter() - t1
        if decoder is not None:
            if own:
                state.details.update(decoder.details())
            kv_fin = decoder.entries()
            per_entry = kv_bytes_pre / max(1, sum(kv_pre))
            kv_bytes_fin = int(round(per_entry * sum(kv_fin)))
            rows_fin = None if rows_pre is None else [r + len(steps) for r in rows_pre]
        else:
            kv_fin, kv_bytes_fin = cache_stats(state.cache)
            rows_fin = state.real_entries()
    return Trace(
        state,
        ttft,
        decode_s,
        steps,
        mem.peak_bytes,
        kv_pre,
        kv_bytes_pre,
        kv_fin,
        kv_bytes_fin,
        path,
        capture_s,
        rows_pre,
        rows_fin,
    )


def kept_tokens(state: DecodeState, prompt_tokens: int) -> int:
    """Prompt tokens the model computed its output from (selection methods report fewer)."""
    kept = state.kept_indices
    return int(kept.numel()) if kept is not None else int(state.details.get("kept_tokens", prompt_tokens))


# Temperatures below this are greedy (vLLM's threshold): dividing logits by a tiny or denormal temperature
# overflows to inf, and inf - inf is NaN in the softmax.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits: greedy when ``temperature`` is 0 (the default) or
    below ``GREEDY_BELOW_TEMPERATURE``.

    ``temperature`` > 0 samples from ``softmax(logits / temperature)`` restricted to the ``top_k``
    most likely tokens (0: no limit) and to the smallest set whose probability reaches ``top_p``
    (1.0: no limit); ``seed`` makes the draw reproducible.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        t, p, k = self.temperature, self.top_p, self.top_k
        check_number("temperature", t, 0, note=" (0 = greedy)")
        check_number("top_p", p, 0, 1, above=True)
        check_int("top_k", k, 0, note=" (0 = no limit)")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64
        ):
            raise InputError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def batches_with(self, other: Sampling) -> bool:
        """Whether two requests may share one ``generate_batch`` run (which draws with one setting and one
        generator): both greedy (``top_p``/``top_k`` do not matter then), or the same temperature, top_p
        and top_k with no seed (a seeded request must draw as it would alone, so it runs alone)."""
        if self.greedy or other.greedy:
            return self.greedy and other.greedy
        return (
            self.seed is None
            and other.seed is None
            and (self.temperature, self.top_p, self.top_k) == (other.temperature, other.top_p, other.top_k)
        )

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The next token [batch, 1] from logits [batch, vocab]."""
        if self.greedy:
            return logits.argmax(dim=-1, keepdim=True)
        x = logits.float() / self.temperature
        if 0 < self.top_k < x.shape[-1]:
            kth = torch.topk(x, self.top_k, dim=-1).values[..., -1:]  # [batch, 1]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_x, order = torch.sort(x, dim=-1, descending=True)
            probs = sorted_x.softmax(dim=-1)
            # drop a token when the tokens before it already reach top_p; the most likely one always stays
            # (a top_p below float32's smallest value compares as 0, which would drop every token)
            drop = probs.cumsum(dim=-1) - probs >= self.top_p
            drop[..., 0] = False
            x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
        probs = x.softmax(dim=-1)
        bad = ~torch.isfinite(probs).all(dim=-1, keepdim=True)  # e.g. logits that are all -inf or NaN
        if bool(bad.any()):
            probs = torch.where(
                bad, F.one_hot(logits.float().nan_to_num(-float("inf")).argmax(-1), x.shape[-1]).to(probs), probs
            )
        return torch.multinomial(probs, 1, generator=generator)


def check_max_new_tokens(max_new_tokens: Any, model: PreTrainedModel | None = None, allow_long: bool = False) -> None:
    """An int >= 1, and (given ``model``, unless ``allow_long``) at most the model's maximum positions: the
    decoding buffers are sized by it, so a huge value would try to allocate them."""
    check_int("max_new_tokens", max_new_tokens, 1)
    limit = max_positions(model) if model is not None else None
    if limit is not None and max_new_tokens > limit and not allow_long:
        raise InputError(
            f"max_new_tokens must be at most the model's maximum of {limit} positions, got {max_new_tokens} "
            f"(allow_long=True / --allow-long to run anyway)"
        )


def check_call(sampling: Any, on_token: Any, allow_long: Any) -> None:
    """``InputError`` for arguments of ``generate`` / ``generate_batch`` of the wrong type."""
    if sampling is not None and not isinstance(sampling, Sampling):
        raise InputError(f"sampling must be a tokensieve.Sampling (or None for greedy), got {type(sampling).__name__}")
    if on_token is not None and not callable(on_token):
        raise InputError(f"on_token must be a function (or None), got {type(on_token).__name__}")
    if not isinstance(allow_long, bool):
        raise InputError(f"allow_long must be True or False, got {allow_long!r}")


def row_limits(
    max_new_tokens: Any, rows: int, model: PreTrainedModel | None = None, allow_long: bool = False
) -> list[int]:
    """``generate_batch``'s ``max_new_tokens`` (one int for every row, or one per row) as a list of ``rows`` ints."""
    if isinstance(max_new_tokens, (str, bytes)) or not isinstance(max_new_tokens, Sequence):
        check_max_new_tokens(max_new_tokens, model, allow_long)
        return [max_new_tokens] * rows
    if len(max_new_tokens) != rows:
        raise InputError(
            f"max_new_tokens has {len(max_new_tokens)} values for {rows} prompts; give one per prompt or one int"
        )
    for i, limit in enumerate(max_new_tokens):
        try:
            check_max_new_tokens(limit, model, allow_long)
        except InputError as exc:
            raise InputError(f"prompt {i}: {exc}") from None
    return list(max_new_tokens)


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_or_messages: str | Messages | torch.Tensor | Prepared,
    method: str | Method = "full",
    max_new_tokens: int = 64,
    allow_long: bool = False,
    sampling: Sampling | None = None,
    on_token: Callable[[int], bool | None] | None = None,
    decode: str = "auto",
    decoders: DecoderPool | None = None,
    **method_params: Any,
) -> GenerationResult:
    """Answer a prompt with ``method`` and measure it.

    ``prompt_or_messages`` is a string, a list of chat messages, or token ids
    [1, n] (used as they are), or a ``Prepared`` from ``prepare`` (run as it is: no method or parameters
    with it; its length was checked when it was prepared). ``method_params`` go to the method's dataclass
    (e.g. ``topk=512`` for GemFilter). Decoding is greedy unless ``sampling``
    says otherwise (``Sampling(temperature=0.7, top_p=0.9, seed=0)``).
    ``on_token(token_id)`` is called with each token as soon as it is chosen (streaming); when it
    returns ``False`` generation stops there (e.g. the client went away). ``decode`` and
    ``decoders``: see ``drive`` (static KV buffers and a captured step where supported).
    """
    check_call(sampling, on_token, allow_long)
    check_max_new_tokens(max_new_tokens, model, allow_long)
    sampling = sampling or Sampling()
    if isinstance(prompt_or_messages, Prepared):
        run = _given(prompt_or_messages, method, method_params)
        if run.attention_mask is not None or run.input_ids.shape[0] != 1:
            raise InputError("generate answers one prompt; a prepared batch goes to generate_batch")
    else:
        run = prepare(model, tokenizer, prompt_or_messages, method, allow_long, **method_params)
    stops = stop_token_ids(model, tokenizer)
    out_ids: list[int] = []
    gen = sampling.generator(model.device)

    def next_token(logits: torch.Tensor, i: int) -> torch.Tensor | None:
        token = sampling.choose(logits, gen)  # [1, 1]
        out_ids.append(int(token))
        if on_token is not None and out_ids[-1] not in stops and on_token(out_ids[-1]) is False:
            return None
        return None if len(out_ids) >= max_new_tokens or out_ids[-1] in stops else token

    tr = drive(model, run, next_token, max_new_tokens - 1, decode, decoders)
    n, kept = run.input_ids.shape[1], tr.state.kept_indices
    return _result(
        run,
        tr,
        tokenizer,
        stops,
        out_ids,
        prompt_tokens=n,
        kept_tokens=kept_tokens(tr.state, n),
        kept=kept,
        kv=(tr.kv_tokens_prefill, tr.kv_tokens_final, tr.kv_bytes_prefill, tr.kv_bytes_final),
        decode_s=tr.decode_s,
        step_times_s=tr.step_times_s,
    )


def _result(
    run: Prepared,
    tr: Trace,
    tokenizer: PreTrainedTokenizerBase,
    stops: set[int],
    out_ids: list[int],
    *,
    prompt_tokens: int,
    kept_tokens: int,
    kept: torch.Tensor | None,
    kv: tuple[list[int], list[int], int, int],
    decode_s: float,
    step_times_s: list[float],
    details: dict[str, Any] | None = None,
) -> GenerationResult:
    """One prompt's ``GenerationResult`` from a ``drive`` trace: its tokens, KV (prefill/final entries, bytes),
    decode time and step times (``generate`` and each row of ``generate_batch``)."""
    kv_pre, kv_fin, bytes_pre, bytes_fin = kv
    text_ids = [t for t in out_ids if t not in stops]
    return GenerationResult(
        text=tokenizer.decode(text_ids, skip_special_tokens=True).strip(),
        method=run.method.name,
        params=run.method.params(),
        prompt_tokens=prompt_tokens,
        kept_tokens=kept_tokens,
        ttft_s=tr.ttft_s,
        decode_tokens_per_s=(len(out_ids) - 1) / decode_s if len(out_ids) > 1 and decode_s > 0 else None,
        peak_memory_bytes=tr.peak_memory_bytes,
        kv_tokens_prefill=kv_pre,
        kv_tokens_final=kv_fin,
        kv_bytes_prefill=bytes_pre,
        kv_bytes_final=bytes_fin,
        generated_tokens=len(out_ids),
        token_ids=out_ids,
        kept_indices=kept.tolist() if kept is not None else None,
        details=dict(tr.state.details) | {"decode_path": tr.decode_path, "capture_s": tr.capture_s} | (details or {}),
        step_times_s=step_times_s,
    )


def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt] | Sequence[Prepared],
    method: str | Method = "full",
    max_new_tokens: int | Sequence[int] = 64,
    allow_long: bool = False,
    sampling: Sampling | None = None,
    on_token: Callable[[int, int], bool | None] | None = None,
    decode: str = "auto",
    decoders: DecoderPool | None = None,
    **method_params: Any,
) -> list[GenerationResult]:
    """Answer several prompts at once: one ``GenerationResult`` per prompt, in order.

    Prompts (strings, chat messages or 1-D / [1, n] token ids; or ``Prepared`` runs of one prompt each, from
    ``prepare``, all of one method and parameters, run as they are) are left-padded into one batch; each
    row's positions start at 0 at its first real token and pads are never attended to, so every row
    gets the tokens it would get alone (greedy). Each row stops at its own EOS or ``max_new_tokens``;
    finished rows keep stepping (their tokens are not recorded) until every row is done. Batches run
    with full attention, GemFilter (per-prompt filter pass, one batched second pass), SnapKV (``budget``
    real entries per row) and StreamingLLM (per-row sinks); other methods take one prompt
    (``InputError`` otherwise). ``ttft_s`` is the batch's prefill; ``details["batch_tokens_per_s"]`` is
    the batch's throughput (all generated tokens / the whole run's time).

    ``max_new_tokens`` is one limit for every row or one per row (a server batches requests that ask
    for different lengths). ``on_token(row, token_id)`` is ``generate``'s streaming callback per row:
    called with each row's tokens as they are chosen (not with its end-of-sequence token); returning
    ``False`` stops that row only. A stopped row's later tokens are neither recorded nor reported, and
    no row's tokens depend on when another row stops (rows never attend to each other).

    Sampling is one setting for the whole batch, drawn from one generator: greedy rows get their own
    prompt's tokens, but a sampled row's draw depends on the batch, so ``seed`` reproduces the batch, not
    a row alone. Batch only requests whose settings ``Sampling.batches_with`` allows (all greedy, or the
    same temperature, top_p and top_k with no seed).
    """
    check_call(sampling, on_token, allow_long)
    sampling = sampling or Sampling()
    if not isinstance(max_new_tokens, Sequence):
        check_max_new_tokens(max_new_tokens, model, allow_long)  # before the prompts are encoded, as generate does
    if (
        isinstance(prompts, Sequence)
        and not isinstance(prompts, str)
        and prompts
        and all(isinstance(p, Prepared) for p in prompts)
    ):
        for p in prompts:
            _given(p, method, method_params)
        run = join_prepared(prompts)
    else:
        run = prepare_batch(model, tokenizer, prompts, method, allow_long, **method_params)
    rows = run.input_ids.shape[0]
    limits = row_limits(max_new_tokens, rows, model, allow_long)
    stops = stop_token_ids(model, tokenizer)
    outs: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    gen = sampling.generator(model.device)

    def next_token(logits: torch.Tensor, i: int) -> torch.Tensor | None:
        token = sampling.choose(logits, gen)  # [batch, 1]
        for b, t in enumerate(token[:, 0].tolist()):
            if done[b]:
                continue
            outs[b].append(t)
            stopped = on_token is not None and t not in stops and on_token(b, t) is False
            done[b] = stopped or len(outs[b]) >= limits[b] or t in stops
        return None if all(done) else token

    tr = drive(model, run, next_token, max(limits) - 1, decode, decoders)
    state = tr.state
    mask = run.attention_mask
    lengths = mask.sum(-1).tolist() if mask is not None else [run.input_ids.shape[1]]  # prompt tokens per row
    total = sum(len(o) for o in outs)
    wall = tr.ttft_s + tr.decode_s
    batch_details = {
        "batch_size": rows,
        "batch_generated_tokens": total,
        "batch_tokens_per_s": total / wall if wall > 0 else None,
    }
    n_layers = len(tr.kv_tokens_prefill)
    results = []
    for b, out_ids in enumerate(outs):
        if tr.real_entries_prefill is None:  # one prompt: the cache is its own
            kv_pre, kv_fin, bytes_pre, bytes_fin = (
                tr.kv_tokens_prefill,
                tr.kv_tokens_final,
                tr.kv_bytes_prefill,
                tr.kv_bytes_final,
            )
        else:  # this row's real entries (every layer holds as many), and its share of the bytes
            per_entry = tr.kv_bytes_prefill / max(1, rows * sum(tr.kv_tokens_prefill))
            kv_pre = [tr.real_entries_prefill[b]] * n_layers
            kv_fin = [tr.real_entries_final[b]] * n_layers if tr.real_entries_final is not None else kv_pre
            bytes_pre, bytes_fin = int(round(per_entry * sum(kv_pre))), int(round(per_entry * sum(kv_fin)))
        if state.kept_rows is not None:
            kept = state.kept_rows[b]
        elif rows == 1:
            kept = state.kept_indices
        else:
            kept = None
        n_steps = len(out_ids) - 1
        results.append(
            _result(
                run,
                tr,
                tokenizer,
                stops,
                out_ids,
                prompt_tokens=lengths[b],
                kept_tokens=int(kept.numel()) if kept is not None else kept_tokens(state, lengths[b]),
                kept=kept,
                kv=(kv_pre, kv_fin, bytes_pre, bytes_fin),
                decode_s=sum(tr.step_times_s[:n_steps]),
                step_times_s=tr.step_times_s[:n_steps],
                details=batch_details,
            )
        )
    return results


@dataclass
class ContinuationScore:
    """Negative log-likelihood of a continuation given a prompt compressed by a method."""

    method: str
    params: dict[str, Any]
    nll: list[float]  # per continuation token, nats
    prompt_tokens: int
    kept_tokens: int
    ttft_s: float
    decode_tokens_per_s: float | None
    peak_memory_bytes: int
    kv_tokens_prefill: list[int]
    kv_bytes_prefill: int

    @property
    def kv_kept(self) -> int | None:
        """KV entries kept after the prefill (``kv_kept_of``)."""
        return kv_kept_of(self.kv_tokens_prefill)

    @property
    def total_nll(self) -> float:
        return float(sum(self.nll))


def score_continuation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    prompt: str | Messages | torch.Tensor,
    continuation: Sequence[int] | torch.Tensor,
    method: str | Method = "full",
    allow_long: bool = False,
    decode: str = "auto",
    decoders: DecoderPool | None = None,
    **method_params: Any,
) -> ContinuationScore:
    """Teacher forcing through ``method``: prefill ``prompt``, then feed the continuation's tokens one
    at a time through the method's decoding step, scoring each by the logits before it.

    With full attention this is the model's plain NLL of the continuation given the prompt.
    """
    target = torch.as_tensor(continuation, dtype=torch.long).reshape(-1)
    if target.numel() == 0:
        raise InputError("the continuation to score is empty")
    run = prepare(model, tokenizer, prompt, method, allow_long, **method_params)
    target = target.to(model.device)
    nll: list[torch.Tensor] = []

    def forced(logits: torch.Tensor, i: int) -> torch.Tensor | None:
        nll.append(F.cross_entropy(logits.float(), target[i : i + 1]))
        return target[i : i + 1].view(1, 1) if i + 1 < target.numel() else None

    tr = drive(model, run, forced, target.numel() - 1, decode, decoders)
    n, steps = run.input_ids.shape[1], len(tr.step_times_s)
    return ContinuationScore(
        method=run.method.name,
        params=run.method.params(),
        nll=torch.stack(nll).tolist(),
        prompt_tokens=n,
        kept_tokens=kept_tokens(tr.state, n),
        ttft_s=tr.ttft_s,
        decode_tokens_per_s=steps / tr.decode_s if steps and tr.decode_s > 0 else None,
        peak_memory_bytes=tr.peak_memory_bytes,
        kv_tokens_prefill=tr.kv_tokens_prefill,
        kv_bytes_prefill=tr.kv_bytes_prefill,
    )


def open_stream(
    model: PreTrainedModel,
    policy: StreamPolicy,
    tokenizer: PreTrainedTokenizerBase | None = None,
    separator_ids: torch.Tensor | None = None,
    chunk_size: int = 64,
    allow_long: bool = False,
) -> Streamer:
    """prepare -> validate for streaming through a bounded, position-shifted cache (``tokensieve stream``).

    Separator ids come from the tokenizer for SepLLM's cache unless given; the policy and the chunk size
    are checked against the model's maximum position. Feed the stream with ``feed_stream``.
    """
    policy.validate()
    check_int("chunk_size", chunk_size, 1)
    if separator_ids is None and tokenizer is not None and policy.needs_separators:
        separator_ids = separator_token_ids(tokenizer)
    streamer = Streamer(model, policy, separator_ids, allow_long=allow_long)
    cap, limit = policy.capacity, streamer.max_positions
    if cap is not None and limit is not None and cap + chunk_size > limit and not allow_long:
        raise InputError(
            f"budget + chunk_size = {cap} + {chunk_size} passes the model's maximum of {limit} positions; "
            f"use a smaller cache or chunk"
        )
    return streamer


def feed_stream(
    streamer: Streamer, token_ids: torch.Tensor, chunk_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Feed ``token_ids`` [N] chunk by chunk; yields (chunk [C], its logits [C, vocab] float32).

    Stops early, with ``streamer.stopped`` saying why, where full attention reaches the model's maximum position.
    """
    ids = token_ids.reshape(-1)
    for pos in range(0, ids.numel(), chunk_size):
        chunk = ids[pos : pos + chunk_size]
        try:
            logits = streamer.feed(chunk)
        except ContextFullError as exc:
            streamer.stopped = str(exc)
            return
        yield chunk, logits


def selection_text(
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor | list[int],
    kept_indices: list[int],
    gap: str = " [...] ",
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
