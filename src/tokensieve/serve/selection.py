"""The selection page: see which prompt tokens each method keeps, its answer, TTFT and KV kept.

``GET /`` serves one HTML file (``serve/page/index.html``, package data: inline script and style, no external
asset, no build step) with this server's method list written into it. ``POST /v1/tokensieve/select`` (behind the
API key like every ``/v1`` path) answers one question about one document with each of the chosen methods and
returns, for each, what it kept (:func:`method_result`); the page draws it. ``tokensieve serve --no-page`` leaves
both out. See docs/serve.md, "The selection page".

The request (every field bounded; a bad one gets a 400 naming it)::

    {"document": "...", "question": "...", "methods": ["gemfilter", "snapkv"], "max_tokens": 64,
     "params": {"gemfilter": {"topk": 256}, "snapkv": {"budget": 256}}}

Each method's run is an ordinary request of the server's queue (its limits, timeout, queue bound and
``--lock-params`` apply), one after the other, greedy, without the prefix cache (each method's TTFT is a cold
prefill of the same prompt, so the TTFTs compare) and never batched with other requests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from base64 import b64encode
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from tokensieve.evaluation.needle import make_messages
from tokensieve.methods import METHODS, describe_methods
from tokensieve.serve.jobs import (
    Event,
    Failed,
    Finished,
    Job,
    shutting_down_error,
    submit_or_refuse,
)
from tokensieve.serve.protocol import APIError, GenerationRequest, invalid, parse_json_object
from tokensieve.serve.protocol import client_gone as gone

log = logging.getLogger(__name__)

SELECT_PATH = "/v1/tokensieve/select"
PAGE_PATHS = ("/", "/ui")
MAX_QUESTION_CHARS = 4096
MAX_SELECT_TOKENS = 1024  # max_tokens of one method's answer
DEFAULT_SELECT_TOKENS = 64
MAX_PARAMS_PER_METHOD = 32


@dataclass
class SelectRequest:
    """A checked ``POST /v1/tokensieve/select`` body."""

    document: str
    question: str
    methods: list[str]
    max_tokens: int = DEFAULT_SELECT_TOKENS
    params: dict[str, dict[str, Any]] = field(default_factory=dict)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_select_request(body: dict[str, Any], methods: Sequence[str]) -> SelectRequest:
    """The body checked field by field against ``methods`` (those this server offers); a 400 ``APIError`` naming
    the field otherwise. The method parameters' own checks are the server's usual ones (when each is prepared)."""
    known = {"document", "question", "methods", "max_tokens", "params"}
    extra = sorted(set(body) - known)
    if extra:
        raise invalid(f"unknown field {extra[0]!r}; expected only: {', '.join(sorted(known))}", extra[0])
    doc = body.get("document")
    if not isinstance(doc, str) or not doc.strip():
        raise invalid(f"document must be a non-empty string, got {_short(doc)}", "document")
    question = body.get("question")
    if not isinstance(question, str) or not question.strip():
        raise invalid(f"question must be a non-empty string, got {_short(question)}", "question")
    if len(question) > MAX_QUESTION_CHARS:
        raise invalid(f"question must be at most {MAX_QUESTION_CHARS} characters, got {len(question)}", "question")
    names = body.get("methods")
    if not isinstance(names, list) or not names or not all(isinstance(m, str) for m in names):
        raise invalid(
            f"methods must be a non-empty list of method names (of: {', '.join(methods)}), got {_short(names)}",
            "methods",
        )
    for m in names:
        if m not in methods:
            raise invalid(f"unknown method {m!r} in methods; expected some of: {', '.join(methods)}", "methods")
    if len(set(names)) != len(names):
        raise invalid(f"methods must name each method once, got {names}", "methods")
    max_tokens = body.get("max_tokens", DEFAULT_SELECT_TOKENS)
    if not _is_int(max_tokens) or not 1 <= max_tokens <= MAX_SELECT_TOKENS:
        raise invalid(
            f"max_tokens must be an integer in [1, {MAX_SELECT_TOKENS}], got {_short(max_tokens)}", "max_tokens"
        )
    params = body.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise invalid(f"params must be an object of method name -> parameters object, got {_short(params)}", "params")
    for m, p in params.items():
        if m not in names:
            raise invalid(f"params names method {m!r}, which is not in methods ({', '.join(names)})", "params")
        if not isinstance(p, dict) or len(p) > MAX_PARAMS_PER_METHOD:
            raise invalid(
                f"params.{m} must be an object of at most {MAX_PARAMS_PER_METHOD} parameters, got {_short(p)}",
                f"params.{m}",
            )
    return SelectRequest(doc, question, list(names), max_tokens, {m: dict(p) for m, p in params.items()})


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def generation_request(sel: SelectRequest, method: str, tenant: str | None) -> GenerationRequest:
    """One method's run of a selection request: the question about the document as one user message (the
    wording ``tokensieve ask`` and the needle evaluation use), greedy."""
    return GenerationRequest(
        kind="chat",
        prompt=make_messages(sel.document, sel.question),
        max_tokens=sel.max_tokens,
        temperature=0.0,
        method=method,
        method_params=dict(sel.params.get(method, {})),
        tenant=tenant,
    )


def token_spans(pieces: Sequence[str]) -> list[dict[str, Any]]:
    """``[{"text", "start", "end"}]`` per prompt token: its text and its character span in the joined text (a
    token whose text completes only with the next, a split UTF-8 character, has an empty span)."""
    out, at = [], 0
    for piece in pieces:
        out.append({"text": piece, "start": at, "end": at + len(piece)})
        at += len(piece)
    return out


def method_result(ev: Finished) -> dict[str, Any]:
    """One method's entry of the response.

    ``kept_indices``: the prompt tokens the method kept, ascending. A selecting method (GemFilter) reports the
    tokens its second pass ran on (``"selection": "tokens"``); an eviction method (SnapKV, H2O, StreamingLLM,
    SepLLM) the tokens at least one layer's KV head kept after the prefill (``"selection": "kv"``), with
    ``kept_per_layer`` (per layer, how many of its KV heads kept each token); a method that reports neither (full
    attention, LazyLLM) ``null`` (``"selection": "none"``). ``kv_kept``: KV entries after the prefill over the
    prompt's tokens, averaged over the layers (1.0: the whole prompt, as full attention)."""
    r = ev.result
    n = r.prompt_tokens
    per_layer = r.details.get("kept_per_layer")
    if r.kept_indices is not None:
        kind, kept = "tokens", sorted(int(i) for i in r.kept_indices)
    elif per_layer is not None and per_layer["counts"]:
        kind = "kv"
        kept = [i for i in range(n) if any(row[i] for row in per_layer["counts"])]
    else:
        kind, kept = "none", None
    kv = r.kv_tokens_prefill
    return {
        "method": r.method,
        "params": json.loads(json.dumps(r.params, default=str)),
        "answer": r.text,
        "finish_reason": ev.finish_reason,
        "prompt_tokens": n,
        "kept_tokens": r.kept_tokens,
        "selection": kind,
        "kept_indices": kept,
        "kept_per_layer": per_layer,
        "kv_tokens_prefill": kv,
        "kv_bytes_prefill": r.kv_bytes_prefill,
        "kv_kept": (sum(kv) / len(kv) / n) if kv and n else None,
        "ttft_s": r.ttft_s,
        "queue_s": ev.queue_s,
        "generated_tokens": r.generated_tokens,
        "decode_tokens_per_s": r.decode_tokens_per_s,
    }


