"""One log line per HTTP request of ``tokensieve serve`` (logger ``tokensieve.serve.requests``, level INFO).

An ASGI middleware (:class:`RequestLog`) times each request from arrival to the last byte sent (a stream
included) and, when it ends, logs::

    POST /v1/chat/completions status=200 method=snapkv prompt_tokens=812 kept_tokens=812 kv_kept=512 ttft_s=0.231 total_s=1.520

The answer's figures come from the endpoint: :func:`note_answer` (called where the response's ``tokensieve`` object is
built) records them for the request being served; a request that got no answer (an error status) logs ``-`` for
them. ``GET /health`` and ``GET /metrics`` (probes and scrapes, several a minute) are not logged.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("tokensieve.serve.requests")

QUIET_PATHS = ("/health", "/metrics")
FIELDS = ("method", "prompt_tokens", "kept_tokens", "kv_kept", "ttft_s")

# The figures of the request being served: a dict per request, filled by ``note_answer`` (tasks started while serving
# it, such as a stream's, copy the context and so share the same dict).
_CURRENT: ContextVar[dict[str, Any] | None] = ContextVar("tokensieve_request_log", default=None)


def note_answer(stats: dict[str, Any]) -> None:
    """Record an answer's figures (the ``tokensieve`` object of a response) for the current request's log line;
    outside a request (no :class:`RequestLog` in front), nothing."""
    current = _CURRENT.get()
    if current is not None:
        current.update(stats)


def _value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def format_line(method: str, path: str, status: int, stats: dict[str, Any], total_s: float) -> str:
    """The log line of one request (``stats``: what ``note_answer`` recorded, possibly nothing)."""
    fields = " ".join(f"{k}={_value(stats.get(k))}" for k in FIELDS)
    return f"{method} {path} status={status} {fields} total_s={total_s:.3f}"


class StatusWatch:
    """An ASGI ``send`` that passes every message on and remembers the response's status (``None`` until the
    response starts): what a middleware needs to report a request once it has ended."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status: int | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
        await self.send(message)


class RequestLog:
    """ASGI middleware: one INFO line per HTTP request on ``tokensieve.serve.requests`` (module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in QUIET_PATHS or not log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        start, watch = time.monotonic(), StatusWatch(send)
        stats: dict[str, Any] = {}
        token = _CURRENT.set(stats)
        try:
            await self.app(scope, receive, watch)
        finally:
            _CURRENT.reset(token)
            log.info(format_line(scope.get("method", "-"), path, watch.status or 500, stats, time.monotonic() - start))
