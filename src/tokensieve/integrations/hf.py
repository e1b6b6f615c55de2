"""Hugging Face-native use: a method inside the user's own ``model.generate``, and a document-QA pipeline.

``apply(model, method, **params)`` is a context manager (kvpress's ``with press(model):`` is the model)::

    with tokensieve.apply(model, "snapkv", budget=512):
        out = model.generate(input_ids, max_new_tokens=64, logits_processor=..., stopping_criteria=...)

Inside the block every forward of ``model`` that starts a sequence from an empty KV cache (what
``generate`` does on its first step) runs the method, through public extension points only: a
``torch`` forward pre-hook on the model rewrites the call's keyword arguments (the cache object, the
attention hook ``tokensieve_hook`` that ``transformers`` passes down to the attention function, the
token ids and position ids); no modelling file is patched.

* Eviction methods (SnapKV, H2O, StreamingLLM, SepLLM): the prompt's forward gets the method's own
  ``EvictionCache`` in place of ``generate``'s empty cache and its prefill hook; ``generate`` keeps the
  cache the model returns, and each later step gets the method's decoding hook. Positions stay original.
* GemFilter: the prompt's forward first runs the filter pass (``GemFilter.select``), then feeds only the
  kept ids at positions ``0..k-1``; each later step's position is renumbered the same way. ``generate``
  still sees the whole prompt, so its returned sequence is ``[prompt | answer]`` as usual, and logits
  processors see the whole prompt. ``Applied.last_selection`` holds the kept prompt indices.
* Full attention: the model as it is (on tokensieve's attention).
* LazyLLM cannot: it re-selects tokens inside its own layer loop at every step, which neither a cache
  nor an attention hook can express; ``InputError`` pointing at ``tokensieve.generate``.

``pipeline(model, tokenizer, method, **params)`` answers questions about one document, computing the
document once through the prefix cache (``engine.prefix_cache``) where the method allows it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokensieve.core.attention import (
    ATTN_IMPLEMENTATION,
    AttentionSwitchedWarning,
    ensure_tokensieve_attention,
)
from tokensieve.errors import InputError, check_int
from tokensieve.methods import Method, make_method
from tokensieve.methods.base import DecodeState, cache_kwarg
from tokensieve.methods.eviction import EvictionMethod
from tokensieve.methods.full import FullAttention

_MARK = "_tokensieve_applied"  # set on a model while a block applies a method to it (refuses nesting)

_LAZY = (
    "{name} cannot run inside model.generate: it prunes tokens inside its own layer loop at every step, which "
    "neither a KV cache nor an attention hook can express; use tokensieve.generate(model, tokenizer, prompt, "
    "method={name!r})"
)


def _kind(m: Method) -> str:
    """How ``apply`` runs ``m``: ``"full"``, ``"evict"`` or ``"select"``; ``InputError`` for a method it cannot run."""
    if isinstance(m, FullAttention):
        return "full"
    if isinstance(m, EvictionMethod):
        return "evict"
    if m.capabilities.selects_prompt:  # GemFilter: ``select`` picks the prompt ids, run at positions 0..k-1
        return "select"
    raise InputError(_LAZY.format(name=m.name))


class Applied:
    """The context manager ``apply`` returns; see the module docstring for what runs inside the block.

    Attributes (read after a ``generate`` in the block):
        method: the method instance in use.
        sequences: sequences started in the block so far (each ``generate`` call starts one).
        last_selection: GemFilter: the kept prompt indices (sorted, ``list[int]``) of the last sequence
            (every index when ``topk >= n``); ``None`` for other methods or before the first sequence.
        last_kv_entries: KV entries per layer right after the last sequence's prompt (eviction methods and
            GemFilter: what the method kept), or ``None`` before the first sequence.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        method: str | Method,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **params: Any,
    ) -> None:
        self.model = model
        self.method = make_method(method, **params)
        self._kind = _kind(self.method)
        self.tokenizer = tokenizer
        self.sequences = 0
        self.last_selection: list[int] | None = None
        self.last_kv_entries: list[int] | None = None
        self._handles: list[Any] = []
        self._previous: str | None = None
        self._cache: Any = None  # the cache of the sequence in progress
        self._state: DecodeState | None = None
        self._next = 0  # position id the next fed token gets
        self._busy = False  # the method's own forwards (GemFilter's filter pass) run through untouched

    # -- entering and leaving

    def __enter__(self) -> Applied:
        model = self.model
        if getattr(model, _MARK, None) is not None:
            raise InputError("tokensieve.apply blocks cannot be nested on one model; leave the first block first")
        had = getattr(model.config, "_attn_implementation", None)  # e.g. "sdpa" for a from_pretrained model
        with warnings.catch_warnings():  # the switch is this block's documented effect, undone on exit: no warning
            warnings.simplefilter("ignore", AttentionSwitchedWarning)
            ensure_tokensieve_attention(model)  # InputError for a model that cannot be switched
        self._previous = had if isinstance(had, str) and had != ATTN_IMPLEMENTATION else None
        m = self.method
        try:
            if self.tokenizer is not None:
                m.prepare(model, self.tokenizer)
            elif getattr(m, "separator_ids", "absent") is None:  # SepLLM without ids: they come from a tokenizer
                raise InputError(
                    f"{m.name} derives its separators from the tokenizer: pass tokenizer=... to tokensieve.apply, "
                    f"or separator_ids=[...]"
                )
            m.validate(model, 1)
        except BaseException:
            self.__exit__()
            raise
        self._cache_key = next(iter(cache_kwarg(model, None)))
        self._handles = [
            model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            model.register_forward_hook(self._post_forward),
        ]
        setattr(model, _MARK, self)
        return self

    def __exit__(self, *exc: Any) -> bool:
        model = self.model
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if getattr(model, _MARK, None) is self:
            delattr(model, _MARK)
        if self._previous is not None:
            model.set_attn_implementation(self._previous)
        self._cache = self._state = None
        return False

    # -- the forward pre-hook

    def _pre_forward(
        self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]] | None:
        if self._busy or self._kind == "full":
            return None
        kwargs = dict(kwargs)
        if args:  # model(input_ids, ...): the ids as a keyword, so that they can be replaced
            kwargs["input_ids"], args = args[0], args[1:]
        ids = kwargs.get("input_ids")
        cache = kwargs.get(self._cache_key, kwargs.get("past_key_values"))
        if cache is None:
            if kwargs.get("use_cache") is False:
                raise InputError(
                    f"{self.method.name} inside tokensieve.apply works on the KV cache; generate with use_cache=True"
                )
            return None  # a plain forward without a cache (e.g. scoring a text): the model as it is
        if ids is None:
            raise InputError(
                f"{self.method.name} inside tokensieve.apply needs token ids (input_ids), not inputs_embeds"
            )
        if ids.shape[0] != 1:
            raise InputError(
                f"tokensieve.apply runs {self.method.name} on one sequence at a time (batch size 1, num_beams=1, "
                f"num_return_sequences=1); got a batch of {ids.shape[0]}"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if torch.is_tensor(mask) and mask.dim() == 2 and bool(mask.all()):
                kwargs["attention_mask"] = None  # all ones: the plain causal mask, over the entries the cache holds
            else:
                raise InputError(
                    f"tokensieve.apply runs {self.method.name} without padding: pass an attention_mask of ones "
                    f"(or none); got {'a padded' if torch.is_tensor(mask) else 'a ' + type(mask).__name__} mask"
                )
        if cache is self._cache:
            self._step(kwargs, ids)
        elif cache.get_seq_length() == 0:
            self._prefill(kwargs, ids, cache)
        else:
            raise InputError(
                f"{self.method.name} inside tokensieve.apply starts every sequence from an empty KV cache; got a cache "
                f"holding {cache.get_seq_length()} entries"
            )
        return args, kwargs

    def _prefill(self, kwargs: dict[str, Any], ids: torch.Tensor, cache: Any) -> None:
        model, m = self.model, self.method
        n = ids.shape[1]
        m.validate(model, n)
        self.sequences += 1
        self.last_selection = self.last_kv_entries = None
        if self._kind == "evict":
            cache, extra = m.prefill_cache(model, ids)  # the method's EvictionCache (ids recorded) and prefill hook
            kwargs[self._cache_key] = cache
            if self._cache_key != "past_key_values":
                kwargs.pop("past_key_values", None)
            kwargs.update(extra)
            self._state = DecodeState(logits=ids.new_empty(0), cache=cache, next_position=n)
            positions = torch.arange(n, device=ids.device)[None]
        else:  # GemFilter: the filter pass picks the prompt ids, the forward runs on them at positions 0..k-1
            self._busy = True
            try:
                kept = m.select(model, ids)  # [k] sorted
            finally:
                self._busy = False
            self.last_selection = kept.tolist()
            kwargs["input_ids"] = ids[:, kept]
            n = int(kept.numel())
            positions = torch.arange(n, device=ids.device)[None]
        kwargs["position_ids"] = positions
        self._cache, self._next = cache, n
        self._after_prefill = True

    def _post_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._after_prefill and not self._busy:  # the prompt's forward is done: what the method kept
            self.last_kv_entries = [int(layer.keys.shape[-2]) for layer in self._cache.layers]
            self._after_prefill = False

    def _step(self, kwargs: dict[str, Any], ids: torch.Tensor) -> None:
        t = ids.shape[1]
        kwargs["position_ids"] = torch.arange(self._next, self._next + t, device=ids.device)[None]
        self._next += t
        if self._kind == "evict":
            self._cache.add_tokens(ids)
            self._state.next_position = self._next
            kwargs.update(self.method.forward_kwargs(self._state))

    _after_prefill = False


def apply(
    model: PreTrainedModel, method: str | Method, tokenizer: PreTrainedTokenizerBase | None = None, **params: Any
) -> Applied:
    """A context manager that runs ``method`` (with ``params``) inside the user's own ``model.generate``.

    ``with tokensieve.apply(model, "snapkv", budget=512): model.generate(ids, ...)`` gives, for greedy
    decoding, the tokens ``tokensieve.generate(model, tokenizer, ids, method="snapkv", budget=512)`` gives;
    ``generate``'s ``GenerationConfig``, logits processors, stopping criteria, streamer and sampling apply as
    usual. Methods: full, snapkv, h2o, streamingllm, sepllm (``tokenizer`` derives its separators, or pass
    ``separator_ids``), gemfilter (the returned sequence starts with the whole prompt; the kept indices are
    ``.last_selection``). LazyLLM and unknown methods or parameters raise ``InputError`` here; so, inside the
    block, do batches (batch size 1 only, no beams), padding masks, ``use_cache=False`` and a generate that
    continues from a non-empty cache.

    On entry the model is switched to tokensieve's attention (``ensure_tokensieve_attention``, without its
    warning: the switch is undone on exit) and a forward pre-hook is added; on exit, exceptions included,
    both are undone.
    Blocks cannot be nested on one model (``InputError``).
    """
    return Applied(model, method, tokenizer, **params)


# -- the pipeline


@dataclass
class DocumentQA:
    """``pipeline``'s result: answers questions about one document with one method (see ``pipeline``)."""

    model: PreTrainedModel = field(repr=False)
    tokenizer: PreTrainedTokenizerBase = field(repr=False)
    method: str
    params: dict[str, Any]
    max_bytes: int = 1 << 30
    store: Any = field(init=False, repr=False)
    reuse: str | None = field(init=False)  # None: the prefix cache serves the document; else why not
    last_results: list[Any] = field(init=False, default_factory=list, repr=False)

    def __post_init__(self) -> None:
        from tokensieve.engine.prefix_cache import PrefixStore, check_model, refusal

        check_int("max_bytes", self.max_bytes, 0)
        m = make_method(self.method, **self.params)  # InputError for unknown methods and parameters, now
        ensure_tokensieve_attention(self.model)
        self.store = PrefixStore(self.max_bytes)
        why = refusal(m)
        if why is None:
            try:
                check_model(self.model)
            except InputError as exc:
                why = str(exc)
        self.reuse = why

    def prompt(self, context: str, question: str) -> list[dict[str, str]]:
        """The chat messages of one question: the document, a blank line, then the question."""
        return [{"role": "user", "content": f"{context}\n\n{question}"}]

    def __call__(
        self,
        context: str,
        questions: Sequence[str] | str | None = None,
        *,
        question: str | None = None,
        max_new_tokens: int = 64,
        **generate_kwargs: Any,
    ) -> dict[str, Any]:
        """Answer ``question`` (-> ``{"answer": str}``) or each of ``questions`` (-> ``{"answers": [str, ...]}``).

        ``generate_kwargs`` go to ``tokensieve.generate`` (e.g. ``sampling=``); the full results are in
        ``last_results``. The document is computed once, by the first question, where the prefix cache serves
        the method (full, snapkv, gemfilter on models without sliding-window layers; ``reuse`` is None),
        otherwise once per question.
        """
        from tokensieve.engine.prefix_cache import (
            PrefixReuse,
            chat_prefix_tokens,
            text_prefix_tokens,
        )
        from tokensieve.engine.runner import encode_prompt, generate

        if not isinstance(context, str) or not context.strip():
            raise InputError(f"context must be a non-empty string, got {context!r:.60}")
        if (question is None) == (questions is None):
            raise InputError("give question='...' or questions=[...], one of the two")
        single = question is not None or isinstance(questions, str)
        qs = [question if question is not None else questions] if single else list(questions)  # type: ignore[list-item]
        if not qs or any(not isinstance(q, str) or not q.strip() for q in qs):
            raise InputError(f"questions must be non-empty strings, got {qs!r:.80}")
        results = []
        for q in qs:
            msgs = self.prompt(context, q)
            method: Any = self.method
            params = dict(self.params)
            if self.reuse is None:
                ids = encode_prompt(self.tokenizer, msgs)
                if getattr(self.tokenizer, "chat_template", None) is not None:
                    doc = chat_prefix_tokens(self.tokenizer, msgs, ids)
                else:
                    doc = text_prefix_tokens(self.tokenizer, msgs[0]["content"], ids)
                method, params = PrefixReuse(make_method(self.method, **self.params), self.store, doc), {}
            results.append(
                generate(
                    self.model,
                    self.tokenizer,
                    msgs,
                    method=method,
                    max_new_tokens=max_new_tokens,
                    **generate_kwargs,
                    **params,
                )
            )
        self.last_results = results
        answers = [r.text for r in results]
        return {"answer": answers[0]} if single else {"answers": answers}


def pipeline(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    method: str = "full",
    max_bytes: int = 1 << 30,
    **params: Any,
) -> DocumentQA:
    """Questions about one document: ``pipe = tokensieve.pipeline(model, tok, "snapkv", budget=512)``, then
    ``pipe(context=document, questions=["...", "..."], max_new_tokens=64)["answers"]``.

    Each question's prompt is one user message, the document, a blank line and the question (the chat
    template applied where the tokenizer has one). Answers are ``tokensieve.generate``'s on that prompt.
    Where the prefix cache serves the method (full, snapkv, gemfilter; models without sliding-window layers)
    the document is computed once, by the first question, and kept (at most ``max_bytes`` of KV, least
    recently used dropped first); later questions compute only their own tokens. Other methods compute it
    for every question (``pipe.reuse`` says why).
    """
    return DocumentQA(model, tokenizer, method, params, max_bytes)


# -- the transformers pipeline task

PIPELINE_TASK = "tokensieve-qa"


def register_pipeline_task() -> str:
    """Register ``tokensieve.pipeline`` as the ``transformers`` pipeline task ``"tokensieve-qa"`` (public
    ``PIPELINE_REGISTRY`` API; calling it again re-registers the same class) and return the task's name.

    Then ``transformers.pipeline("tokensieve-qa", model=model, tokenizer=tok)`` gives a pipeline called as
    ``pipe(document, questions=[...], method="snapkv", budget=256, max_new_tokens=64)`` (or ``question=``),
    returning ``DocumentQA``'s dict. Each (method, parameters) pair keeps its own ``DocumentQA``, so a document
    asked about again with the same method is taken from its prefix cache.
    """
    from transformers import AutoModelForCausalLM
    from transformers.pipelines import PIPELINE_REGISTRY

    PIPELINE_REGISTRY.register_pipeline(PIPELINE_TASK, pipeline_class=_task_class(), pt_model=AutoModelForCausalLM)
    return PIPELINE_TASK


def _task_class() -> type:
    """The ``transformers.Pipeline`` subclass of the task (built on first use: importing this module stays light)."""
    from transformers import Pipeline

    class TokensieveQAPipeline(Pipeline):
        """``tokensieve.pipeline`` as a ``transformers`` pipeline task (``register_pipeline_task``)."""

        _load_processor = _load_image_processor = _load_feature_extractor = False
        _load_tokenizer = True

        def _sanitize_parameters(
            self,
            question: str | None = None,
            questions: Sequence[str] | None = None,
            method: str | None = None,
            max_new_tokens: int | None = None,
            **params: Any,
        ):
            pre = {"question": question, "questions": questions}
            forward: dict[str, Any] = {"params": params}
            if method is not None:
                forward["method"] = method
            if max_new_tokens is not None:
                forward["max_new_tokens"] = max_new_tokens
            return pre, forward, {}

        def preprocess(self, context: str, question: str | None = None, questions: Sequence[str] | None = None):
            return {"context": context, "question": question, "questions": questions}

        def _forward(
            self,
            inputs: dict[str, Any],
            method: str = "full",
            params: dict[str, Any] | None = None,
            max_new_tokens: int = 64,
        ) -> dict[str, Any]:
            params = params or {}
            key = (method, repr(sorted(params.items())))
            runs = self.__dict__.setdefault("_tokensieve_runs", {})
            if key not in runs:
                runs[key] = pipeline(self.model, self.tokenizer, method, **params)
            return runs[key](
                inputs["context"], inputs["questions"], question=inputs["question"], max_new_tokens=max_new_tokens
            )

        def postprocess(self, outputs: dict[str, Any]) -> dict[str, Any]:
            return outputs

    return TokensieveQAPipeline
