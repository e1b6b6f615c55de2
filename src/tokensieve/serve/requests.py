"""Request preparation: a parsed request checked against the model and made ready to run, once.

``RequestPreparer.prepare`` runs on a worker thread of the app (not the event loop) before the request is
queued, so a bad request is answered 400 at once instead of after waiting in the queue. In order:
``max_tokens`` against the positions, the sampling settings, the method and its parameters (JSON types,
bounds, the server's minimums and ``lock_params``), a length check before tokenizing (characters or token
ids), the encoding (the chat template for chat messages, the raw text for completions), prompt plus
``max_tokens`` against the positions (vLLM's 400 wording; the prompt alone first, by the rule the API and CLI
apply, ``tokensieve.engine.runner.check_prompt_length``), and ``tokensieve.engine.runner.prepare`` (the method
made, prepared and validated for this prompt). The result, a :class:`PreparedRequest`, holds the driver's
``Prepared`` run: the engine's worker runs it as it is, without preparing it again.

Encoding holds ``encode_lock``: a Hugging Face tokenizer instance keeps per-call settings (truncation,
padding) in shared state, so two encodes at once on one instance can corrupt each other's ids (measured:
docs/serve.md, "Limits and security"). Decoding does not take this lock; engines decode on their own copy
of the tokenizer (``tokensieve.engine.detokenize.Decoder``), so a long encoding never stalls a running answer.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import math
import threading
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokensieve.core.draft import DraftModel, check_draft
from tokensieve.engine.prefix_cache import PrefixStore, chat_prefix_tokens, refusal, text_prefix_tokens
from tokensieve.engine.runner import Prepared, Sampling, check_prompt_length, encode_prompt, prepare
from tokensieve.errors import ChatTemplateError, EmptyPromptError, InputError, PromptTooLongError
from tokensieve.methods import METHODS, Method, make_method
from tokensieve.methods.base import max_positions
from tokensieve.serve.protocol import APIError, GenerationRequest, invalid

# Integer method parameters a request may give lie in [-MAX_PARAM_INT, MAX_PARAM_INT]: every real value
# (budgets, windows, layers, chunk sizes) is far below, and a huge one is refused before any work.
MAX_PARAM_INT = 2**31 - 1
# Performance-only parameters: a request may not set them below these (a block or chunk of 1 costs many times
# the default prefill and holds the worker); the server's own --param values are the operator's choice.
PARAM_MINIMUMS = {"chunk_size": 128, "block_size": 128}


def _conforms(value: Any, hint: Any) -> bool | None:
    """Whether a JSON value fits a type hint: True, False, or None when the hint is not understood
    (then the method's own validation decides)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        results = [_conforms(value, a) for a in args]
        return True if any(r is True for r in results) else (False if all(r is False for r in results) else None)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list, collections.abc.Sequence):
        if isinstance(value, str):
            return None  # methods may parse "8,14,20" themselves
        if not isinstance(value, (list, tuple)):
            return False
        elem = args[0] if args else Any
        return all(_conforms(v, elem) is not False for v in value)
    return None


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (tuple, list, collections.abc.Sequence):
        return f"an array of ({_describe(args[0]) if args else 'values'})"
    names = {bool: "true/false", int: "a 64-bit integer", float: "a finite number", str: "a string", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_param_types(method: str, params: dict[str, Any]) -> None:
    """``InputError`` for a parameter whose JSON value does not fit the method's field type
    (e.g. ``"topk": true`` or ``"budget": "many"``); unknown names are left to ``make_method``."""
    cls = METHODS[method]
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: leave checking to the method
        return
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in params.items():
        name = cls.renamed.get(key, key)  # a deprecated name has its new name's type
        hint = hints.get(name) if name in names else None
        if hint is not None and _conforms(value, hint) is False:
            raise InputError(f"{method}: parameter {key!r} must be {_describe(hint)}, got {value!r}")
        ints = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_PARAM_INT for v in ints):
            raise InputError(
                f"{method}: parameter {key!r} must lie in [-{MAX_PARAM_INT}, {MAX_PARAM_INT}], got {_short(value)}"
            )


