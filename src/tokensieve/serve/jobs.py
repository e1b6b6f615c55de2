"""Jobs and events: what a request becomes once it is queued, and what its client hears.

A :class:`Job` carries one prepared request (``serve.requests.PreparedRequest``) through an engine. Its
answer arrives as events on its asyncio queue, in the event loop that submitted it: :class:`Delta` (new
text), then :class:`Finished` (the answer and its measurements) or :class:`Failed` (an ``APIError``).
:class:`Answer` turns one job's tokens into text (``tokensieve.engine.detokenize.TextStream``) and ``Delta``
events; :class:`JobBook` ends jobs, once each: the record, the metrics, the final event. Both engines
(transformers and vLLM) use these pieces, so a client hears the same events from either.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokensieve.engine.detokenize import TextStream
from tokensieve.serve.metrics import Metrics
from tokensieve.serve.protocol import APIError

if TYPE_CHECKING:
    from tokensieve.engine.runner import GenerationResult
    from tokensieve.serve.requests import PreparedRequest


class QueueFullError(Exception):
    """Every slot is taken: one request (or batch) runs and ``max_queue`` wait."""

    def __init__(self, waiting: int, max_queue: int, retry_after_s: int) -> None:
        super().__init__(
            f"the server is busy: {waiting} request(s) already wait (--max-queue {max_queue}); retry in about {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class EngineStoppedError(Exception):
    """The engine is not running (not started yet, or shutting down)."""


def timeout_error(timeout_s: float) -> APIError:
    return APIError(
        504,
        f"the request did not finish within the server's request timeout of {timeout_s:g} s",
        type="timeout_error",
        code="timeout",
    )


def shutting_down_error() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")


def submit_or_refuse(engine: Any, prepared: PreparedRequest, loop: Any) -> Job:
    """``engine.submit`` with its refusals as the HTTP errors every endpoint answers: 429 ``queue_full`` (with
    ``Retry-After``) and 503 ``shutting_down``."""
    try:
        return engine.submit(prepared, loop)
    except QueueFullError as exc:
        raise APIError(
            429,
            str(exc),
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(exc.retry_after_s)},
        ) from None
    except EngineStoppedError:
        raise shutting_down_error() from None


def internal_error(what: str = "internal error in the engine") -> APIError:
    return APIError(500, what, type="server_error", code="internal_error")


# ---------------------------------------------------------------- events


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


# ---------------------------------------------------------------- jobs


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
    """One request in an engine: its events arrive on ``events`` in the submitting event loop."""

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

    def mark_cancelled(self, reason: str) -> None:
        """Ask the job to stop (``reason`` is kept when it is the first one); whoever runs it sees ``cancelled``."""
        self.cancel_reason = self.cancel_reason or reason
        self._cancel.set()

    def past_deadline(self, now: float | None = None) -> bool:
        """The deadline passed: the job is marked cancelled with reason ``timeout`` (unless cancelled before)."""
        if self.deadline is None or self.cancelled or (now if now is not None else time.monotonic()) <= self.deadline:
            return False
        self.mark_cancelled("timeout")
        return True

    def emit(self, event: Event) -> None:
        """Post ``event`` to the job's queue (thread-safe; dropped if the event loop is gone)."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass


class Answer:
    """One job's generation in progress: its tokens become text (``TextStream``) and ``Delta`` events.

    ``push`` is the per-token callback (``generate``'s ``on_token``, one row's of ``generate_batch``, or the
    vLLM engine's loop): it returns False, which stops this job's generation at the next token, when the
    job was cancelled (client gone), its deadline passed, or a stop string was produced.
    """

    def __init__(self, job: Job, decode: Callable[[list[int]], str]) -> None:
        self.job = job
        self.stream = TextStream(decode, job.prepared.request.stop)
        self.first = True  # no event sent yet

    def push(self, token_id: int) -> bool:
        job = self.job
        if job.cancelled or job.past_deadline():
            return False
        job.generated_tokens += 1
        text = self.stream.push(token_id)
        if text or self.first:
            job.emit(Delta(text, self.first))
            self.first = False
        return not self.stream.stopped

    def finish(self, ended_by_eos: bool) -> tuple[str, str]:
        """The end of generation: the last held-back text goes out; returns (the whole text, finish reason)."""
        tail = self.stream.finish()
        if tail or self.first:
            self.job.emit(Delta(tail, self.first))
            self.first = False
        return self.stream.text, "stop" if self.stream.stopped or ended_by_eos else "length"


