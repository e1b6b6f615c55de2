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

import functools
import inspect
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from transformers import Cache, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase


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


@dataclass(frozen=True)
class DeviceEviction:
    """How a method evicts while decoding (``tokensieve.decode.static`` does it on the device).

    kind: ``"ring"`` (the first ``n_keep`` entries stay, then the newest; ``budget`` in all), ``"heavy"``
    (the ``n_keep`` newest stay, then the most attended-to; ``budget`` in all) or ``"separators"`` (the
    first ``n_keep`` tokens, every token in ``separator_ids`` and the ``window`` tokens before the next one
    stay: SepLLM; no fixed budget).
    """

    kind: str
    budget: int = 0
    n_keep: int = 0
    window: int = 0
    separator_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        ok = {
            "ring": 0 <= self.n_keep < self.budget,
            "heavy": 0 <= self.n_keep <= self.budget and self.budget >= 1,
            "separators": self.n_keep >= 0 and self.window >= 0,
        }.get(self.kind, False)
        if not ok:
            raise ValueError(f"bad DeviceEviction {self}")


class Method:
    """Base class. Subclasses are dataclasses whose fields are the method's parameters.

    ``renamed`` maps a parameter's old name to its current one: ``make_method`` still
    accepts the old name for one release, with a deprecation message.
    """

    name: ClassVar[str] = "base"
    renamed: ClassVar[dict[str, str]] = {}

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Called by the runner before ``validate``/``prefill``: derive what needs the tokenizer (e.g. SepLLM's separators)."""

    def validate(self, model: PreTrainedModel, prompt_len: int) -> None:
        """Raise ``ValueError`` naming the bad parameter, given the model and prompt length."""

    def prefill(self, model: PreTrainedModel, input_ids: torch.Tensor) -> DecodeState:
        raise NotImplementedError

    def prefill_batch(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DecodeState:
        """Prefill a left-padded batch: ``input_ids`` [batch, n], ``attention_mask`` [batch, n] (1 = real token).

        Each row's positions start at 0 at its first real token; the state carries ``kv_mask`` and
        ``positions``. Methods that cannot run rows together keep this default, which refuses.
        """
        raise batch_refused(self.name)

    def forward_kwargs(self, state: DecodeState) -> dict[str, Any]:
        """Extra keyword arguments for decoding forwards (e.g. an attention hook)."""
        return {}

    def decode_eviction(self) -> DeviceEviction | None:
        """How decoding evicts, for the static path (``tokensieve.decode.static.DeviceEviction``); ``None`` when the
        cache only grows after the prefill."""
        return None

    def step(self, model: PreTrainedModel, state: DecodeState, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed ``token_ids`` [batch, 1]; return the next logits [batch, vocab].

        Batches (``state.kv_mask`` set) pass the mask of the real entries, one column longer per step,
        and each row's own position.
        """
        batch: dict[str, Any] = {}
        if state.kv_mask is not None and state.positions is not None:
            state.kv_mask = torch.cat([state.kv_mask, state.kv_mask.new_ones(token_ids.shape)], dim=-1)  # [b, entries + 1]
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
                FutureWarning, stacklevel=stacklevel,
            )
            if new in params:
                raise InputError(f"{what}: give {new!r} or its old name {key!r}, not both")
            key = new
        out[key] = value
    bad = sorted(set(out) - set(allowed))
    if bad:
        raise InputError(f"{what} has no parameter(s) {', '.join(bad)}; its parameters are: {', '.join(allowed) or 'none'}")
    return out


def full_prefill(
    model: PreTrainedModel, input_ids: torch.Tensor, cache: Cache | None = None, **kwargs: Any
) -> DecodeState:
    """Plain prefill of ``input_ids`` [batch, n] at positions 0..n-1 into ``cache``."""
    cache = cache if cache is not None else DynamicCache(config=model.config)
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **cache_kwarg(model, cache), **kwargs)
    return DecodeState(logits=out.logits[:, -1], cache=cache, next_position=input_ids.shape[1])


# Methods that prefill several left-padded prompts as one batch (``prefill_batch``).
BATCH_METHODS = ("full", "gemfilter", "snapkv", "streamingllm")


def batch_refused(method_name: str) -> ValueError:
    """The ``InputError`` for a method that runs one prompt at a time, given several (the one message)."""
    from tokensieve.errors import InputError

    return InputError(f"{method_name} runs one prompt at a time; batches: {', '.join(BATCH_METHODS)}")


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
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Cache | None = None, **kwargs: Any
) -> DecodeState:
    """Plain prefill of a left-padded batch ``input_ids`` [batch, n] with ``attention_mask`` [batch, n]:
    each row at positions 0..len-1 of its real tokens; pads are never attended to."""
    mask = attention_mask.bool()
    state = full_prefill(model, input_ids, cache, attention_mask=mask.long(), position_ids=row_positions(mask), **kwargs)
    state.kv_mask = mask
    state.positions = mask.sum(-1, keepdim=True)  # [batch, 1]: the next position of each row
    return state


def cache_kwarg(module: torch.nn.Module, cache: Cache | None) -> dict[str, Any]:
    """``{keyword: cache}`` for calling ``module`` (a model or a decoder layer) with a KV cache.

    transformers 5.24 renamed the ``past_key_values`` argument of models and decoder
    layers to ``cache`` (the old name warns, and goes in 5.40); older 5.x releases know only
    ``past_key_values``. The name is read from the module's own ``forward`` signature, so
    every call site passes the cache under the keyword the installed release expects.
    The cache object is updated in place either way; callers keep their own reference to it.
    """
    return {_cache_keyword(type(module)): cache}


@functools.cache
def _cache_keyword(cls: type) -> str:
    """The cache keyword of ``cls.forward`` (a fact about the class: memoised, never changes)."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


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


def num_layers(model: PreTrainedModel) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


def has_sliding_layers(model: PreTrainedModel) -> bool:
    """Whether some of the model's layers attend over a sliding window only (Gemma 3, Qwen2 with
    ``use_sliding_window``), from its config."""
    cfg = model.config.get_text_config()
    kinds = getattr(cfg, "layer_types", None) or []
    return any(t != "full_attention" for t in kinds) or bool(getattr(cfg, "use_sliding_window", False))


def max_positions(model: PreTrainedModel) -> int | None:
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)