def check_param_minimums(method: str, params: dict[str, Any]) -> None:
    """``InputError`` for a performance-only parameter of a request below ``PARAM_MINIMUMS``."""
    cls = METHODS[method]
    for key, value in params.items():
        name = cls.renamed.get(key, key)
        low = PARAM_MINIMUMS.get(name)
        if low is not None and isinstance(value, int) and not isinstance(value, bool) and value < low:
            raise InputError(
                f"{method}: parameter {key!r} only trades speed for memory; this server takes at least {low}, got {value}"
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def context_length_error(limit: int, prompt_tokens: int, max_tokens: int, param: str) -> APIError:
    """vLLM's 400 for a prompt plus ``max_tokens`` past the model's positions (same wording)."""
    return invalid(
        f"This model's maximum context length is {limit} tokens. However, you requested {prompt_tokens + max_tokens} "
        f"tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). "
        f"Please reduce the length of the messages or completion.",
        param,
        code="context_length_exceeded",
    )


# The length precheck refuses, before tokenizing, a prompt of more characters than the model's positions times
# the longest vocabulary entry times this slack (for normalizers that drop characters).
LENGTH_PRECHECK_SLACK = 2


def max_token_chars(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """Characters of the tokenizer's longest vocabulary entry (None when it has no readable vocabulary): no
    token covers more characters of text (a byte-level entry spells one byte per character, a SentencePiece
    one one character per character, byte-fallback entries like ``<0x41>`` one byte in six)."""
    try:
        longest = max((len(str(t)) for t in tokenizer.get_vocab()), default=0)
    except Exception:
        return None
    return longest if longest > 0 else None


def prefix_salt(tenant: str | None, cache_salt: str | None) -> str | None:
    """The prefix-cache salt of a request: its API key and its ``cache_salt`` together (None when neither)."""
    if tenant is None and cache_salt is None:
        return None
    parts = [p if p is None else f"{len(p)}:{p}" for p in (tenant, cache_salt)]
    return hashlib.sha256(repr(parts).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- the prepared request


@dataclass
class PreparedRequest:
    """A request checked against the model, encoded, its method prepared and validated: ready to queue and run.

    ``run`` is what the driver runs (``tokensieve.engine.runner.Prepared``: the method instance and the token ids
    [1, n]); ``request.max_tokens`` is final (a default cut to the positions the prompt leaves)."""

    request: GenerationRequest
    run: Prepared
    sampling: Sampling
    prefix_tokens: int | None = None  # leading prompt tokens to store in the prefix cache; None: no prefix cache
    prefix_salt: str | None = None  # the tenant's prefix-cache key (``prefix_salt``)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.run.input_ids  # [1, n]

    @property
    def method(self) -> Method:
        return self.run.method

    @property
    def max_tokens(self) -> int:
        return self.request.max_tokens

    @property
    def prompt_tokens(self) -> int:
        return int(self.run.input_ids.shape[1])


def _is_token_ids(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int)


class RequestPreparer:
    """Prepares requests for one model: ``prepare(req)`` -> :class:`PreparedRequest`, or ``APIError`` (400).

    ``method`` / ``method_params``: the server's default (refused now, ``InputError``, when bad: it would fail
    every request). ``lock_params``: requests run with exactly the server's method and parameters; one that
    names another method or another value for a parameter gets a 400 naming the field. ``refuse(name)``: an
    engine's own refusal of a method by name (an ``APIError``, or None), asked before the prompt is encoded;
    ``check(prepared)``: an engine's own limits on the prepared request (raises ``APIError``).
    ``prefix_store``: the engine's prefix cache (None: off), for the prefix each request may store.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        method: str = "full",
        method_params: dict[str, Any] | None = None,
        lock_params: bool = False,
        refuse: Callable[[str], APIError | None] | None = None,
        check: Callable[[PreparedRequest], None] | None = None,
        prefix_store: PrefixStore | None = None,
        filter_models: Mapping[str, DraftModel] | None = None,
    ) -> None:
        if not isinstance(lock_params, bool):
            raise InputError(f"lock_params must be True or False, got {lock_params!r}")
        self.filter_models: dict[str, DraftModel] = dict(filter_models or {})
        for draft in self.filter_models.values():  # a wrong draft fails at start, not at every request
            check_draft(draft, model, tokenizer)
        names = dict(method_params or {})
        method_params = self.resolve_filter_model(method, names, "--filter-model")
        default = make_method(method, **(method_params or {}))
        try:  # a bad default would fail every request: refuse it now (no validation depends on the prompt length)
            default.prepare(model, tokenizer)
            default.validate(model, 1)
        except (ValueError, TypeError) as exc:
            raise InputError(f"the server's default method {default.name!r}: {exc}") from None
        self.model = model
        self.tokenizer = tokenizer  # the encoding instance: used under encode_lock only
        self.default_method = default.name
        self.default_params = names  # a draft by its name (what requests send and /health shows)
        self.lock_params = lock_params
        self.prefix_store = prefix_store
        self._refuse = refuse
        self._check = check
        self.max_positions = max_positions(model)
        self._max_token_chars = max_token_chars(tokenizer)
        self._vocab = int(model.config.get_text_config().vocab_size)
        self.encode_lock = threading.Lock()

    def resolve_filter_model(
        self, method: str, params: dict[str, Any], where: str = "tokensieve.filter_model"
    ) -> dict[str, Any]:
        """``params`` with a ``filter_model`` name replaced by the draft this server loaded under that name
        (``filter_models``). ``InputError`` for a name the server did not load, or a value that is not a name
        or null: a request never makes the server load a model."""
        value = params.get("filter_model")
        if value is None or isinstance(value, DraftModel):
            return params
        names = ", ".join(self.filter_models) or "none (start the server with --filter-model NAME)"
        if not isinstance(value, str) or value not in self.filter_models:
            raise InputError(
                f"{where} must be the name of a filter model this server loaded ({names}) or null for the "
                f"model itself, got {_short(value)}"
            )
        if method != "gemfilter":
            raise InputError(f"{where} is a gemfilter parameter, not one of method {method!r}")
        return {**params, "filter_model": self.filter_models[value]}

    def method_for(self, req: GenerationRequest) -> tuple[str, dict[str, Any]]:
        """The method and parameters a request runs with: its own, or the server's default (with
        ``lock_params``: the server's, and a 400 naming the first field the request tried to change)."""
        if self.lock_params:
            if req.method is not None and req.method != self.default_method:
                raise invalid(
                    f"this server runs method {self.default_method!r} only (--lock-params); got {req.method!r}",
                    "tokensieve.method",
                    code="locked_parameter",
                )
            for key, value in req.method_params.items():
                if key not in self.default_params or self.default_params[key] != value:
                    fixed = (
                        f"fixes {key} at {_short(self.default_params[key])}"
                        if key in self.default_params
                        else f"does not let requests set {key}"
                    )
                    raise invalid(
                        f"this server {fixed} (--lock-params); got {_short(value)}",
                        f"tokensieve.{key}",
                        code="locked_parameter",
                    )
            return self.default_method, dict(self.default_params)
        if req.method is None:
            return self.default_method, {**self.default_params, **req.method_params}
        return req.method, dict(req.method_params)

    def prepare(self, req: GenerationRequest) -> PreparedRequest:
        """Check ``req`` against the model, encode its prompt, prepare its method; ``APIError`` (400) when it is bad.

        Blocking (tokenization, the method's preparation): call it from a worker thread, not the event loop.
        """
        limit = self.max_positions
        if limit is not None and req.max_tokens > limit:
            raise invalid(
                f"max_tokens must be at most {limit} (the model's maximum positions), got {req.max_tokens}",
                "max_tokens",
            )
        try:
            sampling = Sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed)
        except InputError as exc:
            raise invalid(str(exc), None) from None
        name, params = self.method_for(req)
        if name not in METHODS:
            raise invalid(
                f"unknown method {name!r}; expected one of: {', '.join(METHODS)}",
                "tokensieve.method",
                code="unknown_method",
            )
        refused = self._refuse(name) if self._refuse is not None else None
        if refused is not None:
            raise refused
        try:
            check_param_types(name, params)
            check_param_minimums(name, req.method_params)
            params = self.resolve_filter_model(name, params)
            method = make_method(name, **params)
        except (ValueError, TypeError) as exc:  # InputError is a ValueError; methods' __post_init__ raise ValueError
            raise invalid(f"bad tokensieve parameters: {exc}", "tokensieve", code="invalid_method_parameter") from None
        prompt_param = "messages" if req.kind == "chat" else "prompt"
        self._precheck_length(req, prompt_param)
        input_ids = self._encode(req, prompt_param)
        n = int(input_ids.shape[1])
        try:
            check_prompt_length(n, limit)  # the one prompt-length rule, as the API and CLI apply it
        except PromptTooLongError as exc:
            raise invalid(str(exc), prompt_param, code="context_length_exceeded") from None
        if limit is not None and n + req.max_tokens > limit:
            if req.max_tokens_given or n >= limit:
                raise context_length_error(limit, n, req.max_tokens, prompt_param)
            req = dataclasses.replace(req, max_tokens=limit - n)  # the server's default: what the positions leave
        try:
            with self.encode_lock:  # prepare() may read the tokenizer (SepLLM's separators); the length is checked
                run = prepare(self.model, self.tokenizer, input_ids, method, allow_long=True)
        except (ValueError, TypeError) as exc:  # Method.validate names the bad parameter
            raise invalid(
                f"bad tokensieve parameters for method {name!r}: {exc}", "tokensieve", code="invalid_method_parameter"
            ) from None
        prepared = PreparedRequest(
            req,
            run,
            sampling,
            self._prefix_tokens(req, run.method, run.input_ids),
            prefix_salt(req.tenant, req.cache_salt),
        )
        if self._check is not None:
            self._check(prepared)
        return prepared

    def _precheck_length(self, req: GenerationRequest, param: str) -> None:
        """A 400 for a prompt that is surely too long, before tokenizing it: more token ids than positions,
        or more characters than the positions can cover (``LENGTH_PRECHECK_SLACK``)."""
        limit, per_token = self.max_positions, self._max_token_chars
        if limit is None:
            return
        prompt = req.prompt
        if _is_token_ids(prompt):
            at_least, how = len(prompt), None
        elif per_token is None:
            return
        else:
            chars = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)  # type: ignore[index]
            at_least = chars // (per_token * LENGTH_PRECHECK_SLACK)
            how = f"{chars} characters; no token of this tokenizer covers more than {per_token}"
        try:
            check_prompt_length(at_least, limit, at_least=how)
        except PromptTooLongError as exc:
            raise invalid(str(exc), param, code="context_length_exceeded") from None

    def _encode(self, req: GenerationRequest, param: str) -> torch.Tensor:
        prompt = req.prompt
        if _is_token_ids(prompt):
            bad = [t for t in prompt if not 0 <= t < self._vocab]  # type: ignore[operator]
            if bad:
                raise invalid(f"prompt token ids must be in [0, {self._vocab - 1}], got {bad[0]}", param)
            return torch.tensor([prompt], dtype=torch.long)
        try:
            with self.encode_lock:
                if req.kind == "chat":
                    ids = encode_prompt(self.tokenizer, prompt)  # type: ignore[arg-type]  # the chat template, when there is one
                else:
                    ids = encode_prompt(self.tokenizer, prompt, use_chat_template=False)  # type: ignore[arg-type]
        except EmptyPromptError as exc:
            raise invalid(str(exc), param, code="empty_prompt") from None
        except ChatTemplateError as exc:  # the chat template raised (e.g. roles must alternate)
            raise invalid(str(exc), "messages") from None
        except InputError as exc:  # e.g. text that is not valid Unicode (a lone surrogate)
            raise invalid(str(exc), param) from None
        if ids.numel() == 0:
            raise invalid("the prompt encodes to no tokens", param, code="empty_prompt")
        return ids

    def _prefix_tokens(self, req: GenerationRequest, method: Method, input_ids: torch.Tensor) -> int | None:
        """Leading prompt tokens worth storing (docs/prefix_cache.md, "The prefix rule"); None: the request
        does not use the cache (disabled, or a method it does not support)."""
        if self.prefix_store is None or refusal(method) is not None:
            return None
        prompt = req.prompt
        with self.encode_lock:
            if req.kind == "chat":
                return chat_prefix_tokens(self.tokenizer, prompt, input_ids)  # type: ignore[arg-type]
            if isinstance(prompt, str):
                return text_prefix_tokens(self.tokenizer, prompt, input_ids)
        return 0  # token ids: reuse what is cached, store nothing
