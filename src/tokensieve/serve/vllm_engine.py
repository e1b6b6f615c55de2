"""The vLLM engine (``tokensieve serve --engine vllm``): tokensieve's filter pass, vLLM's async engine for the rest.

Per request:

1. ``prepare``: the same request preparation as the transformers engine (``serve.requests.RequestPreparer``,
   so a request is checked, templated, encoded and its method prepared once, by the same code whichever
   engine answers it), composed with what only vLLM limits: the method must be one vLLM can run (a
   prompt-selection method, GemFilter, or ``full``; KV-cache methods change the cache while decoding, which
   vLLM does not expose, and get a 400 naming the allowed methods), the kept prompt must fit vLLM's
   ``max_model_len``, and vLLM must accept the sampling settings.
2. The filter pass (``tokensieve.integrations.vllm_adapter.select_tokens`` on the prepared run) runs on the transformers
   model in one worker thread, one request at a time (``full`` skips it and keeps the whole prompt).
3. The kept ids go to vLLM's ``AsyncLLM`` as a token prompt, with ``SamplingParams`` taken from the
   request and the request's prefix-cache salt (its ``cache_salt`` and API key, ``serve.requests.prefix_salt``)
   as vLLM's own ``cache_salt``: vLLM's prefix caching then shares blocks only between requests of one salt.
   vLLM streams new token ids; a :class:`~tokensieve.serve.jobs.Answer` turns them into text and posts the
   same ``Delta`` / ``Finished`` / ``Failed`` events as the transformers engine (``serve.jobs``), so the
   FastAPI app is unchanged. A cancelled job (client gone, timeout, shutdown) cancels its asyncio task, and
   vLLM's ``generate`` aborts the request on that.

vLLM batches running requests itself: up to ``max_num_seqs`` run at once and ``max_queue`` more may wait
(in the filter pass's queue or vLLM's scheduler); beyond that a request gets 429.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokensieve.engine.detokenize import Decoder
from tokensieve.engine.runner import GenerationResult, stop_token_ids
from tokensieve.errors import InputError, check_int
from tokensieve.integrations.vllm_adapter import Selection, import_vllm, select_tokens
from tokensieve.methods import METHODS, Method
from tokensieve.serve.jobs import Answer, EngineStoppedError, Failed, Job, JobBook, QueueFullError, internal_error
from tokensieve.serve.metrics import Metrics
from tokensieve.serve.protocol import APIError, GenerationRequest, invalid
from tokensieve.serve.requests import PreparedRequest, RequestPreparer

log = logging.getLogger(__name__)


def vllm_methods() -> list[str]:
    """The methods a vLLM engine can run (``capabilities.prompt_only``): full attention and the prompt-selection
    methods, whose whole effect is the token ids they feed the model."""
    return [name for name, cls in METHODS.items() if cls.capabilities.prompt_only]


def _whole_prompt(ids: list[int], method: Method) -> Selection:
    """``full``: every prompt token goes to vLLM, no filter pass."""
    return Selection(
        input_ids=ids,
        kept_indices=list(range(len(ids))),
        kept_ids=list(ids),
        filter_s=0.0,
        filter_skipped=True,
        method=method.name,
        params=method.params(),
    )


class VLLMEngine:
    """Serves requests with tokensieve's filter pass on ``filter_model`` and vLLM's ``AsyncLLM`` for the answer.

    ``engine_args``: keyword arguments of vLLM's ``AsyncEngineArgs`` (``model``: the same checkpoint as
    ``filter_model``, so the kept ids mean the same tokens; ``dtype``, ``max_model_len``, ...), checked by
    vLLM here (``InputError``). The ``AsyncLLM`` (weights, KV cache, its engine-core process) is built by
    :meth:`start`, on the event loop that serves the requests (the app's lifespan). The pieces it shares with
    the transformers engine are composed, not inherited: the request preparer, jobs and their book, the
    answer's detokenizer; the queue is vLLM's scheduler (``max_num_seqs`` run, ``max_queue`` more wait).
    """

    name = "vllm"

    def __init__(
        self,
        filter_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        engine_args: Mapping[str, Any],
        *,
        method: str = "full",
        method_params: dict[str, Any] | None = None,
        max_queue: int = 16,
        request_timeout_s: float | None = 600.0,
        metrics: Metrics | None = None,
        history: int = 1024,
        lock_params: bool = False,
        filter_models: Mapping[str, Any] | None = None,
    ) -> None:
        import_vllm()  # VLLMNotInstalledError (with the install command) before anything else
        check_int("max_queue", max_queue, 0)
        if request_timeout_s is not None and not (request_timeout_s > 0):
            raise InputError(
                f"request_timeout must be a positive number of seconds (or None), got {request_timeout_s!r}"
            )
        self.preparer = RequestPreparer(
            filter_model,
            tokenizer,
            method=method,
            method_params=method_params,
            lock_params=lock_params,
            refuse=self._refuse,
            check=self._check,
            filter_models=filter_models,
        )
        if self.default_method not in vllm_methods():
            raise InputError(
                f"the server's default method {self.default_method!r} cannot run with --engine vllm; "
                f"expected one of: {', '.join(vllm_methods())}"
            )
        from vllm.engine.arg_utils import AsyncEngineArgs

        self.engine_args = AsyncEngineArgs(**engine_args)
        try:  # vLLM's checks of its arguments (e.g. max_model_len against the model's), before any server starts
            self.vllm_config = self.engine_args.create_engine_config()
        except ValueError as exc:
            raise InputError(f"vLLM refused its engine arguments: {exc}") from None
        self.model = filter_model
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.metrics = metrics or Metrics()
        self.prefix_off_reason = (
            "not used with --engine vllm (vLLM's own prefix caching sees the kept ids, salted per tenant)"
        )
        self.llm: Any = None  # vllm AsyncLLM, from start()
        self.max_model_len = int(self.vllm_config.model_config.max_model_len)
        self.max_num_seqs = int(self.vllm_config.scheduler_config.max_num_seqs)
        self._decoder = Decoder(tokenizer)
        self._stops = stop_token_ids(filter_model, tokenizer)
        self._lock = threading.Condition()
        self._stopping = False
        self._draining = False
        self.book = JobBook(self.metrics, history, self._lock, request_timeout_s, lambda: self._stopping)
        self.peak_queue_depth = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._filter_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokensieve-filter")
        self._tasks: dict[str, tuple[Job, asyncio.Task[None]]] = {}  # jobs in flight, by id

    # -- what the app and /health read

    @property
    def default_method(self) -> str:
        return self.preparer.default_method

    @property
    def filter_models(self) -> dict[str, Any]:
        """The draft models requests may name (``RequestPreparer``), by name."""
        return self.preparer.filter_models

    @property
    def records(self):  # deque[JobRecord]
        return self.book.records

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def alive(self) -> bool:
        return self.llm is not None and not self._stopping and not self.llm.errored

    @property
    def queue_depth(self) -> int:
        """Requests in flight beyond what vLLM runs at once."""
        return max(0, len(self._tasks) - self.max_num_seqs)

    @property
    def busy(self) -> bool:
        return bool(self._tasks)

    def engine_info(self) -> dict[str, Any]:
        vllm = import_vllm()
        unfinished = self.llm.get_num_unfinished_requests() if self.llm is not None else 0
        return {
            "name": self.name,
            "vllm_version": getattr(vllm, "__version__", None),
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "in_flight": len(self._tasks),
            "vllm_unfinished_requests": unfinished,
        }

    def prefix_cache_info(self) -> dict[str, Any]:
        return {"enabled": False, "reason": self.prefix_off_reason}

    # -- lifecycle

    def start(self) -> None:
        """Build vLLM's async engine (loads the weights; tens of seconds) on the running event loop."""
        if self.llm is not None:
            raise RuntimeError("the engine was already started")
        from vllm.v1.engine.async_llm import AsyncLLM

        self._loop = asyncio.get_running_loop()
        args = self.engine_args
        self.llm = AsyncLLM.from_vllm_config(
            self.vllm_config, disable_log_stats=args.disable_log_stats, enable_log_requests=args.enable_log_requests
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, cancel the ones in flight (503; vLLM aborts them), shut vLLM down."""
        with self._lock:
            self._stopping = True
            inflight = list(self._tasks.values())
        for job, task in inflight:
            self._cancel_task(job, task, "cancelled")
        end = time.monotonic() + timeout_s
        for job, _ in inflight:
            job.ended.wait(max(0.0, end - time.monotonic()))
        self._filter_pool.shutdown(wait=False, cancel_futures=True)
        if self.llm is not None:
            self.llm.shutdown()

    def drain(self) -> None:
        """Refuse new requests (503); the ones in flight (all started: vLLM schedules them) finish."""
        with self._lock:
            self._draining = True

    def abort_running(self) -> int:
        """Cancel every request in flight (503; vLLM aborts them)."""
        with self._lock:
            inflight = list(self._tasks.values())
        for job, task in inflight:
            self._cancel_task(job, task, "shutdown")
        return len(inflight)

    # -- requests

    def method_for(self, req: GenerationRequest) -> tuple[str, dict[str, Any]]:
        return self.preparer.method_for(req)

    def prepare(self, req: GenerationRequest) -> PreparedRequest:
        """The shared request preparation, with vLLM's limits (``_refuse``, ``_check``) composed in."""
        return self.preparer.prepare(req)

    @staticmethod
    def _refuse(name: str) -> APIError | None:
        """A 400 for a method vLLM cannot run (asked before the prompt is encoded)."""
        if name in vllm_methods():
            return None
        return invalid(
            f"method {name!r} cannot run with --engine vllm (only prompt-selection methods hand vLLM a shorter "
            f"prompt; KV-cache methods need tokensieve's own decoding); expected one of: {', '.join(vllm_methods())}",
            "tokensieve.method",
            code="unsupported_method",
        )

    def _check(self, prepared: PreparedRequest) -> None:
        """What only vLLM limits: the kept prompt's length against ``max_model_len``, and the sampling fields."""
        n = prepared.prompt_tokens
        kept = n if not prepared.method.capabilities.selects_prompt else min(int(prepared.method.topk), n)
        if kept >= self.max_model_len:
            param = "messages" if prepared.request.kind == "chat" else "prompt"
            raise invalid(
                f"vLLM would get {kept} prompt tokens ({prepared.method.name}, of {n}), but its max_model_len is "
                f"{self.max_model_len} (--vllm-max-model-len); shorten the prompt or keep fewer tokens (topk)",
                param,
                code="context_length_exceeded",
            )
        self._sampling_params(prepared)  # vLLM's own checks of the sampling fields, answered 400 now

    def _sampling_params(self, prepared: PreparedRequest) -> Any:
        """vLLM's ``SamplingParams`` for a request. Stopping follows tokensieve's rule (``stop_token_ids``
        of the model and tokenizer; ``ignore_eos`` turns off vLLM's own end-of-sequence set) and text
        comes from tokensieve's decoding, so both engines end and spell an answer the same way."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        s = prepared.sampling
        try:
            return SamplingParams(
                n=1,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                seed=s.seed,
                max_tokens=prepared.max_tokens,
                stop_token_ids=sorted(self._stops),
                ignore_eos=True,
                detokenize=False,
                output_kind=RequestOutputKind.DELTA,
            )
        except (VLLMClientError, ValueError, TypeError) as exc:
            raise invalid(f"vLLM refused the sampling parameters: {exc}", None) from None

    def submit(self, prepared: PreparedRequest, loop: asyncio.AbstractEventLoop) -> Job:
        """Start a prepared request on ``loop`` (the running event loop); ``QueueFullError`` when
        ``max_num_seqs`` run and ``max_queue`` wait."""
        deadline = None if self.request_timeout_s is None else time.monotonic() + self.request_timeout_s
        job = Job(prepared, loop, deadline)
        with self._lock:
            if self._stopping or self._draining or self.llm is None:
                raise EngineStoppedError("the engine is not running")
            waiting = self.queue_depth
            if len(self._tasks) >= self.max_num_seqs + self.max_queue:
                retry = max(1, min(3600, math.ceil(self.book.avg_run_s * (waiting + 1) / self.max_num_seqs)))
                raise QueueFullError(waiting, self.max_queue, retry)
            task = loop.create_task(self._run(job))
            self._tasks[job.id] = (job, task)
            self.peak_queue_depth = max(self.peak_queue_depth, self.queue_depth)
            self._set_gauges()
        task.add_done_callback(lambda t: self._task_done(job, t))
        return job

    def prompt_pieces(self, ids: list[int]) -> list[str]:
        """Each prompt token's text, special tokens included (``Decoder.pieces``), for the selection page."""
        return self._decoder.pieces(ids)

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """Stop ``job``: its task is cancelled, which aborts its vLLM request (``reason``: cancelled or timeout)."""
        with self._lock:
            entry = self._tasks.get(job.id)
        if entry is not None:
            self._cancel_task(job, entry[1], reason)

    def _cancel_task(self, job: Job, task: asyncio.Task[None], reason: str) -> None:
        with self._lock:
            if job.outcome is not None:
                return
            job.mark_cancelled(reason)
        try:
            job._loop.call_soon_threadsafe(task.cancel)  # cancel() may come from another thread (stop)
        except RuntimeError:  # the loop is closed: nothing runs the task any more
            pass

    def _set_gauges(self) -> None:
        self.metrics.queue_depth.set(self.queue_depth)
        self.metrics.running.set(min(len(self._tasks), self.max_num_seqs))

    def _task_done(self, job: Job, task: asyncio.Task[None]) -> None:
        """Every way a job's task ends: a cancelled one (possibly before it ran) is answered here."""
        with self._lock:
            self._tasks.pop(job.id, None)
            self._set_gauges()
        if job.outcome is not None:
            return
        if task.cancelled():
            self.book.cancelled(job)
        else:
            exc = task.exception()
            log.error("tokensieve vllm engine: job %s ended without an answer", job.id, exc_info=exc)
            self.book.finish(job, "failed", Failed(internal_error()))

    # -- one request

    def _select(self, job: Job) -> Selection | None:
        """The filter pass on the prepared run (worker thread); None when the job was cancelled while it waited."""
        job.started_at = time.monotonic()
        if job.cancelled:
            return None
        prep = job.prepared
        if not prep.method.capabilities.selects_prompt:  # the whole prompt (full attention): no filter pass
            return _whole_prompt(prep.input_ids[0].tolist(), prep.method)
        return select_tokens(self.model, self.tokenizer, prep.run)

    def _prompt(self, sel: Selection, prep: PreparedRequest) -> Any:
        """vLLM's token prompt for the kept ids, with the request's salt as vLLM's ``cache_salt``."""
        from vllm.inputs import TokensPrompt

        if prep.prefix_salt is None:
            return TokensPrompt(prompt_token_ids=sel.kept_ids)
        return TokensPrompt(prompt_token_ids=sel.kept_ids, cache_salt=prep.prefix_salt)

    async def _run(self, job: Job) -> None:
        from vllm.exceptions import VLLMClientError
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        assert self._loop is not None and self.llm is not None
        prep = job.prepared
        try:
            sel = await self._loop.run_in_executor(self._filter_pool, self._select, job)
        except Exception as exc:
            log.exception("tokensieve vllm engine: filter pass failed for job %s", job.id)
            self.book.finish(
                job, "failed", Failed(internal_error(f"the filter pass failed: {type(exc).__name__}: {exc}"))
            )
            return
        queue_s = job.queue_s or 0.0
        self.metrics.queue_wait.observe(queue_s)
        if sel is None:
            raise asyncio.CancelledError  # answered by _task_done
        answer = Answer(job, self._decoder)
        first_at: float | None = None
        last_at = time.monotonic()
        finish: str | None = None
        gen = None
        try:
            # A token prompt rendered the way vLLM's completions path renders one (passing it raw is deprecated).
            prompt = parse_model_prompt(self.llm.model_config, self._prompt(sel, prep))
            (engine_input,) = await self.llm.renderer.render_cmpl_async([prompt])
            gen = self.llm.generate(engine_input, self._sampling_params(prep), request_id=job.id)
            more = True
            async for out in gen:
                choice = out.outputs[0]
                for token_id in choice.token_ids:
                    last_at = time.monotonic()
                    first_at = first_at or last_at
                    more = answer.push(token_id)
                    if not more:
                        break
                if not more:
                    break
                finish = choice.finish_reason
        except VLLMClientError as exc:
            self.book.finish(job, "rejected", Failed(invalid(f"vLLM refused the request: {exc}", None)))
            return
        except Exception as exc:
            log.exception("tokensieve vllm engine: vLLM failed for job %s", job.id)
            self.book.finish(job, "failed", Failed(internal_error(f"generation failed: {type(exc).__name__}: {exc}")))
            return
        finally:
            if gen is not None:
                await gen.aclose()  # a stop string ends the answer early: vLLM aborts the request here
        started = job.started_at or last_at
        self.book.ran(last_at - started)
        n_new = job.generated_tokens
        decode_s = last_at - first_at if first_at is not None else 0.0
        res = GenerationResult(
            text=answer.stream.text,
            method=sel.method,
            params=sel.params,
            prompt_tokens=len(sel.input_ids),
            kept_tokens=len(sel.kept_ids),
            ttft_s=(first_at or last_at) - started,
            decode_tokens_per_s=(n_new - 1) / decode_s if n_new >= 2 and decode_s > 0 else None,
            # vLLM holds the KV cache: tokensieve measures neither its memory nor its entries here.
            peak_memory_bytes=0,
            kv_tokens_prefill=[],
            kv_tokens_final=[],
            kv_kept=len(sel.kept_ids),  # vLLM holds the kept tokens' KV
            kv_bytes_prefill=0,
            kv_bytes_final=0,
            generated_tokens=n_new,
            token_ids=list(answer.stream.ids),
            kept_indices=sel.kept_indices,
            details={"engine": "vllm", "filter_s": sel.filter_s, "filter_skipped": sel.filter_skipped},
        )
        self.book.complete(answer, res, eos=finish == "stop", queue_s=queue_s)
