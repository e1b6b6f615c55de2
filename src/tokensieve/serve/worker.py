"""The worker loop: one thread owns the model and runs queued jobs, one at a time or in batches.

:class:`Worker` holds the bounded queue (``submit``: ``QueueFullError`` when ``max_queue`` jobs already wait
behind the running one), asks the batching policy (``serve.batching.BatchPolicy``) what runs next, and runs
it: ``tokensieve.engine.runner.generate`` on the job's prepared run (``PreparedRequest.run``, not prepared again),
or ``generate_batch`` on several, with one :class:`~tokensieve.serve.jobs.Answer` per job turning tokens into
``Delta`` events. Every decoder layer of every forward checks the running jobs' deadlines and cancellation
(a forward pre-hook), so a long prefill stops within one layer; between tokens the answer's callback does.
Jobs end through the :class:`~tokensieve.serve.jobs.JobBook`, once each.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from tokensieve.decode.static import DecoderPool
from tokensieve.engine.detokenize import Decoder
from tokensieve.engine.prefix_cache import PrefixReuse, PrefixStore
from tokensieve.engine.runner import GenerationResult, Prepared, stop_token_ids
from tokensieve.errors import InputError, check_int
from tokensieve.serve.batching import BatchPolicy
from tokensieve.serve.jobs import (
    Answer,
    EngineStoppedError,
    Failed,
    Job,
    JobBook,
    QueueFullError,
    internal_error,
    shutting_down_error,
)
from tokensieve.serve.metrics import Metrics
from tokensieve.serve.protocol import APIError, invalid

log = logging.getLogger(__name__)

GenerateFn = Callable[..., GenerationResult]
BatchFn = Callable[..., list[GenerationResult]]

# /health answers 503 "stalled" while a running job is this many seconds past its deadline (one step that does
# not return: the deadline is checked at every decoder layer of every forward and between tokens)
STALL_GRACE_S = 2.0


class Interrupted(Exception):
    """Raised inside a forward pass (at a decoder layer) when every job of the run was cancelled or is past its deadline."""


def decoder_layers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The model's decoder layers (the first ``...layers`` module list as long as the model has layers), or []."""
    from tokensieve.methods.base import num_layers

    n = num_layers(model)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.split(".")[-1] == "layers" and len(mod) == n:
            return list(mod)
    return []


