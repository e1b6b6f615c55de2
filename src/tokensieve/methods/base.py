"""The contract every method implements, and helpers they share.

A method turns a prompt into (a) the logits of the first generated token and
(b) a state from which further tokens are decoded. The runner owns timing,
memory measurement and the greedy loop; a method owns only what is special
about it. Three kinds of method fit this one contract:

* prompt selection (GemFilter): ``prefill`` picks tokens, then runs the model;
* KV eviction (SnapKV, H2O, StreamingLLM, SepLLM): ``prefill`` returns a
  ``transformers`` ``Cache`` that keeps only some entries;
* pruning inside the forward (LazyLLM): ``prefill`` and ``step`` run their own
  layer loop.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from transformers import Cache, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from tokensieve.core.hf import cache_kwarg, has_sliding_layers, max_positions, num_layers  # noqa: F401  (re-exported)
from tokensieve.decode.slots import SlotPolicy


@dataclass
class DecodeState:
    """What a method hands back after prefill and updates at every step."""

    logits: torch.Tensor  # [batch, vocab]: logits for the next token
    cache: Cache | None
    next_position: int  # position id the next fed token gets
    kept_indices: torch.Tensor | None = None  # [kept] prompt indices the model computed on (selection methods)
    details: dict[str, Any] = field(default_factory=dict)
    # Batches (left-padded rows; ``None`` for one prompt):
    kv_mask: torch.Tensor | None = None  # [batch, entries] bool: which cache entries are real (pads never are)
    positions: torch.Tensor | None = None  # [batch, 1] int64: position id of each row's next fed token
    kept_rows: list[torch.Tensor] | None = None  # per row [kept] prompt indices (within the row's real tokens)

    def real_entries(self) -> list[int] | None:
        """Real (non-pad) KV entries per row (first layer), or ``None`` for one prompt. Reads the device."""
        valid = getattr(self.cache, "valid_mask", None)
        mask = valid() if callable(valid) and self.kv_mask is not None else self.kv_mask
        return None if mask is None else mask.sum(-1).tolist()


STATIC_DECODES = ("grow", "evict", "own")


@dataclass(frozen=True)
class Capabilities:
    """What a method can do, declared once on its class. The driver, the static decoder, the prefix cache,
    the server, the CLI and the vLLM integration ask this record; none of them lists method names.

    batch: ``prefill_batch`` runs several left-padded prompts together (``generate_batch``, the server's
        batches); otherwise the method runs one prompt at a time.
    static_decode: how decoding runs on static KV buffers with a captured step: ``"grow"`` (the cache only
        grows after the prefill), ``"evict"`` (the static decoder evicts by the method's ``slot_policy()``),
        ``"own"`` (the method's own static decoder: ``static_decoder`` / ``load_static``), ``None`` (eager only).
    prefix_reuse: a prefix cache (``PrefixReuse``) can take the prompt's prefix from a store
        (``prefix_refusal`` / ``prefix_prefill`` say how for an instance).
    selects_prompt: its effect is a filter pass that picks prompt tokens (``select``) which then run at fresh
        positions 0..k-1 (``kept_indices`` reported).
    prompt_only: its whole effect is the token ids it feeds the model (all of them, or the selected ones): an
        engine that takes token ids (vLLM) can run the answer pass.
    """

    batch: bool = False
    static_decode: str | None = None
    prefix_reuse: bool = False
    selects_prompt: bool = False
    prompt_only: bool = False

    def __post_init__(self) -> None:
        if self.static_decode is not None and self.static_decode not in STATIC_DECODES:
            raise ValueError(f"static_decode must be one of {STATIC_DECODES} or None, got {self.static_decode!r}")


class Method:
    """Base class. Subclasses are dataclasses whose fields are the method's parameters.

    ``renamed`` maps a parameter's old name to its current one: ``make_method`` still
    accepts the old name for one release, with a deprecation message. ``capabilities`` says what
    the method can do (:class:`Capabilities`); the default is the least: one prompt, eager decoding.
    """

    name: ClassVar[str] = "base"
    renamed: ClassVar[dict[str, str]] = {}
    capabilities: ClassVar[Capabilities] = Capabilities()

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Called by the runner before ``validate``/``prefill``: derive what needs the tokenizer (e.g. SepLLM's separators)."""

    def validate(self, model: PreTrainedModel, prompt_len: int) -> None:
        """Raise ``ValueError`` naming the bad parameter, given the model and prompt length."""

    def prefill(self, model: PreTrainedModel, input_ids: torch.Tensor) -> DecodeState:
        raise NotImplementedError

    def prefill_batch(
        self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> DecodeState:
        """Prefill a left-padded batch: ``input_ids`` [batch, n], ``attention_mask`` [batch, n] (1 = real token).

        Each row's positions start at 0 at its first real token; the state carries ``kv_mask`` and
        ``positions``. Methods that cannot run rows together keep this default, which refuses.
        """
        raise batch_refused(self.name)

    def forward_kwargs(self, state: DecodeState) -> dict[str, Any]:
        """Extra keyword arguments for decoding forwards (e.g. an attention hook)."""
        return {}

    def slot_policy(self) -> SlotPolicy | None:
        """``capabilities.static_decode == "evict"``: how decoding evicts on the static path, a
        ``tokensieve.decode.slots.SlotPolicy`` defined next to the method's eager rule; ``None`` when the cache
        only grows after the prefill."""
        return None

    def static_decoder(self, pool: Any, state: DecodeState, max_new_tokens: int) -> tuple[Any, bool]:
        """``capabilities.static_decode == "own"``: the method's own static decoder for ``state`` from ``pool``
        (a ``decode.static.DecoderPool``) and whether it was just made (then the driver captures it)."""
        raise NotImplementedError(f"{self.name} has no static decoder of its own")

    def load_static(self, decoder: Any, state: DecodeState, max_new_tokens: int) -> None:
        """``capabilities.static_decode == "own"``: load the prefill's ``state`` into ``decoder`` (from
        ``static_decoder``); the decoder's ``details()`` join the result's details after decoding."""
        raise NotImplementedError(f"{self.name} has no static decoder of its own")

    def prefill_cache(self, model: PreTrainedModel, input_ids: torch.Tensor) -> tuple[Cache, dict[str, Any]]:
        """The cache a prefill of ``input_ids`` [1, n] fills and the forward's extra keyword arguments (e.g. an
        attention hook): a plain ``DynamicCache`` and none by default."""
        return DynamicCache(config=model.config), {}

    # -- prefix reuse (``capabilities.prefix_reuse``; asked by ``engine.prefix_cache.PrefixReuse``)

    def prefix_refusal(self) -> str | None:
        """Why this instance cannot take its prompt prefix from a prefix cache (its parameters), or None."""
        return None

    def prefix_net(self, model: PreTrainedModel) -> PreTrainedModel:
        """The model whose prefix state the prefix cache computes and keeps for this method (default: ``model``;
        GemFilter with a draft: the draft)."""
        return model

    def prefix_layers(self, model: PreTrainedModel) -> tuple[int, int]:
        """(key layers, value layers) of a stored prefix this method reads: every layer by default. More key
        layers than value layers: computing a prefix stops at layer ``value layers`` once its keys are known."""
        n = num_layers(model)
        return n, n

    def prefix_tail(self, n: int) -> int:
        """Of an ``n``-token prompt, the last tokens whose queries the prefill needs (computed even when their
        keys and values are cached): 1 by default."""
        return 1

    def prefix_prefill(self, model: PreTrainedModel, input_ids: torch.Tensor, prefix: Any) -> DecodeState:
        """``prefill`` of ``input_ids`` [1, n] with the leading tokens' state taken from ``prefix`` (an
        ``engine.prefix_cache.CachedPrefix``): the same state up to float rounding. By default the prompt's
        forward into ``prefill_cache``, seeded with the prefix, over the tokens after it (at their positions)."""
        n = input_ids.shape[1]
        start = prefix.take(self.prefix_tail(n))
        with torch.inference_mode():
            cache, kwargs = self.prefill_cache(model, input_ids)
            prefix.seed(cache)
            rest, pos = input_ids[:, start:], torch.arange(start, n, device=input_ids.device)[None]
            out = model(
                input_ids=rest,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **cache_kwarg(model, cache),
                **kwargs,
            )
        return prefix.finish(DecodeState(logits=out.logits[:, -1], cache=cache, next_position=n))

    def step(self, model: PreTrainedModel, state: DecodeState, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed ``token_ids`` [batch, 1]; return the next logits [batch, vocab].

        Batches (``state.kv_mask`` set) pass the mask of the real entries, one column longer per step,
        and each row's own position.
        """
        batch: dict[str, Any] = {}
        if state.kv_mask is not None and state.positions is not None:
            state.kv_mask = torch.cat(
                [state.kv_mask, state.kv_mask.new_ones(token_ids.shape)], dim=-1
            )  # [b, entries + 1]
            batch = {"attention_mask": state.kv_mask}
            pos = state.positions
        else:
            pos = torch.full_like(token_ids, state.next_position)
        out = model(
            input_ids=token_ids,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **batch,
            **cache_kwarg(model, state.cache),
            **self.forward_kwargs(state),
        )
        state.next_position += token_ids.shape[1]
        if state.positions is not None:
            state.positions = state.positions + token_ids.shape[1]
        state.logits = out.logits[:, -1]
        return state.logits

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)} if hasattr(self, "__dataclass_fields__") else {}


def rename_params(
    what: str, renamed: dict[str, str], allowed: list[str], params: dict[str, Any], stacklevel: int = 3
) -> dict[str, Any]:
    """``params`` with deprecated names (``renamed``: old -> new) replaced by current ones.

    Each old name gives a ``FutureWarning``; an old and a new name together, or a name not in
    ``allowed``, raise ``InputError``. ``what`` names the owner in messages (e.g. "h2o", "streaming sepllm").
    One rule for methods and streaming policies alike.
    """
    from tokensieve.errors import InputError

    out: dict[str, Any] = {}
    for key, value in params.items():
        new = renamed.get(key)
        if new is not None:
            warnings.warn(
                f"{what}: parameter {key!r} is now called {new!r}; the old name goes in the next release",
                FutureWarning,
                stacklevel=stacklevel,
            )
            if new in params:
                raise InputError(f"{what}: give {new!r} or its old name {key!r}, not both")
            key = new
        out[key] = value
    bad = sorted(set(out) - set(allowed))
    if bad:
        raise InputError(
            f"{what} has no parameter(s) {', '.join(bad)}; its parameters are: {', '.join(allowed) or 'none'}"
        )
    return out


def full_prefill(
    model: PreTrainedModel, input_ids: torch.Tensor, cache: Cache | None = None, **kwargs: Any
) -> DecodeState:
    """Plain prefill of ``input_ids`` [batch, n] at positions 0..n-1 into ``cache``."""
    cache = cache if cache is not None else DynamicCache(config=model.config)
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **cache_kwarg(model, cache), **kwargs)
    return DecodeState(logits=out.logits[:, -1], cache=cache, next_position=input_ids.shape[1])


def __getattr__(name: str) -> Any:
    if name == "BATCH_METHODS":  # the methods that prefill several left-padded prompts as one batch
        from tokensieve.methods.registry import capable

        return tuple(capable(batch=True))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def batch_refused(method_name: str) -> ValueError:
    """The ``InputError`` for a method that runs one prompt at a time, given several (the one message)."""
    from tokensieve.errors import InputError
    from tokensieve.methods.registry import capable

    return InputError(f"{method_name} runs one prompt at a time; batches: {', '.join(sorted(capable(batch=True)))}")


def row_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [batch, n] of a left-padded batch: 0 at each row's first real token (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D token ids of different lengths as a left-padded batch: (ids [batch, n], attention_mask [batch, n] bool)."""
    n = max(int(r.numel()) for r in rows)
    ids = rows[0].new_full((len(rows), n), pad_id)
    mask = torch.zeros(len(rows), n, dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        ids[i, n - r.numel() :] = r
        mask[i, n - r.numel() :] = True
    return ids, mask


def batch_prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: Cache | None = None,
    **kwargs: Any,
) -> DecodeState:
    """Plain prefill of a left-padded batch ``input_ids`` [batch, n] with ``attention_mask`` [batch, n]:
    each row at positions 0..len-1 of its real tokens; pads are never attended to."""
    mask = attention_mask.bool()
    state = full_prefill(
        model, input_ids, cache, attention_mask=mask.long(), position_ids=row_positions(mask), **kwargs
    )
    state.kv_mask = mask
    state.positions = mask.sum(-1, keepdim=True)  # [batch, 1]: the next position of each row
    return state


def cache_stats(cache: Cache | None) -> tuple[list[int], int]:
    """Per-layer KV entries and total KV bytes held by a cache (keys + values)."""
    if cache is None:
        return [], 0
    tokens, nbytes = [], 0
    for layer in getattr(cache, "layers", []):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if k is None or not torch.is_tensor(k) or k.numel() == 0:
            tokens.append(0)
            continue
        tokens.append(int(k.shape[-2]))
        nbytes += k.numel() * k.element_size() + v.numel() * v.element_size()
    return tokens, nbytes