# ---------------------------------------------------------------- the page


def _page_source() -> str:
    return resources.files("tokensieve.serve").joinpath("page/index.html").read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    return "'sha256-" + b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def render_page(config: dict[str, Any]) -> tuple[str, str]:
    """The page's HTML with ``config`` written into its JSON data block, and its Content-Security-Policy (the
    inline script and style allowed by their hashes, requests to this origin only, nothing else)."""
    html = _page_source()
    data = json.dumps(config).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    html = html.replace("{{CONFIG}}", data)
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    styles = re.findall(r"<style>(.*?)</style>", html, flags=re.S)
    csp = "; ".join(
        [
            "default-src 'none'",
            "script-src " + " ".join(_csp_hash(s) for s in scripts),
            "style-src " + " ".join(_csp_hash(s) for s in styles),
            "connect-src 'self'",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return html, csp


def page_methods(engine: Any) -> list[str]:
    """The methods the page offers: the engine's (``vllm``: the prompt-only ones), only the server's own with
    ``--lock-params``."""
    preparer = getattr(engine, "preparer", None)
    if preparer is not None and getattr(preparer, "lock_params", False):
        return [engine.default_method]
    if getattr(engine, "name", "") == "vllm":
        from tokensieve.serve.vllm_engine import vllm_methods

        return vllm_methods()
    return list(METHODS)


NextEvent = Callable[[Job, Request | None], Awaitable[Event]]


def add_selection_routes(
    app: FastAPI,
    engine: Any,
    next_event: NextEvent,
    *,
    model_name: str,
    max_body_bytes: int,
    api_key_required: bool,
    read_body: Callable[[Request, int], Awaitable[bytes]],
    client_gone: type[Exception],
) -> None:
    """``GET /`` (and ``/ui``): the page; ``POST /v1/tokensieve/select``: the selection of each method.

    ``next_event(job, request)``: the app's wait for a job's next event (deadline, client gone: ``client_gone``).
    """
    methods = page_methods(engine)
    config = {
        "model": model_name,
        "default_method": engine.default_method,
        "methods": describe_methods(methods),
        "api_key_required": api_key_required,
        "max_tokens": {"default": DEFAULT_SELECT_TOKENS, "max": MAX_SELECT_TOKENS},
        "max_question_chars": MAX_QUESTION_CHARS,
        "max_body_bytes": max_body_bytes,
        "select_path": SELECT_PATH,
    }
    html, csp = render_page(config)
    headers = {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }

    async def page() -> Response:
        return Response(html, media_type="text/html; charset=utf-8", headers=headers)

    for path in PAGE_PATHS:
        app.add_api_route(path, page, methods=["GET"], include_in_schema=False)

    async def run_one(prepared: Any, request: Request) -> Finished | JSONResponse:
        job = submit_or_refuse(engine, prepared, asyncio.get_running_loop())
        try:
            while True:
                ev = await next_event(job, request)
                if isinstance(ev, Finished):
                    return ev
                if isinstance(ev, Failed):
                    err = ev.error
                    return APIError(
                        err.status,
                        f"{prepared.method.name}: {err.message}",
                        type=err.type,
                        param=err.param,
                        code=err.code,
                        headers=err.headers,
                    ).response()
        except client_gone:
            return gone().response()
        except BaseException:
            engine.cancel(job, "cancelled")
            raise

    @app.post(SELECT_PATH)
    async def select(request: Request) -> Response:
        try:
            return await answer(request)
        except APIError:
            raise
        except Exception as exc:  # answered here: an exception reaching uvicorn would drop the connection
            log.exception("tokensieve serve: unexpected error in %s", SELECT_PATH)
            raise APIError(
                500, f"internal server error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error"
            ) from None

    async def answer(request: Request) -> Response:
        if getattr(engine, "draining", False):
            raise shutting_down_error()
        pieces_of = getattr(engine, "prompt_pieces", None)
        if pieces_of is None:
            raise APIError(501, f"the {engine.name} engine does not answer selection requests", code="not_supported")
        raw = await read_body(request, max_body_bytes)
        body = await run_in_threadpool(parse_json_object, raw)
        sel = parse_select_request(body, methods)
        tenant = getattr(request.state, "tenant", None)
        prepared = []
        for m in sel.methods:  # every method checked before any runs
            try:
                p = await run_in_threadpool(engine.prepare, generation_request(sel, m, tenant))
            except APIError as exc:  # the field of this request that carried the bad value
                param = {"messages": "document", "max_tokens": "max_tokens", "tokensieve.method": "methods"}.get(
                    exc.param or "", f"params.{m}"
                )
                raise APIError(exc.status, f"{m}: {exc.message}", type=exc.type, param=param, code=exc.code) from None
            p.prefix_tokens = None  # a cold prefill per method: the TTFTs compare
            p.run.record_selection = True
            prepared.append(p)
        ids = prepared[0].input_ids[0].tolist()
        tokens = token_spans(await run_in_threadpool(pieces_of, ids))
        results = []
        for p in prepared:
            out = await run_one(p, request)
            if isinstance(out, JSONResponse):
                return out
            results.append(method_result(out))
        return JSONResponse(
            {
                "object": "tokensieve.selection",
                "model": model_name,
                "prompt_tokens": len(ids),
                "tokens": tokens,
                "results": results,
            }
        )