class Worker:
    """The queue and the thread that runs it (``start``); see the module docstring.

    ``generate_fn`` / ``generate_batch_fn`` are ``tokensieve.engine.runner.generate`` / ``generate_batch`` (tests pass
    wrappers that can block); they get the job's ``Prepared`` run as their prompt. ``decoder`` turns ids into
    text on its own tokenizer instance. ``prefix_store``: the prefix cache (None: off), used on this thread only.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        decoder: Decoder,
        *,
        generate_fn: GenerateFn,
        generate_batch_fn: BatchFn,
        policy: BatchPolicy,
        max_queue: int,
        request_timeout_s: float | None,
        metrics: Metrics,
        history: int,
        prefix_store: PrefixStore | None,
        watched: Sequence[PreTrainedModel] = (),
    ) -> None:
        self.watched = tuple(watched)  # more models whose layers check deadlines too (GemFilter's draft models)
        check_int("max_queue", max_queue, 0)
        self.model = model
        self.decoder = decoder
        self.policy = policy
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.metrics = metrics
        self.prefix_store = prefix_store
        self._generate = generate_fn
        self._generate_batch = generate_batch_fn
        self._decoders = DecoderPool(model)  # captured decoding steps, reused across requests (one per size bucket)
        self._stops = stop_token_ids(model, decoder.tokenizer)
        self.cond = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []  # the job, or the batch, being generated
        self.stopping = False
        self.draining = False  # ``drain``: no new jobs; the running ones finish
        self.thread: threading.Thread | None = None
        self._hooks: list[Any] = []  # the decoder layers' deadline checks (``start``)
        self.book = JobBook(metrics, history, self.cond, request_timeout_s, lambda: self.stopping)
        self.peak_queue_depth = 0  # most jobs ever waiting at once

    # -- lifecycle

    def start(self) -> None:
        with self.cond:
            if self.thread is not None:
                raise RuntimeError("the engine was already started")
            self.thread = threading.Thread(target=self._work, name="tokensieve-engine", daemon=True)
            # every decoder layer of every forward checks the running jobs' deadlines and cancellation, so a long
            # prefill (or filter pass, or chunk loop) stops within one layer, not at its end
            layers = [x for m in (self.model, *self.watched) for x in decoder_layers(m)]
            self._hooks = [layer.register_forward_pre_hook(self._check_running) for layer in layers]
            self.thread.start()

    def _check_running(self, module: torch.nn.Module, args: Any) -> None:
        """Forward pre-hook of each decoder layer: ``Interrupted`` on the worker thread when every running job
        was cancelled or is past its deadline (those get ``cancel_reason`` ``timeout``)."""
        if threading.current_thread() is not self.thread or not self.running:
            return None
        now = time.monotonic()
        for job in self.running:
            job.past_deadline(now)
        if all(job.cancelled for job in self.running):
            raise Interrupted("every job of this run was cancelled or passed its deadline")
        return None

    @property
    def overdue_s(self) -> float:
        """Seconds the most overdue running job is past its deadline (0 when none is)."""
        now = time.monotonic()
        return max([now - job.deadline for job in list(self.running) if job.deadline is not None] + [0.0])

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new jobs, fail the waiting ones (503), stop the running ones at their next token, join."""
        with self.cond:
            self.stopping = True
            waiting = list(self.waiting)
            self.waiting.clear()
            for job in self.running:
                job.mark_cancelled("cancelled")
            self.metrics.queue_depth.set(0)
            self.cond.notify_all()
        for job in waiting:
            self.book.finish(job, "cancelled", Failed(shutting_down_error()))
        if self.thread is not None:
            self.thread.join(timeout_s)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def drain(self) -> None:
        """Refuse new jobs (``EngineStoppedError``), answer the waiting ones 503 at once, let the running ones finish."""
        with self.cond:
            self.draining = True
            waiting = list(self.waiting)
            self.waiting.clear()
            self.metrics.queue_depth.set(0)
        for job in waiting:
            job.mark_cancelled("shutdown")
            self.book.finish(job, "cancelled", Failed(shutting_down_error()))

    def abort_running(self) -> int:
        """End the running jobs now: each stops at its next layer or token and gets the 503 error. Returns how many."""
        with self.cond:
            running = [job for job in self.running if job.outcome is None]
            for job in running:
                job.mark_cancelled("shutdown")
        return len(running)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and not self.stopping

    # -- the queue

    def submit(self, job: Job) -> None:
        """Queue ``job``; ``QueueFullError`` when every slot is taken, ``EngineStoppedError`` when not running."""
        with self.cond:
            if self.stopping or self.draining or self.thread is None:
                raise EngineStoppedError("the engine is not running")
            waiting = len(self.waiting)
            if waiting + bool(self.running) >= self.max_queue + 1:
                # runs ahead of a new request: the waiting ones in batches of up to max_batch (an estimate:
                # requests that cannot share a batch take a run each), then its own
                runs = math.ceil(waiting / self.policy.max_batch) + 1
                retry = max(1, min(3600, math.ceil(self.book.avg_run_s * runs)))
                raise QueueFullError(waiting, self.max_queue, retry)
            self.waiting.append(job)
            self.peak_queue_depth = max(self.peak_queue_depth, len(self.waiting))
            self.metrics.queue_depth.set(len(self.waiting))
            self.cond.notify()

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """Stop ``job``: drop it from the queue, or stop its generation at the next layer or token."""
        with self.cond:
            if job.outcome is not None:
                return
            job.mark_cancelled(reason)
            queued = job in self.waiting
            if queued:
                self.waiting.remove(job)
                self.metrics.queue_depth.set(len(self.waiting))
        if queued:
            self.book.end(job, job.cancel_reason or reason)

    # -- the loop

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                batch = self.policy.take(self.waiting)
                self.running = batch
                self.metrics.queue_depth.set(len(self.waiting))
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
                        self.book.finish(job, "failed", Failed(internal_error()))
            finally:
                with self.cond:
                    self.running = []
                    self.metrics.running.set(0)

    def _start(self, job: Job) -> bool:
        """Mark ``job`` started; False (and the job ended) when it was cancelled or its deadline passed while it waited."""
        job.started_at = time.monotonic()
        self.metrics.queue_wait.observe(job.queue_s or 0.0)
        job.past_deadline(job.started_at)
        if job.cancelled:
            self.book.cancelled(job)
            return False
        return True

    def _run(self, job: Job) -> None:
        prep = job.prepared
        answer = Answer(job, self.decoder)
        t0 = time.monotonic()
        store = self.prefix_store
        run = prep.run
        use_prefix = store is not None and prep.prefix_tokens is not None
        if use_prefix:  # the same prepared method, its prefix taken from (and stored in) the cache
            run = Prepared(PrefixReuse(run.method, store, prep.prefix_tokens, prep.prefix_salt), run.input_ids)  # type: ignore[arg-type]
        evicted = store.stats.evicted if store is not None else 0
        mark = store.mark() if store is not None else 0
        try:
            res = self._generate(
                self.model,
                self.decoder.tokenizer,
                run,
                max_new_tokens=prep.max_tokens,
                sampling=prep.sampling,
                on_token=answer.push,
                decoders=self._decoders,
            )
        except Exception as exc:
            self._drop_stored(mark)  # what the failed request stored (maybe half-computed); everyone else's stays
            self._failed([job], exc)
            return
        self.book.ran(time.monotonic() - t0)
        if use_prefix and store is not None and not job.cancelled:
            m = self.metrics
            cached = int(res.details.get("prefix_cached_tokens", 0))
            m.prefix_lookups.labels("hit" if cached else "miss").inc()
            m.prefix_cached_tokens.inc(cached)
            m.prefix_bytes.set(store.nbytes)
            m.prefix_entries.set(len(store))
            m.prefix_evictions.inc(store.stats.evicted - evicted)
        self.book.complete(answer, res, self._ended_by_eos(res))

    def _ended_by_eos(self, res: GenerationResult) -> bool:
        return bool(res.token_ids) and res.token_ids[-1] in self._stops

    def _drop_stored(self, mark: int) -> None:
        store = self.prefix_store
        if store is not None and store.drop_since(mark):
            self.metrics.prefix_bytes.set(store.nbytes)
            self.metrics.prefix_entries.set(len(store))

    def _run_batch(self, jobs: list[Job]) -> None:
        """Jobs the policy lets share a run, through ``generate_batch`` on their prepared runs (no prefix cache)."""
        head = jobs[0].prepared
        answers = [Answer(job, self.decoder) for job in jobs]
        t0 = time.monotonic()
        try:
            results = self._generate_batch(
                self.model,
                self.decoder.tokenizer,
                [job.prepared.run for job in jobs],
                max_new_tokens=[job.prepared.max_tokens for job in jobs],
                sampling=head.sampling,
                on_token=lambda row, token_id: answers[row].push(token_id),
                decoders=self._decoders,
            )
        except Exception as exc:
            self._failed(jobs, exc)
            return
        self.book.ran(time.monotonic() - t0)
        for answer, res in zip(answers, results):
            self.book.complete(answer, res, self._ended_by_eos(res))

    def _failed(self, jobs: list[Job], exc: Exception) -> None:
        """A run raised: cancelled jobs get their cancel error, a parameter the method refused at run time 400,
        anything else 500 (logged)."""
        if isinstance(exc, Interrupted):
            for job in jobs:
                self.book.cancelled(job)
            return
        if isinstance(exc, InputError):
            for job in jobs:
                self.book.finish(
                    job, "rejected", Failed(invalid(str(exc), "tokensieve", code="invalid_method_parameter"))
                )
            return
        log.exception("tokensieve engine: generation failed for job(s) %s", [job.id for job in jobs], exc_info=exc)
        error = APIError(
            500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error", code="internal_error"
        )
        for job in jobs:
            self.book.finish(job, "failed", Failed(error))
