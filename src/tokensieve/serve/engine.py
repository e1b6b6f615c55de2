"""The transformers engine: one worker thread owns the model and runs requests one at a time, or in batches.

A request goes through three steps:

1. ``Engine.prepare`` (on the caller's thread, before queueing): checks the method and its parameters
   (``make_method`` + the method's ``validate``), encodes the prompt (the chat template for chat
   messages, the raw text for completions) and checks its length, so a bad request is answered 400 at
   once instead of after waiting in the queue.
2. ``Engine.submit`` puts it in a bounded queue (``QueueFullError`` when ``max_queue`` requests already
   wait behind the running one) and returns a :class:`Job`.
3. The worker runs ``tokensieve.engine.runner.generate`` on it with an ``on_token`` callback that turns tokens
   into text (:class:`TextStream`: incremental decoding, stop strings) and posts :class:`Delta`,
   :class:`Finished` or :class:`Failed` events to the job's asyncio queue on the caller's event loop.
   The callback returns False, which stops generation at the next token, when the job was cancelled
   (client gone), its deadline passed, or a stop string was produced.

With ``max_batch`` > 1 the worker takes the next request and every waiting request that can share its
batch (``Engine.joins``: same method and parameters, a method in ``BATCH_METHODS``, batch-compatible
sampling, no long prefix for the prefix cache), up to ``max_batch``, and runs them through
``tokensieve.engine.runner.generate_batch`` with one callback per row: each row streams, stops and is cancelled
on its own, and every job's final event (and its usage) comes when the batch ends.

Nothing is shared between engines: each owns its queue, worker, locks and records.
"""

from __future__ import annotations

import asyncio
import collections.abc
import dataclasses
import hashlib
import logging
import math
import threading
import time
import types
import typing
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokensieve.decode.static import DecoderPool
from tokensieve.errors import ChatTemplateError, EmptyPromptError, InputError, PromptTooLongError
from tokensieve.methods import METHODS, Method, make_method
from tokensieve.methods.base import BATCH_METHODS, max_positions
from tokensieve.core.draft import DraftModel, check_draft
from tokensieve.engine.prefix_cache import PrefixReuse, PrefixStore, chat_prefix_tokens, check_model, refusal, store_for_gib, text_prefix_tokens
from tokensieve.engine.runner import GenerationResult, Sampling, encode_prompt, generate, generate_batch, prepare, stop_token_ids
from tokensieve.serve.metrics import Metrics
from tokensieve.serve.protocol import APIError, GenerationRequest, invalid

log = logging.getLogger(__name__)

GenerateFn = Callable[..., GenerationResult]
BatchFn = Callable[..., list[GenerationResult]]

# A request whose prompt prefix for the prefix cache (docs/prefix_cache.md) has this many tokens or more runs
# alone, through the cache: a long shared prefix (a document) saves more prefill than sharing decoding steps
# saves; a shorter one (a chat template's system prompt) saves little, so such requests batch without the cache.
PREFIX_ALONE_TOKENS = 128

# Integer method parameters a request may give lie in [-MAX_PARAM_INT, MAX_PARAM_INT]: every real value
# (budgets, windows, layers, chunk sizes) is far below, and a huge one is refused before any work.
MAX_PARAM_INT = 2**31 - 1
# Performance-only parameters: a request may not set them below these (a block or chunk of 1 costs many times
# the default prefill and holds the worker); the server's own --param values are the operator's choice.
PARAM_MINIMUMS = {"chunk_size": 128, "block_size": 128}


