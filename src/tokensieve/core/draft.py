"""GemFilter's selection from a draft model: a small model of the target's tokenizer runs the filter pass.

SpecPrefill (Liu et al., "Speculative Prefill: Turbocharging TTFT with Lightweight and Training-Free Token
Importance Estimation", ICML 2025) lets a small model of the same tokenizer choose the prompt tokens a large
model then computes on. GemFilter is the self-drafting special case (the draft is the target's own first
``r + 1`` layers); ``GemFilter(filter_model=...)`` runs GemFilter's own filter pass, scoring and span rule on
the draft instead, and the target's second pass on the kept ids is unchanged (docs/gemfilter.md, "Selection
by a draft model").

A draft is given as a name or path (loaded with ``tokensieve.load_model`` on the target's device and dtype), a
model, a ``(model, tokenizer)`` pair or a :class:`DraftModel`. Its tokenizer must be the target's: the
vocabularies (token -> id) and the special token ids must be identical (:func:`check_same_tokenizer`). A model
given without its tokenizer is compared by its config (vocabulary size, bos/eos ids), the most that can be
checked without a tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokensieve.errors import InputError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
FILTER_LAYER_KEY = "tokensieve_filter_layer"  # config attribute of a filter-only model (integrations.filter_model)


def filter_layer_of(model: PreTrainedModel) -> int | None:
    """The filter layer a filter-only model was loaded for (``integrations.filter_model``; None for a full model)."""
    value = getattr(model.config, FILTER_LAYER_KEY, None)
    return int(value) if value is not None else None


def input_device(model: PreTrainedModel) -> torch.device:
    """Where the token ids go: the device of the input embeddings (the first module of a split model)."""
    return model.get_input_embeddings().weight.device


@dataclass(eq=False)
class DraftModel:
    """A loaded draft model (and its tokenizer when known), printed as its name (what results record).

    ``checked``: ids of the target tokenizers/models it was already checked against (the check runs once each).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None = None
    name: str = "draft"
    checked: set[int] = field(default_factory=set, repr=False)

    def __str__(self) -> str:
        return self.name

    __repr__ = __str__


def model_name(model: Any) -> str:
    """A model's name for results: its ``name_or_path`` (the folder or hub id it was loaded from), else its class."""
    return str(getattr(model, "name_or_path", "") or type(model).__name__)


def as_draft(spec: Any, target: PreTrainedModel | None = None) -> DraftModel | str | None:
    """``spec`` in one form: None, a name/path (str; loaded later by :func:`load_draft`) or a :class:`DraftModel`.

    ``InputError`` for anything else (naming what is accepted).
    """
    from transformers import PreTrainedModel

    if spec is None or isinstance(spec, DraftModel):
        return spec
    if isinstance(spec, Path):
        spec = str(spec)
    if isinstance(spec, str):
        if not spec.strip():
            raise InputError("filter_model must be a model name or path, got an empty string")
        return spec
    if isinstance(spec, PreTrainedModel):
        return DraftModel(spec, None, model_name(spec))
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], PreTrainedModel):
        return DraftModel(spec[0], spec[1], model_name(spec[0]))
    raise InputError(
        f"filter_model must be None, a model name or path, a transformers model or a (model, tokenizer) pair, "
        f"got {type(spec).__name__}"
    )


def load_draft(name: str, target: PreTrainedModel | None = None, dtype: Any = None, device: Any = None) -> DraftModel:
    """Load draft ``name`` (``tokensieve.load_model``) on the target's device and in its dtype (without a
    target: ``dtype`` and ``device``, None for ``load_model``'s defaults)."""
    from tokensieve.core.models import load_model

    if target is not None:
        dtype, device = target.dtype, str(target.device)
    model, tok = load_model(name, dtype=dtype, device=device)
    return DraftModel(model, tok, name)


def _vocab(tok: Any) -> dict[str, int] | None:
    get = getattr(tok, "get_vocab", None)
    return get() if callable(get) else None


