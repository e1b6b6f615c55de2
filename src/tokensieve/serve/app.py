"""The FastAPI app: OpenAI's chat and text completion endpoints over one tokensieve engine.

``create_app(model, tokenizer, ...)`` returns an app that owns its :class:`~tokensieve.serve.engine.Engine`
(started and stopped with the app's lifespan) and its :class:`~tokensieve.serve.metrics.Metrics`
registry; nothing lives at module level, so several apps can run in one process.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``"stream": true`` for
server-sent events), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics``; unless ``page=False``, the selection
page (``GET /``) and its ``POST /v1/tokensieve/select`` (``tokensieve.serve.selection``).
See docs/serve.md for the behaviour of each, the errors and the ``tokensieve`` extension field.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokensieve.engine.runner import generate, generate_batch
from tokensieve.errors import InputError, check_int
from tokensieve.serve.engine import Engine, ServingEngine
from tokensieve.serve.jobs import (
    Delta,
    Event,
    Failed,
    Finished,
    Job,
    shutting_down_error,
    submit_or_refuse,
    timeout_error,
)
from tokensieve.serve.metrics import Metrics, endpoint_label
from tokensieve.serve.protocol import (
    DEFAULT_MAX_TOKENS,
    SSE_DONE,
    APIError,
    GenerationRequest,
    Kind,
    chunk_body,
    client_gone,
    completion_body,
    error_body,
    new_id,
    now,
    parse_chat_request,
    parse_completion_request,
    parse_json_object,
    sse,
    usage_body,
    usage_chunk,
)
from tokensieve.serve.request_log import RequestLog, StatusWatch, note_answer
from tokensieve.serve.worker import BatchFn, GenerateFn

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often a waiting handler checks for a client that went away
COMPLETION_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
DEFAULT_MAX_BODY_BYTES = 8 << 20  # request bodies above this get 413 before they are read
PARSE_OFF_LOOP_BYTES = 64 << 10  # bodies above this are parsed on a worker thread, not on the event loop
JSON_TYPES = ("application/json",)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")  # the Host names a loopback-bound server answers by default


def is_loopback(host: str) -> bool:
    """``host`` (a bind address or a Host name, without port) is a loopback name or address."""
    import ipaddress

    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name of a Host header without its port: ``[::1]:8000`` -> ``::1``, ``Example.COM.:80`` -> ``example.com``."""
    h = header.strip()
    if h.startswith("["):
        name = h[1 : h.find("]")] if "]" in h else h[1:]
    else:
        name = h.rsplit(":", 1)[0] if h.count(":") == 1 else h
    return name.rstrip(".").lower()


def _json_reply(status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> list[Message]:
    """The ASGI messages of a JSON response (for middleware that answers before the app)."""
    data = json.dumps(body).encode("utf-8")
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())] + list(headers)
    return [
        {"type": "http.response.start", "status": status, "headers": head},
        {"type": "http.response.body", "body": data},
    ]


