"""The OpenAI wire format: request parsing and validation, response and chunk bodies, error bodies.

Requests are parsed by hand (not by a schema library) so that every rejection names the field, the
value it got and what was expected, in OpenAI's error shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}}

Fields OpenAI clients may send that tokensieve does not use (``frequency_penalty``, ``presence_penalty``,
``user``, ``logit_bias``, ``tools``, ``response_format``, ``metadata`` ...) are accepted and ignored; a
few features that would silently change the answer's meaning if ignored (``n`` > 1, ``logprobs``,
``echo``, ``best_of`` > 1, ``suffix``) are rejected. Nothing here imports torch or FastAPI.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["chat", "completion"]

DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 16
MAX_CACHE_SALT_CHARS = 1024
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


class APIError(Exception):
    """An error answered to the client: HTTP status plus OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> Any:
        """The error as the server answers it: a JSON response with its status and headers."""
        from fastapi.responses import JSONResponse  # the serve extra; this module itself needs no fastapi

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def client_gone() -> APIError:
    """499 (nginx's code): the client closed the connection before its answer was ready."""
    return APIError(499, "the client closed the connection", code="cancelled")


def invalid(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    """A 400 for a bad request field."""
    return APIError(400, message, param=param, code=code)


@dataclass
class GenerationRequest:
    """A validated completion request, endpoint-independent."""

    kind: Kind
    prompt: str | list[dict[str, str]] | list[int]  # raw text, chat messages, or token ids (completions)
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    method: str | None = None  # None: the server's default method (with the server's parameters)
    method_params: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    max_tokens_given: bool = True  # False: max_tokens is the server's default (then cut to the positions left)
    cache_salt: str | None = None  # vLLM's field: requests see only prefix-cache entries of their own salt
    tenant: str | None = None  # set by the app: the API key the request came with (None without keys)


# ---------------------------------------------------------------- parsing


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying why not."""
    if not raw.strip():
        raise invalid("the request body is empty; expected a JSON object", None, code="invalid_json")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise invalid("the request body is not UTF-8 text; expected a JSON object", None, code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise invalid(
            f"the request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); expected a JSON object",
            None,
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise invalid(
            f"the request body must be a JSON object, got a JSON {_json_type(body)}", None, code="invalid_json"
        )
    return body


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _show(v: Any) -> str:
    text = json.dumps(v, ensure_ascii=False) if not isinstance(v, float) or math.isfinite(v) else repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    lo_ok = _is_number(v) and (v > lo if lo_open else v >= lo)
    if not (_is_number(v) and lo_ok and v <= hi):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise invalid(f"{name} must be a number in {interval}, got {_show(v)}", name)
    return float(v)


def _integer(body: Mapping[str, Any], name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        expected = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise invalid(f"{name} must be {expected}, got {_show(v)}", name)
    return int(v)


def _boolean(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(f"{name} must be true or false, got {_show(v)}", name)
    return v


def _stop(body: Mapping[str, Any]) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid(f"stop must be a string or an array of strings, got {_show(v)}", "stop")
    if len(items) > MAX_STOP_STRINGS:
        raise invalid(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(items)}", "stop")
    if any(s == "" for s in items):
        raise invalid("stop strings must not be empty", "stop")
    return list(dict.fromkeys(items))


def _reject_unsupported(body: Mapping[str, Any], kind: Kind) -> None:
    for name in ("n", "best_of"):
        v = body.get(name)
        if v is not None and (not _is_int(v) or v != 1):
            raise invalid(f"{name} must be 1 (one choice per request), got {_show(v)}", name, code="unsupported_value")
    for name in ("logprobs", "top_logprobs", "echo"):
        v = body.get(name)
        off = v is None or v is False or (name == "top_logprobs" and _is_int(v) and v == 0)
        if not off:
            raise invalid(f"{name} is not supported by this server, got {_show(v)}", name, code="unsupported_value")
    if kind == "completion" and body.get("suffix") not in (None, ""):
        raise invalid(
            f"suffix is not supported by this server, got {_show(body.get('suffix'))}",
            "suffix",
            code="unsupported_value",
        )


def _extension(body: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """``"tokensieve": {"method": "snapkv", "budget": 512}`` -> ("snapkv", {"budget": 512})."""
    ext = body.get("tokensieve")
    if ext is None:
        return None, {}
    if not isinstance(ext, dict):
        raise invalid(
            f'tokensieve must be an object like {{"method": "snapkv", "budget": 512}}, got {_show(ext)}', "tokensieve"
        )
    params = dict(ext)
    method = params.pop("method", None)
    if method is not None and (not isinstance(method, str) or not method):
        raise invalid(f"tokensieve.method must be a method name (a string), got {_show(method)}", "tokensieve.method")
    return method, params


def _cache_salt(body: Mapping[str, Any]) -> str | None:
    v = body.get("cache_salt")
    if v is None:
        return None
    if not isinstance(v, str) or not v or len(v) > MAX_CACHE_SALT_CHARS:
        raise invalid(
            f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} characters, got {_show(v)}",
            "cache_salt",
        )
    return v


def _common(body: Mapping[str, Any], kind: Kind, prompt: Any, max_tokens: int) -> GenerationRequest:
    _reject_unsupported(body, kind)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid(f"model must be a string, got {_show(model)}", "model")
    stream = _boolean(body, "stream")
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise invalid(f"stream_options must be an object, got {_show(opts)}", "stream_options")
        include_usage = _boolean(opts, "include_usage")
    top_k = _integer(body, "top_k", 0, -1)  # vLLM's extension; -1 and 0 mean no limit
    seed = _integer(body, "seed", None, *SEED_RANGE)
    method, params = _extension(body)
    return GenerationRequest(
        kind=kind,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=max(int(top_k or 0), 0),
        seed=seed,
        stop=_stop(body),
        stream=stream,
        include_usage=include_usage,
        method=method,
        method_params=params,
        model=model,
        max_tokens_given=body.get("max_tokens") is not None
        or (kind == "chat" and body.get("max_completion_tokens") is not None),
        cache_salt=_cache_salt(body),
    )


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _json_type(part)
                raise invalid(
                    f'{where}.content[{j}] must be a text part {{"type": "text", "text": "..."}}; '
                    f"this server takes text only, got a {kind!r} part",
                    f"{where}.content",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(
        f"{where}.content must be a string or an array of text parts, got {_show(content)}", f"{where}.content"
    )


def parse_chat_request(body: Mapping[str, Any], default_max_tokens: int = DEFAULT_MAX_TOKENS) -> GenerationRequest:
    """``POST /v1/chat/completions``: ``messages`` (non-empty, text content) and the common fields."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "an empty array" if messages == [] else ("nothing" if messages is None else _show(messages))
        raise invalid(f"messages must be a non-empty array of {{role, content}} objects, got {got}", "messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"{where} must be an object with role and content, got {_show(m)}", where)
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role must be one of {', '.join(ROLES)}, got {_show(role)}", f"{where}.role")
        out.append(
            {"role": "system" if role == "developer" else str(role), "content": _content_text(m.get("content"), where)}
        )
    if not any(m["content"].strip() for m in out):
        raise invalid("messages hold no text: every message's content is empty", "messages", code="empty_prompt")
    max_tokens = _integer(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", default_max_tokens, 1)
    return _common(body, "chat", out, max_tokens)


def parse_completion_request(
    body: Mapping[str, Any], default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> GenerationRequest:
    """``POST /v1/completions``: ``prompt`` is a string or token ids (one prompt per request)."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and (isinstance(p[0], str) or isinstance(p[0], list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if not p.strip():
            raise invalid("prompt is empty", "prompt", code="empty_prompt")
        prompt: str | list[int] = p
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        if any(t < 0 for t in p):
            raise invalid("prompt token ids must be >= 0", "prompt")
        prompt = [int(t) for t in p]
    elif isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise invalid(
            f"prompt holds {len(p)} prompts; this server answers one prompt per request",
            "prompt",
            code="unsupported_value",
        )
    else:
        got = "nothing" if p is None else ("an empty array" if p == [] else _show(p))
        raise invalid(f"prompt must be a non-empty string or an array of token ids, got {got}", "prompt")
    return _common(body, "completion", prompt, _integer(body, "max_tokens", default_max_tokens, 1))


# ---------------------------------------------------------------- responses


def new_id(kind: Kind) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage_body(
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int | None = None,
    kept_tokens: int | None = None,
    ttft_s: float | None = None,
    kv_kept: int | None = None,
) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens`` (prompt tokens taken from the prefix cache) goes in
    ``prompt_tokens_details`` as OpenAI reports its own prompt caching; tokensieve adds ``kept_tokens``
    (prompt tokens the method computed on), ``kv_kept`` (KV entries it kept after the prefill, the most any layer
    holds: an evicting method's budget) and ``ttft_s`` (extra fields, which OpenAI clients keep)."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    if kept_tokens is not None:
        out["kept_tokens"] = kept_tokens
    if kv_kept is not None:
        out["kv_kept"] = kv_kept
    if ttft_s is not None:
        out["ttft_s"] = ttft_s
    return out


def completion_body(
    kind: Kind,
    rid: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    usage: dict[str, Any],
    stats: dict[str, Any],
) -> dict[str, Any]:
    """A ``chat.completion`` or ``text_completion`` object (non-streaming)."""
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage,
        "tokensieve": stats,
    }


def chunk_body(
    kind: Kind,
    rid: str,
    created: int,
    model: str,
    text: str | None,
    finish_reason: str | None = None,
    first: bool = False,
) -> dict[str, Any]:
    """One streamed chunk: ``chat.completion.chunk`` (a delta) or ``text_completion`` (a text piece)."""
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def usage_chunk(kind: Kind, rid: str, created: int, model: str, usage: dict[str, Any]) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}


def sse(obj: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