def check_same_tokenizer(target: Any, draft: Any) -> None:
    """``InputError`` unless the two tokenizers map the same tokens to the same ids and have the same special
    token ids (bos, eos, pad, unk and the set of all special ids). Tokenizers without ``get_vocab`` are compared
    by their type and length."""
    if target is draft:
        return
    a, b = _vocab(target), _vocab(draft)
    if a is None or b is None:
        if type(target) is not type(draft) or len(target) != len(draft):
            raise InputError(
                f"filter_model's tokenizer ({type(draft).__name__}, {len(draft)} tokens) is not the model's "
                f"({type(target).__name__}, {len(target)} tokens); a draft model must share the model's tokenizer"
            )
        return
    if a != b:
        differ = sorted(t for t in set(a) | set(b) if a.get(t) != b.get(t))
        t = differ[0]
        raise InputError(
            f"filter_model's tokenizer is not the model's: vocabularies of {len(b)} and {len(a)} tokens, {len(differ)} "
            f"differ (e.g. {t!r}: id {b.get(t)} in the draft, {a.get(t)} in the model); a draft model must share "
            f"the model's tokenizer"
        )
    for name in SPECIAL_IDS:
        x, y = getattr(target, name, None), getattr(draft, name, None)
        if x != y:
            raise InputError(
                f"filter_model's tokenizer has {name} {y}, the model's {x}; a draft model must share the model's tokenizer"
            )
    sa, sb = sorted(getattr(target, "all_special_ids", []) or []), sorted(getattr(draft, "all_special_ids", []) or [])
    if sa != sb:
        raise InputError(
            f"filter_model's tokenizer has special ids {sb}, the model's {sa}; a draft model must share the model's tokenizer"
        )


def check_same_config_vocab(target: PreTrainedModel, draft: PreTrainedModel) -> None:
    """Without the draft's tokenizer: ``InputError`` unless the configs' vocabulary sizes and bos/eos ids agree."""
    ct, cd = target.config.get_text_config(), draft.config.get_text_config()
    for name in ("vocab_size", "bos_token_id", "eos_token_id"):
        x, y = getattr(ct, name, None), getattr(cd, name, None)
        if x != y:
            raise InputError(
                f"filter_model's config has {name} {y}, the model's {x}: not the model's tokenizer "
                f"(pass filter_model as a (model, tokenizer) pair to compare the tokenizers themselves)"
            )


def check_draft(draft: DraftModel, target: PreTrainedModel, tokenizer: Any = None) -> None:
    """Check ``draft`` against the target model (and its tokenizer when given), once per target.

    With both tokenizers: they must be identical (:func:`check_same_tokenizer`) and the draft's embedding must
    cover the tokenizer; the target then counts as checked (vocabulary sizes may differ by padding, as Qwen2.5's
    do). With the draft's tokenizer only: both embeddings must cover it. With no draft tokenizer: the configs'
    vocabularies must agree (:func:`check_same_config_vocab`).
    """
    full = tokenizer is not None and draft.tokenizer is not None
    if draft.model is target or (id(tokenizer) if full else id(target)) in draft.checked:
        return
    if full:
        check_same_tokenizer(tokenizer, draft.tokenizer)
        _covers(draft.model, len(tokenizer), "filter_model")
        draft.checked.update((id(tokenizer), id(target)))
        return
    if draft.tokenizer is not None:
        _covers(draft.model, len(draft.tokenizer), "filter_model")
        _covers(target, len(draft.tokenizer), "the model")
    else:
        check_same_config_vocab(target, draft.model)
    draft.checked.add(id(target))


def _covers(model: PreTrainedModel, size: int, what: str) -> None:
    rows = int(model.get_input_embeddings().weight.shape[0])
    if rows < size:
        raise InputError(f"{what} embeds {rows} token ids, fewer than the draft tokenizer's {size}: not one tokenizer")