class _FrontDoor:
    """ASGI middleware in front of the endpoints: on ``/v1/...`` paths the API key (``Authorization: Bearer
    KEY``, as vLLM and OpenAI; 401 otherwise) when the app has keys; on POST the JSON content type (415
    otherwise: a ``text/plain`` body is a "simple" cross-origin request any web page can send) and the body
    size from ``Content-Length`` (413 past ``max_body_bytes``, before a byte of it is read; a body without a
    length is counted as it is read, ``read_body``). The key a request came with is ``scope["state"]["tenant"]``.
    ``/health`` and ``/metrics`` stay open (probes and scrapers). With ``allowed_hosts`` (not None), first
    of all, on every path: the ``Host`` header must name a loopback address or one of ``allowed_hosts``
    (421 otherwise: a DNS-rebinding page reaches a local server under its own domain name); ``"*"``
    allows any."""

    def __init__(
        self, app: ASGIApp, api_keys: tuple[str, ...], max_body_bytes: int, allowed_hosts: tuple[str, ...] | None = None
    ) -> None:
        self.app = app
        self.keys = [k.encode("utf-8") for k in api_keys]
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = (
            None if allowed_hosts is None or "*" in allowed_hosts else {host_name(h) for h in allowed_hosts}
        )

    def _host_ok(self, headers: dict[bytes, bytes]) -> bool:
        if self.allowed_hosts is None:
            return True
        name = host_name(headers.get(b"host", b"").decode("latin-1"))
        return bool(name) and (is_loopback(name) or name in self.allowed_hosts)

    def _tenant(self, scope: Scope) -> tuple[bool, str | None]:
        """(allowed, the key it matched) for a /v1 request."""
        if not self.keys:
            return True, None
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = auth.partition(b" ")
        given = given.strip()
        if scheme.lower() != b"bearer" or not given:
            return False, None
        match = None
        for key in self.keys:  # every key compared, in constant time each
            if hmac.compare_digest(given, key):
                match = key
        return match is not None, None if match is None else match.decode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, headers = scope.get("path", ""), dict(scope.get("headers") or [])
        reply: list[Message] | None = None
        if not self._host_ok(headers):
            given = headers.get(b"host", b"").decode("latin-1")
            reply = _json_reply(
                421,
                error_body(
                    f"this server does not answer for the host {given!r} (the Host header must name a loopback address or "
                    f"one given with --allowed-host)",
                    type="invalid_request_error",
                    code="invalid_host",
                ),
            )
        elif path == "/v1" or path.startswith("/v1/"):
            allowed, tenant = self._tenant(scope)
            if not allowed:
                reply = _json_reply(
                    401,
                    error_body(
                        "missing or incorrect API key: send it as 'Authorization: Bearer KEY'",
                        type="invalid_request_error",
                        code="invalid_api_key",
                    ),
                    [(b"www-authenticate", b"Bearer")],
                )
            else:
                scope.setdefault("state", {})["tenant"] = tenant
        if reply is None and scope.get("method") == "POST":
            media = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            length = headers.get(b"content-length")
            if media not in JSON_TYPES:
                reply = _json_reply(
                    415,
                    error_body(
                        f"the request body must be JSON with 'Content-Type: application/json', got {media or 'no content type'!r}",
                        type="invalid_request_error",
                        code="unsupported_media_type",
                    ),
                )
            elif length is not None and (not length.strip().isdigit() or int(length) > self.max_body_bytes):
                reply = _json_reply(413, body_too_large(self.max_body_bytes))
        if reply is None:
            await self.app(scope, receive, send)
            return
        for message in reply:
            await send(message)


def body_too_large(limit: int) -> dict[str, Any]:
    return error_body(
        f"the request body is larger than this server's limit of {limit} bytes (--max-body-bytes)",
        type="invalid_request_error",
        code="request_too_large",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes (a body sent without a length)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, body_too_large(limit)["error"]["message"], code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class ClientGone(Exception):
    """The client closed the connection before its answer started."""


class _RequestMetrics:
    """ASGI middleware: counts every HTTP response by endpoint and status, times completion requests
    from arrival to the last byte sent (streams included)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, watch = time.monotonic(), StatusWatch(send)
        try:
            await self.app(scope, receive, watch)
        finally:
            endpoint = endpoint_label(scope.get("path", ""))
            self.metrics.requests.labels(endpoint, str(watch.status or 500)).inc()
            if endpoint in COMPLETION_ENDPOINTS:
                self.metrics.request_duration.labels(endpoint).observe(time.monotonic() - start)


class _JobStream(StreamingResponse):
    """An SSE response that cancels its job when it ends for any reason (client gone included)."""

    def __init__(self, content: AsyncIterator[bytes], job: Job, engine: ServingEngine) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._job = job
        self._engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._engine.cancel(self._job, "cancelled")  # a no-op when the job already ended


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _stats(ev: Finished) -> dict[str, Any]:
    """The response's ``tokensieve`` object (noted for the request's log line too)."""
    r = ev.result
    out = {
        "method": r.method,
        "params": _json_safe(r.params),
        "prompt_tokens": r.prompt_tokens,
        "kept_tokens": r.kept_tokens,
        "kv_kept": r.kv_kept,
        "ttft_s": r.ttft_s,
        "queue_s": ev.queue_s,
        "decode_tokens_per_s": r.decode_tokens_per_s,
        "generated_tokens": r.generated_tokens,
        "prefix_cached_tokens": int(r.details.get("prefix_cached_tokens", 0)),
    }
    note_answer(out)
    return out


def _usage(ev: Finished) -> dict[str, Any]:
    """OpenAI's usage; prompt tokens taken from the prefix cache in ``prompt_tokens_details.cached_tokens``."""
    r = ev.result
    return usage_body(
        r.prompt_tokens,
        r.generated_tokens,
        int(r.details.get("prefix_cached_tokens", 0)),
        kept_tokens=r.kept_tokens,
        kv_kept=r.kv_kept,
        ttft_s=r.ttft_s,
    )