class QueueFullError(Exception):
    """Every slot is taken: one request (or batch) runs and ``max_queue`` wait."""

    def __init__(self, waiting: int, max_queue: int, retry_after_s: int) -> None:
        super().__init__(
            f"the server is busy: {waiting} request(s) already wait (--max-queue {max_queue}); retry in about {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class EngineStoppedError(Exception):
    """The engine is not running (not started yet, or shutting down)."""


class Interrupted(Exception):
    """Raised inside a forward pass (at a decoder layer) when every job of the run was cancelled or is past its deadline."""


# /health answers 503 "stalled" while a running job is this many seconds past its deadline (one step that does
# not return: the deadline is checked at every decoder layer of every forward and between tokens)
STALL_GRACE_S = 2.0


def decoder_layers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The model's decoder layers (the first ``...layers`` module list as long as the model has layers), or []."""
    from tokensieve.methods.base import num_layers

    n = num_layers(model)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.split(".")[-1] == "layers" and len(mod) == n:
            return list(mod)
    return []


# ---------------------------------------------------------------- method parameters from JSON


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
            raise InputError(f"{method}: parameter {key!r} must lie in [-{MAX_PARAM_INT}, {MAX_PARAM_INT}], got {_short(value)}")


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
        param, code="context_length_exceeded",
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


# ---------------------------------------------------------------- text


class TextStream:
    """Token ids in, final text out: incremental decoding with stop strings.

    A token's text is released as soon as it is final: not while it ends in an incomplete UTF-8
    character (decoded as U+FFFD), and not while its end could be the start of a stop string. The
    first stop string found ends the text (it is not included), as OpenAI does. ``text`` is the
    concatenation of everything released, so a streamed answer equals the non-streamed one.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self.ids: list[int] = []
        self._prefix = 0  # decoding window start: the tokens of the last release give context (leading spaces)
        self._read = 0  # tokens before this are turned into text
        self._pending = ""  # decoded, not released: could be the start of a stop string
        self.text = ""
        self.stopped = False  # a stop string was found

    def push(self, token_id: int) -> str:
        """Add a token; return the text that became final (often one token's text, maybe '')."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        new = self._new_text(final=False)
        return self._release(new, final=False) if new else ""

    def finish(self) -> str:
        """End of generation: release everything held back (unless a stop string ended the text)."""
        if self.stopped:
            return ""
        return self._release(self._new_text(final=True), final=True)

    def _new_text(self, final: bool) -> str:
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before) :]

    def _release(self, new: str, final: bool) -> str:
        pending = self._pending + new
        hits = [i for i in (pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            out, self._pending, self.stopped = pending[: min(hits)], "", True
        elif final:
            out, self._pending = pending, ""
        else:
            keep = self._stop_prefix_len(pending)
            out, self._pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += out
        return out

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


# ---------------------------------------------------------------- jobs


@dataclass
class Delta:
    """New text of the answer (``first``: the first token was chosen; the text may still be '')."""

    text: str
    first: bool = False


@dataclass
class Finished:
    """The answer is complete."""

    text: str  # the whole answer (the concatenation of every Delta)
    finish_reason: str  # "stop" (end-of-sequence token or a stop string) or "length" (max_tokens)
    result: GenerationResult
    queue_s: float


@dataclass
class Failed:
    """The request ended with an error (before or during generation)."""

    error: APIError


Event = Delta | Finished | Failed


@dataclass
class PreparedRequest:
    """A request checked against the model, ready to queue."""

    request: GenerationRequest
    input_ids: torch.Tensor  # [1, n]
    method: Method
    sampling: Sampling
    prefix_tokens: int | None = None  # leading prompt tokens to store in the prefix cache; None: no prefix cache
    prefix_salt: str | None = None  # the tenant's prefix-cache key (``prefix_salt``)

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass
class JobRecord:
    """What became of a job (``Engine.records`` keeps the latest ones; for tests and debugging)."""

    id: str
    outcome: str  # completed, cancelled, timeout, rejected, failed
    method: str
    max_tokens: int
    generated_tokens: int  # tokens chosen before it ended
    queue_s: float | None
    batch_size: int = 1  # requests generated together in its run (1: alone; 0: never ran)


class Job:
    """One request in the engine: its events arrive on ``events`` in the submitting event loop."""

    def __init__(self, prepared: PreparedRequest, loop: asyncio.AbstractEventLoop, deadline: float | None) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.prepared = prepared
        self.deadline = deadline  # time.monotonic() value, or None
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None
        self.generated_tokens = 0
        self.batch_size = 0  # requests in the run that generated it (set when it starts)
        self.outcome: str | None = None  # set once, when the job ends
        self.cancel_reason: str | None = None
        self._loop = loop
        self._cancel = threading.Event()
        self.ended = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def queue_s(self) -> float | None:
        return None if self.started_at is None else self.started_at - self.submitted_at

    def emit(self, event: Event) -> None:
        """Post ``event`` to the job's queue (thread-safe; dropped if the event loop is gone)."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass


def timeout_error(timeout_s: float) -> APIError:
    return APIError(
        504, f"the request did not finish within the server's request timeout of {timeout_s:g} s",
        type="timeout_error", code="timeout",
    )


def shutting_down_error() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")


class _Answer:
    """One job's generation in progress: its tokens become text (``TextStream``) and ``Delta`` events.

    ``push`` is the ``on_token`` callback (``generate``'s, or one row's of ``generate_batch``): it returns
    False, which stops this job's generation at the next token, when the job was cancelled (client gone),
    its deadline passed, or a stop string was produced.
    """

    def __init__(self, job: Job, stream: TextStream) -> None:
        self.job = job
        self.stream = stream
        self.first = True  # no event sent yet

    def push(self, token_id: int) -> bool:
        job = self.job
        if job.cancelled:
            return False
        if job.deadline is not None and time.monotonic() > job.deadline:
            job.cancel_reason = job.cancel_reason or "timeout"
            job._cancel.set()
            return False
        job.generated_tokens += 1
        text = self.stream.push(token_id)
        if text or self.first:
            job.emit(Delta(text, self.first))
            self.first = False
        return not self.stream.stopped


# ---------------------------------------------------------------- engine


class Engine:
    """Runs generation requests on a worker thread, from a bounded queue: one at a time, or up to
    ``max_batch`` at once where they can share a batch (default 1: one at a time).

    ``max_queue`` requests may wait while one request (or batch) runs; ``request_timeout_s`` bounds a
    request's time from submission to its last token (checked between tokens: a running prefill is not
    interrupted). ``generate_fn`` is ``tokensieve.engine.runner.generate`` and ``generate_batch_fn``
    ``tokensieve.engine.runner.generate_batch`` (tests pass wrappers that can block).
    """

    name = "transformers"  # what /health reports as the engine

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        method: str = "full",
        method_params: dict[str, Any] | None = None,
        max_queue: int = 16,
        request_timeout_s: float | None = 600.0,
        metrics: Metrics | None = None,
        generate_fn: GenerateFn = generate,
        history: int = 1024,
        prefix_cache_gib: float = 0.0,
        max_batch: int = 1,
        generate_batch_fn: BatchFn = generate_batch,
        filter_models: Mapping[str, DraftModel] | None = None,
    ) -> None:
        self.filter_models: dict[str, DraftModel] = dict(filter_models or {})
        for name, draft in self.filter_models.items():  # a wrong draft fails at start, not at every request
            check_draft(draft, model, tokenizer)
        method_params = self.resolve_filter_model(method, dict(method_params or {}), "--filter-model")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise InputError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch must be an integer >= 1 (1 = one request at a time), got {max_batch!r}")
        if request_timeout_s is not None and not (request_timeout_s > 0):
            raise InputError(f"request_timeout must be a positive number of seconds (or None), got {request_timeout_s!r}")
        default = make_method(method, **(method_params or {}))
        try:  # a bad default would fail every request: refuse it now (no validation depends on the prompt length)
            default.prepare(model, tokenizer)
            default.validate(model, 1)
        except (ValueError, TypeError) as exc:
            raise InputError(f"the server's default method {default.name!r}: {exc}") from None
        self.default_method = default.name
        self.default_params = {k: str(v) if isinstance(v, DraftModel) else v for k, v in (method_params or {}).items()}
        self.model = model
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.request_timeout_s = request_timeout_s
        self.metrics = metrics or Metrics()
        self._generate = generate_fn
        self._generate_batch = generate_batch_fn
        self._decoders = DecoderPool(model)  # captured decoding steps, reused across requests (one per size bucket)
        self._stops = stop_token_ids(model, tokenizer)
        self._max_positions = max_positions(model)
        self._max_token_chars = max_token_chars(tokenizer)
        self._vocab = int(model.config.get_text_config().vocab_size)
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []  # the job, or the batch, being generated
        self._stopping = False
        self._draining = False  # ``drain``: no new requests; the running ones finish
        self._thread: threading.Thread | None = None
        self._hooks: list[Any] = []  # the decoder layers' deadline checks (``start``)
        self._tok_lock = threading.Lock()  # one tokenizer call at a time (handlers encode, the worker decodes)
        self._avg_run_s = 1.0  # running mean of a run's time (one job or one batch), for Retry-After
        self.records: deque[JobRecord] = deque(maxlen=history)
        # The prefix cache: used by the worker thread only. Off for models whose cache cannot be cut at a prefix.
        self.prefix_store: PrefixStore | None = store_for_gib(prefix_cache_gib)
        self.prefix_off_reason: str | None = None if self.prefix_store is not None else "disabled (size 0)"
        if self.prefix_store is not None:
            try:
                check_model(model)
            except InputError as exc:
                self.prefix_store, self.prefix_off_reason = None, str(exc)
                log.warning("tokensieve serve: no prefix cache: %s", exc)
        self.peak_queue_depth = 0  # most requests ever waiting at once

    # -- lifecycle

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("the engine was already started")
            self._thread = threading.Thread(target=self._work, name="tokensieve-engine", daemon=True)
            # every decoder layer of every forward checks the running jobs' deadlines and cancellation, so a long
            # prefill (or filter pass, or chunk loop) stops within one layer, not at its end
            layers = decoder_layers(self.model) + [x for d in self.filter_models.values() for x in decoder_layers(d.model)]
            self._hooks = [layer.register_forward_pre_hook(self._check_running) for layer in layers]  # drafts' too
            self._thread.start()

    def _check_running(self, module: torch.nn.Module, args: Any) -> None:
        """Forward pre-hook of each decoder layer: ``Interrupted`` on the worker thread when every running job
        was cancelled or is past its deadline (those get ``cancel_reason`` ``timeout``)."""
        if threading.current_thread() is not self._thread or not self._running:
            return None
        now = time.monotonic()
        for job in self._running:
            if not job.cancelled and job.deadline is not None and now > job.deadline:
                job.cancel_reason = job.cancel_reason or "timeout"
                job._cancel.set()
        if all(job.cancelled for job in self._running):
            raise Interrupted("every job of this run was cancelled or passed its deadline")
        return None

    @property
    def overdue_s(self) -> float:
        """Seconds the most overdue running job is past its deadline (0 when none is)."""
        now = time.monotonic()
        return max([now - job.deadline for job in list(self._running) if job.deadline is not None] + [0.0])

    @property
    def stalled(self) -> bool:
        """A running job is more than ``STALL_GRACE_S`` past its deadline: one step does not return."""
        return self.overdue_s > STALL_GRACE_S

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, fail the waiting ones (503), stop the running ones at their next token, join."""
        with self._cond:
            self._stopping = True
            waiting = list(self._waiting)
            self._waiting.clear()
            for job in self._running:
                job.cancel_reason = job.cancel_reason or "cancelled"
                job._cancel.set()
            self.metrics.queue_depth.set(0)
            self._cond.notify_all()
        for job in waiting:
            self._finish(job, "cancelled", Failed(shutting_down_error()))
        if self._thread is not None:
            self._thread.join(timeout_s)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def drain(self) -> None:
        """The first step of a shutdown: refuse new requests (``EngineStoppedError``, 503), answer the waiting
        ones 503 at once (they never start), let the running ones finish. Idempotent; ``busy`` tells when
        nothing runs any more."""
        with self._cond:
            self._draining = True
            waiting = list(self._waiting)
            self._waiting.clear()
            self.metrics.queue_depth.set(0)
        for job in waiting:
            job.cancel_reason = "shutdown"
            job._cancel.set()
            self._finish(job, "cancelled", Failed(shutting_down_error()))

    def abort_running(self) -> int:
        """End the running jobs now (a shutdown past its time, or a second signal): each stops at its next
        layer or token and gets the 503 error (a stream: the error event and ``[DONE]``). Returns how many."""
        with self._cond:
            running = [job for job in self._running if job.outcome is None]
            for job in running:
                job.cancel_reason = job.cancel_reason or "shutdown"
                job._cancel.set()
        return len(running)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def engine_info(self) -> dict[str, Any]:
        """What /health says about the engine that generates."""
        return {"name": self.name}

    def prefix_cache_info(self) -> dict[str, Any]:
        """The prefix cache's state for /health."""
        st = self.prefix_store
        if st is None:
            return {"enabled": False, "reason": self.prefix_off_reason}
        return {"enabled": True, "max_bytes": st.max_bytes, "bytes": st.nbytes, "entries": len(st),
                "hits": st.stats.hits, "misses": st.stats.misses}

    def _prefix_tokens(self, req: GenerationRequest, method: Method, input_ids: torch.Tensor) -> int | None:
        """Leading prompt tokens worth storing (docs/prefix_cache.md, "The prefix rule"); None: the request
        does not use the cache (disabled, or a method it does not support)."""
        if self.prefix_store is None or refusal(method) is not None:
            return None
        prompt = req.prompt
        with self._tok_lock:
            if req.kind == "chat":
                return chat_prefix_tokens(self.tokenizer, prompt, input_ids)  # type: ignore[arg-type]
            if isinstance(prompt, str):
                return text_prefix_tokens(self.tokenizer, prompt, input_ids)
        return 0  # token ids: reuse what is cached, store nothing

    # -- requests

    def resolve_filter_model(self, method: str, params: dict[str, Any], where: str = "tokensieve.filter_model") -> dict[str, Any]:
        """``params`` with a ``filter_model`` name replaced by the draft this server loaded under that name
        (``filter_models``). ``InputError`` for a name the server did not load, or a value that is not a name
        or null: a request never makes the server load a model."""
        value = params.get("filter_model")
        if value is None or isinstance(value, DraftModel):
            return params
        names = ", ".join(self.filter_models) or "none (start the server with --filter-model NAME)"
        if not isinstance(value, str) or value not in self.filter_models:
            raise InputError(f"{where} must be the name of a filter model this server loaded ({names}) or null for the "
                             f"model itself, got {_short(value)}")
        if method != "gemfilter":
            raise InputError(f"{where} is a gemfilter parameter, not one of method {method!r}")
        return {**params, "filter_model": self.filter_models[value]}

    def method_for(self, req: GenerationRequest) -> tuple[str, dict[str, Any]]:
        """The method and parameters a request runs with: its own, or the server's default."""
        if req.method is None:
            return self.default_method, {**self.default_params, **req.method_params}
        return req.method, dict(req.method_params)

    def prepare(self, req: GenerationRequest) -> PreparedRequest:
        """Check ``req`` against the model and encode its prompt; ``APIError`` (400) when it is bad.

        Blocking (tokenization): call it from a worker thread, not the event loop.
        """
        if self._max_positions is not None and req.max_tokens > self._max_positions:
            raise invalid(
                f"max_tokens must be at most {self._max_positions} (the model's maximum positions), got {req.max_tokens}",
                "max_tokens",
            )
        try:
            sampling = Sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed)
        except InputError as exc:
            raise invalid(str(exc), None) from None
        name, params = self.method_for(req)
        if name not in METHODS:
            raise invalid(f"unknown method {name!r}; expected one of: {', '.join(METHODS)}", "tokensieve.method", code="unknown_method")
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
        limit = self._max_positions
        if limit is not None and n > limit:
            raise invalid(
                f"the prompt has {n} tokens, more than the model's maximum of {limit} positions; shorten it",
                prompt_param, code="context_length_exceeded",
            )
        if limit is not None and n + req.max_tokens > limit:
            if req.max_tokens_given or n >= limit:
                raise context_length_error(limit, n, req.max_tokens, prompt_param)
            req = dataclasses.replace(req, max_tokens=limit - n)  # the server's default: what the positions leave
        try:
            with self._tok_lock:  # prepare() may read the tokenizer (SepLLM's separators)
                run = prepare(self.model, self.tokenizer, input_ids, method)
        except PromptTooLongError as exc:
            raise invalid(str(exc), prompt_param, code="context_length_exceeded") from None
        except (ValueError, TypeError) as exc:  # Method.validate names the bad parameter
            raise invalid(f"bad tokensieve parameters for method {name!r}: {exc}", "tokensieve", code="invalid_method_parameter") from None
        return PreparedRequest(req, run.input_ids, run.method, sampling, self._prefix_tokens(req, run.method, run.input_ids),
                               prefix_salt(req.tenant, req.cache_salt))

    def _precheck_length(self, req: GenerationRequest, param: str) -> None:
        """A 400 for a prompt that is surely too long, before tokenizing it: more token ids than positions,
        or more characters than the positions can cover (``LENGTH_PRECHECK_SLACK``)."""
        limit, per_token = self._max_positions, self._max_token_chars
        if limit is None:
            return
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            at_least, why = len(prompt), "token ids"
        elif per_token is None:
            return
        else:
            chars = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)  # type: ignore[index]
            at_least = chars // (per_token * LENGTH_PRECHECK_SLACK)
            why = f"tokens ({chars} characters; no token of this tokenizer covers more than {per_token})"
        if at_least > limit:
            raise invalid(
                f"the prompt has at least {at_least} {why}, more than the model's maximum of {limit} positions; shorten it",
                param, code="context_length_exceeded",
            )

    def _encode(self, req: GenerationRequest, param: str) -> torch.Tensor:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            bad = [t for t in prompt if not 0 <= t < self._vocab]  # type: ignore[operator]
            if bad:
                raise invalid(f"prompt token ids must be in [0, {self._vocab - 1}], got {bad[0]}", param)
            return torch.tensor([prompt], dtype=torch.long)
        try:
            with self._tok_lock:
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

    def submit(self, prepared: PreparedRequest, loop: asyncio.AbstractEventLoop) -> Job:
        """Queue a prepared request; ``QueueFullError`` when every slot is taken."""
        deadline = None if self.request_timeout_s is None else time.monotonic() + self.request_timeout_s
        job = Job(prepared, loop, deadline)
        with self._cond:
            if self._stopping or self._draining or self._thread is None:
                raise EngineStoppedError("the engine is not running")
            waiting = len(self._waiting)
            if waiting + bool(self._running) >= self.max_queue + 1:
                # runs ahead of a new request: the waiting ones in batches of up to max_batch (an estimate:
                # requests that cannot share a batch take a run each), then its own
                runs = math.ceil(waiting / self.max_batch) + 1
                retry = max(1, min(3600, math.ceil(self._avg_run_s * runs)))
                raise QueueFullError(waiting, self.max_queue, retry)
            self._waiting.append(job)
            self.peak_queue_depth = max(self.peak_queue_depth, len(self._waiting))
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify()
        return job

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """Stop ``job``: drop it from the queue, or stop its generation at the next token.

        ``reason`` is ``cancelled`` (the client went away) or ``timeout``.
        """
        with self._cond:
            if job.outcome is not None:
                return
            job.cancel_reason = job.cancel_reason or reason
            job._cancel.set()
            queued = job in self._waiting
            if queued:
                self._waiting.remove(job)
                self.metrics.queue_depth.set(len(self._waiting))
        if queued:
            self._end(job, job.cancel_reason)

    # -- batches

    def batchable(self, prep: PreparedRequest) -> bool:
        """Whether ``prep`` may run in a batch: a method ``generate_batch`` runs in batches, and no prompt
        prefix of ``PREFIX_ALONE_TOKENS`` or more for the prefix cache (those run alone, through the cache)."""
        if prep.method.name not in BATCH_METHODS:
            return False
        return prep.prefix_tokens is None or prep.prefix_tokens < PREFIX_ALONE_TOKENS

    def joins(self, head: PreparedRequest, other: PreparedRequest) -> bool:
        """Whether ``other`` may share ``head``'s batch: both batchable, the same method with the same
        parameters, and sampling settings one batch can draw with (``Sampling.batches_with``)."""
        return (
            self.batchable(head) and self.batchable(other) and head.method.name == other.method.name
            and head.method.params() == other.method.params() and head.sampling.batches_with(other.sampling)
        )

    def _take(self) -> list[Job]:
        """The next job and every waiting job that can share its batch (up to ``max_batch``), in arrival
        order; called with ``_cond`` held. Jobs that cannot join keep their place in the queue."""
        head = self._waiting.popleft()
        batch = [head]
        if self.max_batch > 1 and self.batchable(head.prepared):
            for job in list(self._waiting):
                if len(batch) >= self.max_batch:
                    break
                if self.joins(head.prepared, job.prepared):
                    self._waiting.remove(job)
                    batch.append(job)
        return batch

    # -- worker

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                batch = self._take()
                self._running = batch
                self.metrics.queue_depth.set(len(self._waiting))
                self.metrics.running.set(len(batch))
            try:
                live = [job for job in batch if self._start(job)]
                for job in live:
                    job.batch_size = len(live)
                if live:
                    self.metrics.batch_size.observe(len(live))
                if len(live) == 1:
                    self._run(live[0])
                elif live:
                    self._run_batch(live)
            except BaseException:  # _run handles every Exception; this is a last resort for the worker's life
                log.exception("tokensieve engine: unexpected error around jobs %s", [job.id for job in batch])
                for job in batch:
                    if job.outcome is None:
                        self._finish(job, "failed", Failed(APIError(500, "internal error in the engine", type="server_error", code="internal_error")))
            finally:
                with self._cond:
                    self._running = []
                    self.metrics.running.set(0)

    def _decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _start(self, job: Job) -> bool:
        """Mark ``job`` started; False (and the job ended) when it was cancelled or its deadline passed while it waited."""
        job.started_at = time.monotonic()
        self.metrics.queue_wait.observe(job.queue_s or 0.0)
        if job.deadline is not None and job.started_at > job.deadline and not job.cancelled:
            job.cancel_reason = "timeout"
            job._cancel.set()
        if job.cancelled:
            self._finish(job, job.cancel_reason or "cancelled", Failed(self._cancel_error(job)))
            return False
        return True

    def _run(self, job: Job) -> None:
        prep = job.prepared
        req = prep.request
        answer = _Answer(job, TextStream(self._decode, req.stop))
        t0 = time.monotonic()
        store = self.prefix_store
        use_prefix = store is not None and prep.prefix_tokens is not None
        method = PrefixReuse(prep.method, store, prep.prefix_tokens, prep.prefix_salt) if use_prefix else prep.method  # type: ignore[arg-type]
        evicted = store.stats.evicted if store is not None else 0
        mark = store.mark() if store is not None else 0
        try:
            res = self._generate(
                self.model, self.tokenizer, prep.input_ids, method=method, max_new_tokens=req.max_tokens,
                sampling=prep.sampling, on_token=answer.push, decoders=self._decoders,
            )
        except Interrupted:
            self._drop_stored(mark)
            self._finish(job, job.cancel_reason or "cancelled", Failed(self._cancel_error(job)))
            return
        except InputError as exc:
            self._drop_stored(mark)
            self._finish(job, "rejected", Failed(invalid(str(exc), "tokensieve", code="invalid_method_parameter")))
            return
        except Exception as exc:
            self._drop_stored(mark)  # what the failed request stored (maybe half-computed); everyone else's stays
            self._failed([job], exc)
            return
        self._avg_run_s = 0.8 * self._avg_run_s + 0.2 * (time.monotonic() - t0)
        if use_prefix and store is not None and not job.cancelled:
            m = self.metrics
            cached = int(res.details.get("prefix_cached_tokens", 0))
            m.prefix_lookups.labels("hit" if cached else "miss").inc()
            m.prefix_cached_tokens.inc(cached)
            m.prefix_bytes.set(store.nbytes)
            m.prefix_entries.set(len(store))
            m.prefix_evictions.inc(store.stats.evicted - evicted)
        self._complete(answer, res)

    def _drop_stored(self, mark: int) -> None:
        store = self.prefix_store
        if store is not None and store.drop_since(mark):
            self.metrics.prefix_bytes.set(store.nbytes)
            self.metrics.prefix_entries.set(len(store))

    def _run_batch(self, jobs: list[Job]) -> None:
        """Jobs that ``joins`` allows together, through ``generate_batch`` (no prefix cache: ``batchable``)."""
        head = jobs[0].prepared
        answers = [_Answer(job, TextStream(self._decode, job.prepared.request.stop)) for job in jobs]
        t0 = time.monotonic()
        try:
            results = self._generate_batch(
                self.model, self.tokenizer, [job.prepared.input_ids for job in jobs], method=head.method,
                max_new_tokens=[job.prepared.request.max_tokens for job in jobs], sampling=head.sampling,
                on_token=lambda row, token_id: answers[row].push(token_id), decoders=self._decoders,
            )
        except Interrupted:
            for job in jobs:
                self._finish(job, job.cancel_reason or "cancelled", Failed(self._cancel_error(job)))
            return
        except InputError as exc:
            for job in jobs:
                self._finish(job, "rejected", Failed(invalid(str(exc), "tokensieve", code="invalid_method_parameter")))
            return
        except Exception as exc:
            self._failed(jobs, exc)
            return
        self._avg_run_s = 0.8 * self._avg_run_s + 0.2 * (time.monotonic() - t0)
        for answer, res in zip(answers, results):
            self._complete(answer, res)

    def _failed(self, jobs: list[Job], exc: Exception) -> None:
        log.exception("tokensieve engine: generation failed for job(s) %s", [job.id for job in jobs])
        error = APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error", code="internal_error")
        for job in jobs:
            self._finish(job, "failed", Failed(error))

    def _complete(self, answer: _Answer, res: GenerationResult) -> None:
        """A job's generation returned: its last text, metrics, and its Finished event (or its cancel error)."""
        job, stream = answer.job, answer.stream
        if job.cancelled:
            self._finish(job, job.cancel_reason or "cancelled", Failed(self._cancel_error(job)))
            return
        tail = stream.finish()
        if tail or answer.first:
            job.emit(Delta(tail, answer.first))
        eos = bool(res.token_ids) and res.token_ids[-1] in self._stops
        finish_reason = "stop" if stream.stopped or eos else "length"
        self._observe(res)
        job.generated_tokens = res.generated_tokens
        self._finish(job, "completed", Finished(stream.text, finish_reason, res, job.queue_s or 0.0))

    def _observe(self, res: GenerationResult) -> None:
        """A completed answer's time to first token and prompt sizes, in the metrics."""
        m = self.metrics
        m.ttft.labels(res.method).observe(res.ttft_s)
        m.prompt_tokens.labels(res.method).inc(res.prompt_tokens)
        m.kept_tokens.labels(res.method).inc(res.kept_tokens)
        m.kept_ratio.labels(res.method).observe(res.kept_tokens / max(res.prompt_tokens, 1))

    def _cancel_error(self, job: Job) -> APIError:
        if job.cancel_reason == "timeout":
            return timeout_error(self.request_timeout_s or 0.0)
        if self._stopping or job.cancel_reason == "shutdown":
            return shutting_down_error()
        return APIError(499, "the request was cancelled", type="invalid_request_error", code="cancelled")

    def _finish(self, job: Job, outcome: str, event: Event) -> None:
        """Record the outcome, then tell the client: whoever reads the answer sees the records and metrics."""
        self._end(job, outcome)
        job.emit(event)

    def _end(self, job: Job, outcome: str) -> None:
        with self._cond:
            if job.outcome is not None:
                return
            job.outcome = outcome
        self.metrics.jobs.labels(outcome).inc()
        self.metrics.generated_tokens.labels(outcome).inc(job.generated_tokens)
        self.records.append(
            JobRecord(job.id, outcome, job.prepared.method.name, job.prepared.request.max_tokens, job.generated_tokens, job.queue_s,
                      job.batch_size)
        )
        job.ended.set()
