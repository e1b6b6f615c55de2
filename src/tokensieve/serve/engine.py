"""The transformers engine: request preparation, a bounded queue and one worker thread, composed.

A request goes through three steps, each in its own module:

1. ``Engine.prepare`` (``serve.requests.RequestPreparer``, on a worker thread of the app, before queueing):
   checks the method and its parameters, encodes the prompt, checks its length and prepares the method for
   it (``tokensieve.engine.runner.prepare``), once; a bad request is answered 400 at once.
2. ``Engine.submit`` wraps the prepared request in a :class:`~tokensieve.serve.jobs.Job` and queues it
   (``serve.worker.Worker``; ``QueueFullError`` when ``max_queue`` jobs already wait behind the running one).
3. The worker takes the next job, or a batch of jobs that can share a run (``serve.batching.BatchPolicy``),
   and runs the prepared runs as they are through ``tokensieve.engine.runner.generate`` / ``generate_batch``; the
   job's events (``Delta``, ``Finished``, ``Failed``; ``serve.jobs``) reach the client's event loop.

Nothing is shared between engines: each owns its preparer, queue, worker, locks and records.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokensieve.engine.detokenize import Decoder, TextStream
from tokensieve.engine.prefix_cache import PrefixStore, check_model, store_for_gib
from tokensieve.engine.runner import generate, generate_batch
from tokensieve.errors import InputError
from tokensieve.serve.batching import PREFIX_ALONE_TOKENS, BatchPolicy
from tokensieve.serve.jobs import (
    Delta,
    EngineStoppedError,
    Event,
    Failed,
    Finished,
    Job,
    JobRecord,
    QueueFullError,
    shutting_down_error,
    timeout_error,
)
from tokensieve.serve.metrics import Metrics
from tokensieve.serve.protocol import GenerationRequest
from tokensieve.serve.requests import (
    MAX_PARAM_INT,
    PARAM_MINIMUMS,
    PreparedRequest,
    RequestPreparer,
    check_param_minimums,
    check_param_types,
    context_length_error,
    prefix_salt,
)
from tokensieve.serve.worker import STALL_GRACE_S, BatchFn, GenerateFn, Interrupted, Worker, decoder_layers

log = logging.getLogger(__name__)

# Names other modules (and earlier releases) import from here.
__all__ = [
    "Engine",
    "ServingEngine",
    "Delta",
    "EngineStoppedError",
    "Event",
    "Failed",
    "Finished",
    "Job",
    "JobRecord",
    "QueueFullError",
    "PreparedRequest",
    "TextStream",
    "GenerateFn",
    "BatchFn",
    "Interrupted",
    "STALL_GRACE_S",
    "PREFIX_ALONE_TOKENS",
    "MAX_PARAM_INT",
    "PARAM_MINIMUMS",
    "check_param_types",
    "check_param_minimums",
    "context_length_error",
    "prefix_salt",
    "shutting_down_error",
    "timeout_error",
    "decoder_layers",
]


class ServingEngine(Protocol):
    """What the app asks of an engine (the transformers :class:`Engine`, ``vllm_engine.VLLMEngine``): the
    request interface and the state /health reports. ``stalled``, ``overdue_s`` and ``draining`` are optional."""

    name: str
    metrics: Metrics
    request_timeout_s: float | None

    @property
    def default_method(self) -> str: ...
    @property
    def max_queue(self) -> int: ...
    @property
    def alive(self) -> bool: ...
    @property
    def queue_depth(self) -> int: ...
    @property
    def busy(self) -> bool: ...
    def engine_info(self) -> dict[str, Any]: ...
    def prefix_cache_info(self) -> dict[str, Any]: ...
    def start(self) -> None: ...
    def stop(self, timeout_s: float = 30.0) -> None: ...
    def drain(self) -> None: ...
    def abort_running(self) -> int: ...
    def prepare(self, req: GenerationRequest) -> PreparedRequest: ...
    def submit(self, prepared: PreparedRequest, loop: asyncio.AbstractEventLoop) -> Job: ...
    def cancel(self, job: Job, reason: str = "cancelled") -> None: ...


class Engine:
    """Runs generation requests on a worker thread, from a bounded queue: one at a time, or up to
    ``max_batch`` at once where they can share a batch (default 1: one at a time).

    ``max_queue`` requests may wait while one request (or batch) runs; ``request_timeout_s`` bounds a
    request's time from submission to its last token (checked at every decoder layer and between tokens).
    ``lock_params``: requests run with the server's method and parameters only (``RequestPreparer``).
    ``generate_fn`` is ``tokensieve.engine.runner.generate`` and ``generate_batch_fn``
    ``tokensieve.engine.runner.generate_batch`` (tests pass wrappers that can block); both get prepared runs.
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
        lock_params: bool = False,
        filter_models: Mapping[str, Any] | None = None,
    ) -> None:
        if request_timeout_s is not None and not (request_timeout_s > 0):
            raise InputError(
                f"request_timeout must be a positive number of seconds (or None), got {request_timeout_s!r}"
            )
        policy = BatchPolicy(max_batch)
        # The prefix cache: used by the worker thread only. Off for models whose cache cannot be cut at a prefix.
        self.prefix_store: PrefixStore | None = store_for_gib(prefix_cache_gib)
        self.prefix_off_reason: str | None = None if self.prefix_store is not None else "disabled (size 0)"
        if self.prefix_store is not None:
            try:
                check_model(model)
            except InputError as exc:
                self.prefix_store, self.prefix_off_reason = None, str(exc)
                log.warning("tokensieve serve: no prefix cache: %s", exc)
        self.preparer = RequestPreparer(
            model,
            tokenizer,
            method=method,
            method_params=method_params,
            lock_params=lock_params,
            prefix_store=self.prefix_store,
            filter_models=filter_models,
        )
        self.model = model
        self.tokenizer = tokenizer
        self.metrics = metrics or Metrics()
        self.request_timeout_s = request_timeout_s
        self.worker = Worker(
            model,
            Decoder(tokenizer),
            generate_fn=generate_fn,
            generate_batch_fn=generate_batch_fn,
            policy=policy,
            max_queue=max_queue,
            request_timeout_s=request_timeout_s,
            metrics=self.metrics,
            history=history,
            prefix_store=self.prefix_store,
            watched=[d.model for d in self.preparer.filter_models.values()],
        )

    # -- what the app and /health read

    @property
    def default_method(self) -> str:
        return self.preparer.default_method

    @property
    def filter_models(self) -> dict[str, Any]:
        """The draft models requests may name (``RequestPreparer``), by name."""
        return self.preparer.filter_models

    @property
    def max_queue(self) -> int:
        return self.worker.max_queue

    @property
    def max_batch(self) -> int:
        return self.worker.policy.max_batch

    @property
    def records(self):  # deque[JobRecord]
        return self.worker.book.records

    @property
    def peak_queue_depth(self) -> int:
        return self.worker.peak_queue_depth

    @property
    def overdue_s(self) -> float:
        return self.worker.overdue_s

    @property
    def stalled(self) -> bool:
        """A running job is more than ``STALL_GRACE_S`` past its deadline: one step does not return."""
        return self.worker.overdue_s > STALL_GRACE_S

    @property
    def draining(self) -> bool:
        return self.worker.draining

    @property
    def alive(self) -> bool:
        return self.worker.alive

    @property
    def queue_depth(self) -> int:
        return len(self.worker.waiting)

    @property
    def busy(self) -> bool:
        return bool(self.worker.running)

    def engine_info(self) -> dict[str, Any]:
        """What /health says about the engine that generates."""
        return {"name": self.name}

    def prefix_cache_info(self) -> dict[str, Any]:
        """The prefix cache's state for /health."""
        st = self.prefix_store
        if st is None:
            return {"enabled": False, "reason": self.prefix_off_reason}
        return {
            "enabled": True,
            "max_bytes": st.max_bytes,
            "bytes": st.nbytes,
            "entries": len(st),
            "hits": st.stats.hits,
            "misses": st.stats.misses,
        }

    # -- lifecycle

    def start(self) -> None:
        self.worker.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, fail the waiting ones (503), stop the running ones at their next token, join."""
        self.worker.stop(timeout_s)

    def drain(self) -> None:
        """The first step of a shutdown: refuse new requests (``EngineStoppedError``, 503), answer the waiting
        ones 503 at once (they never start), let the running ones finish. Idempotent; ``busy`` tells when
        nothing runs any more."""
        self.worker.drain()

    def abort_running(self) -> int:
        """End the running jobs now (a shutdown past its time, or a second signal): each stops at its next
        layer or token and gets the 503 error (a stream: the error event and ``[DONE]``). Returns how many."""
        return self.worker.abort_running()

    # -- requests

    def method_for(self, req: GenerationRequest) -> tuple[str, dict[str, Any]]:
        """The method and parameters a request runs with: its own, or the server's default."""
        return self.preparer.method_for(req)

    def prepare(self, req: GenerationRequest) -> PreparedRequest:
        """Check ``req`` against the model, encode its prompt, prepare its method (once); ``APIError`` (400)
        when it is bad. Blocking (tokenization): call it from a worker thread, not the event loop."""
        return self.preparer.prepare(req)

    def submit(self, prepared: PreparedRequest, loop: asyncio.AbstractEventLoop) -> Job:
        """Queue a prepared request; ``QueueFullError`` when every slot is taken."""
        deadline = None if self.request_timeout_s is None else time.monotonic() + self.request_timeout_s
        job = Job(prepared, loop, deadline)
        self.worker.submit(job)
        return job

    def prompt_pieces(self, ids: list[int]) -> list[str]:
        """Each prompt token's text, special tokens included (``Decoder.pieces``), for the selection page."""
        return self.worker.decoder.pieces(ids)

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """Stop ``job``: drop it from the queue, or stop its generation at the next layer or token.

        ``reason`` is ``cancelled`` (the client went away) or ``timeout``.
        """
        self.worker.cancel(job, reason)