class JobBook:
    """Ends jobs, once each: the outcome, the metrics and the record first, then the client's final event.

    ``records`` keeps the latest ``history`` jobs' :class:`JobRecord`. ``lock`` is the engine's own (its
    queue's condition), so ending a job and taking it from the queue never race.
    """

    def __init__(
        self,
        metrics: Metrics,
        history: int,
        lock: threading.Condition | threading.Lock,
        request_timeout_s: float | None,
        stopping: Callable[[], bool],
    ) -> None:
        self.metrics = metrics
        self.records: deque[JobRecord] = deque(maxlen=history)
        self._lock = lock
        self._request_timeout_s = request_timeout_s
        self._stopping = stopping
        self.avg_run_s = 1.0  # running mean of a run's time (one job, one batch), for Retry-After

    def ran(self, seconds: float) -> None:
        self.avg_run_s = 0.8 * self.avg_run_s + 0.2 * seconds

    def finish(self, job: Job, outcome: str, event: Event) -> None:
        """Record the outcome, then tell the client: whoever reads the answer sees the records and metrics."""
        self.end(job, outcome)
        job.emit(event)

    def end(self, job: Job, outcome: str) -> None:
        with self._lock:
            if job.outcome is not None:
                return
            job.outcome = outcome
        self.metrics.jobs.labels(outcome).inc()
        self.metrics.generated_tokens.labels(outcome).inc(job.generated_tokens)
        self.records.append(
            JobRecord(
                job.id,
                outcome,
                job.prepared.method.name,
                job.prepared.max_tokens,
                job.generated_tokens,
                job.queue_s,
                job.batch_size,
            )
        )
        job.ended.set()

    def cancel_error(self, job: Job) -> APIError:
        """The error a cancelled job is answered with: 504 (its deadline), 503 (shutdown) or 499 (client gone)."""
        if job.cancel_reason == "timeout":
            return timeout_error(self._request_timeout_s or 0.0)
        if self._stopping() or job.cancel_reason == "shutdown":
            return shutting_down_error()
        return APIError(499, "the request was cancelled", type="invalid_request_error", code="cancelled")

    def cancelled(self, job: Job) -> None:
        self.finish(job, job.cancel_reason or "cancelled", Failed(self.cancel_error(job)))

    def observe(self, res: GenerationResult) -> None:
        """A completed answer's time to first token and prompt sizes, in the metrics."""
        m = self.metrics
        m.ttft.labels(res.method).observe(res.ttft_s)
        m.prompt_tokens.labels(res.method).inc(res.prompt_tokens)
        m.kept_tokens.labels(res.method).inc(res.kept_tokens)
        if res.kv_kept is not None:
            m.kv_kept.labels(res.method).inc(res.kv_kept)
        m.kept_ratio.labels(res.method).observe(res.kept_tokens / max(res.prompt_tokens, 1))

    def complete(self, answer: Answer, res: GenerationResult, eos: bool, queue_s: float | None = None) -> None:
        """A job's generation returned (``eos``: it ended with an end-of-sequence token): its last text, metrics,
        and its ``Finished`` event, or its cancel error when it was cancelled meanwhile."""
        job = answer.job
        if job.cancelled:
            self.cancelled(job)
            return
        text, finish_reason = answer.finish(eos)
        self.observe(res)
        job.generated_tokens = res.generated_tokens
        self.finish(
            job, "completed", Finished(text, finish_reason, res, queue_s if queue_s is not None else job.queue_s or 0.0)
        )