def create_app(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    model_name: str = "smollm2",
    method: str = "full",
    method_params: dict[str, Any] | None = None,
    max_queue: int = 16,
    request_timeout_s: float | None = 600.0,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    generate_fn: GenerateFn = generate,
    prefix_cache_gib: float = 1.0,
    max_batch: int = 1,
    generate_batch_fn: BatchFn = generate_batch,
    api_keys: Sequence[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    allowed_hosts: Sequence[str] | None = None,
    lock_params: bool = False,
    filter_models: Mapping[str, Any] | None = None,
    page: bool = True,
) -> FastAPI:
    """An OpenAI-compatible app serving ``model`` with ``method`` (and ``method_params``) by default.

    The app owns its engine (a worker thread started by the app's lifespan, so run it under a server
    such as uvicorn, which runs the lifespan) and its metrics registry (``app.state.metrics``).
    ``prefix_cache_gib``: size of the engine's prefix cache (0 disables it; docs/prefix_cache.md).
    ``max_batch``: requests the engine may generate together (1: one at a time; see ``Engine``).
    ``api_keys``: when given, ``/v1`` requests need one of them (``Authorization: Bearer KEY``), and each
    key's requests have their own prefix-cache entries. ``max_body_bytes``: larger bodies get 413.
    ``allowed_hosts``: None (default) checks no Host header; a list (``LOOPBACK_HOSTS`` for a server bound
    to loopback, what ``tokensieve serve`` does) answers 421 to a request whose Host is neither a loopback
    address nor in the list (DNS rebinding); ``["*"]`` allows any. ``lock_params``: requests run with
    ``method`` and ``method_params`` only; a request that sets another method or parameter value gets 400.
    ``filter_models``: ``{name: core.draft.DraftModel}``, the draft models GemFilter requests may name
    (``"tokensieve": {"method": "gemfilter", "filter_model": name}``; the method parameters may name one too).
    ``page``: serve the selection page and its endpoint (``tokensieve.serve.selection``; False: neither).
    """
    engine = Engine(
        model,
        tokenizer,
        method=method,
        method_params=method_params,
        max_queue=max_queue,
        request_timeout_s=request_timeout_s,
        metrics=Metrics(),
        generate_fn=generate_fn,
        prefix_cache_gib=prefix_cache_gib,
        max_batch=max_batch,
        generate_batch_fn=generate_batch_fn,
        lock_params=lock_params,
        filter_models=filter_models,
    )
    return app_for_engine(
        engine,
        model_name=model_name,
        default_max_tokens=default_max_tokens,
        api_keys=api_keys,
        max_body_bytes=max_body_bytes,
        allowed_hosts=allowed_hosts,
        page=page,
    )


def app_for_engine(
    engine: ServingEngine,
    *,
    model_name: str,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    api_keys: Sequence[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    allowed_hosts: Sequence[str] | None = None,
    page: bool = True,
) -> FastAPI:
    """The app over an engine built elsewhere (``--engine vllm``: :class:`~tokensieve.serve.vllm_engine.VLLMEngine`).

    The endpoints only use the engine's request interface (prepare, submit, cancel, start/stop and the
    state /health reports), so every engine answers the same wire format; the engine's metrics
    registry is the app's.
    """
    if isinstance(api_keys, str) or not all(isinstance(k, str) and k.strip() and k == k.strip() for k in api_keys):
        raise InputError("api_keys must be a list of non-empty key strings without surrounding spaces")
    check_int("max_body_bytes", max_body_bytes, 1)
    if not isinstance(page, bool):
        raise InputError(f"page must be True or False, got {page!r}")
    if allowed_hosts is not None and (
        isinstance(allowed_hosts, str)
        or not all(isinstance(h, str) and host_name(h) and " " not in h.strip() for h in allowed_hosts)
    ):
        raise InputError("allowed_hosts must be a list of host names (or '*'), without spaces")
    metrics = engine.metrics
    created = now()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="tokensieve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.model_name = model_name
    app.state.api_keys = bool(api_keys)
    app.add_middleware(
        _FrontDoor,
        api_keys=tuple(api_keys),
        max_body_bytes=max_body_bytes,
        allowed_hosts=None if allowed_hosts is None else tuple(allowed_hosts),
    )
    app.add_middleware(RequestLog)  # one log line per request, the front door's answers included
    app.add_middleware(_RequestMetrics, metrics=metrics)  # outermost: counts the front door's answers too

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(
            error_body(str(exc.detail), type="invalid_request_error", code=code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("tokensieve serve: unexpected error")
        return JSONResponse(
            error_body(
                f"internal server error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error"
            ),
            status_code=500,
        )

    async def next_event(job: Job, request: Request | None) -> Event:
        """The job's next event; a timeout error at its deadline. With ``request``, a client that
        goes away cancels the job (``ClientGone``)."""
        while True:
            if not job.events.empty():  # an answer that is already here wins over a deadline just passed
                return job.events.get_nowait()
            wait = POLL_S if request is not None else None
            if job.deadline is not None:
                remaining = job.deadline - time.monotonic()
                if remaining <= 0:
                    engine.cancel(job, "timeout")
                    return Failed(timeout_error(engine.request_timeout_s or 0.0))
                wait = remaining if wait is None else min(wait, remaining)
            try:
                return await asyncio.wait_for(job.events.get(), timeout=wait)
            except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
                if request is not None and await request.is_disconnected():
                    engine.cancel(job, "cancelled")
                    raise ClientGone from None

    async def stream_events(
        kind: Kind, req: GenerationRequest, job: Job, first: Event, rid: str, created_at: int
    ) -> AsyncIterator[bytes]:
        ev, started = first, False
        while True:
            if isinstance(ev, Delta):
                if ev.text or not started:
                    yield sse(chunk_body(kind, rid, created_at, model_name, ev.text, first=not started))
                    started = True
            elif isinstance(ev, Finished):
                if not started:
                    yield sse(chunk_body(kind, rid, created_at, model_name, "", first=True))
                final = chunk_body(kind, rid, created_at, model_name, None, finish_reason=ev.finish_reason)
                final["tokensieve"] = _stats(ev)
                yield sse(final)
                if req.include_usage:
                    yield sse(usage_chunk(kind, rid, created_at, model_name, _usage(ev)))
                yield SSE_DONE
                return
            else:
                yield sse(ev.error.body())
                yield SSE_DONE
                return
            ev = await next_event(job, None)

    async def complete(request: Request, kind: Kind) -> Response:
        try:
            return await answer(request, kind)
        except APIError:
            raise
        except Exception as exc:  # answered here: an exception reaching uvicorn would drop the connection
            log.exception("tokensieve serve: unexpected error in %s", request.url.path)
            raise APIError(
                500, f"internal server error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error"
            ) from None

    async def answer(request: Request, kind: Kind) -> Response:
        if getattr(engine, "draining", False):  # shutting down: no body read, no tokenizing
            raise shutting_down_error()
        raw = await read_body(request, max_body_bytes)
        body = (
            await run_in_threadpool(parse_json_object, raw)
            if len(raw) > PARSE_OFF_LOOP_BYTES
            else parse_json_object(raw)
        )
        parse = parse_chat_request if kind == "chat" else parse_completion_request
        req = parse(body, default_max_tokens)
        req.tenant = getattr(request.state, "tenant", None)
        prepared = await run_in_threadpool(engine.prepare, req)
        job = submit_or_refuse(engine, prepared, asyncio.get_running_loop())
        rid, created_at = new_id(kind), now()
        try:
            ev = await next_event(job, request)  # headers wait for the first token, so errors get their status
            if isinstance(ev, Failed):
                return ev.error.response()
            if req.stream:
                return _JobStream(stream_events(kind, req, job, ev, rid, created_at), job, engine)
            while not isinstance(ev, Finished):
                if isinstance(ev, Failed):
                    return ev.error.response()
                ev = await next_event(job, request)
        except ClientGone:
            return client_gone().response()
        except BaseException:
            engine.cancel(job, "cancelled")
            raise
        return JSONResponse(
            completion_body(kind, rid, created_at, model_name, ev.text, ev.finish_reason, _usage(ev), _stats(ev))
        )

    if page:
        from tokensieve.serve.selection import add_selection_routes

        add_selection_routes(
            app,
            engine,
            next_event,
            model_name=model_name,
            max_body_bytes=max_body_bytes,
            api_key_required=bool(api_keys),
            read_body=read_body,
            client_gone=ClientGone,
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, "completion")

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "tokensieve"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise APIError(
                404,
                f"model {model_id!r} is not served here; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        stalled = bool(getattr(engine, "stalled", False))
        draining = bool(getattr(engine, "draining", False))
        ok = engine.alive and not stalled and not draining
        if ok:
            status = "ok"
        elif draining and engine.alive:
            status = "draining"
        else:
            status = "stalled" if stalled and engine.alive else "unavailable"
        return JSONResponse(
            {
                "status": status,
                "overdue_s": round(float(getattr(engine, "overdue_s", 0.0)), 3),
                "model": model_name,
                "method": engine.default_method,
                "filter_models": list(getattr(engine, "filter_models", {})),
                "queue_depth": engine.queue_depth,
                "max_queue": engine.max_queue,
                "busy": engine.busy,
                "engine": engine.engine_info(),
                "prefix_cache": engine.prefix_cache_info(),
            },
            status_code=200 if ok else 503,
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        content, content_type = metrics.render()
        return Response(content, media_type=content_type)

    return app
