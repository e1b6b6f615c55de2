"""Property-based fuzzing (hypothesis) of the server's request handling: any JSON a client can send, through the
parsers, the request preparation and the real app, ends in an answer or a 4xx naming the problem; never a raw
exception, a 5xx or a hang; healthy requests still succeed afterwards. Bounded: a fixed number of examples per
property, no shrinking past the time budget, the whole file well under a minute on a laptop core."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import httpx2
import pytest
from eval_support import byte_model, byte_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import CHAT, COMP, MSG, serving

from tokensieve.methods import METHODS
from tokensieve.serve.app import create_app
from tokensieve.serve.protocol import APIError, parse_chat_request, parse_completion_request, parse_json_object
from tokensieve.serve.requests import PreparedRequest, RequestPreparer

# derandomize: the same examples every run (a failure reproduces); database=None: nothing written to the tree
FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8,
)


def method_params(name: str) -> st.SearchStrategy[dict]:
    """``{"method": name, ...}`` with some of its parameters, mostly plausible values, some hostile."""
    fields = [f.name for f in dataclasses.fields(METHODS[name])]
    plausible = st.sampled_from(
        [
            0,
            1,
            2,
            4,
            8,
            16,
            64,
            128,
            256,
            4095,
            0.5,
            1.0,
            True,
            False,
            None,
            "max",
            "mean",
            "auto",
            "local",
            "dense",
            [2],
            [1, 2],
        ]
    )
    value = st.one_of(plausible, plausible, plausible, json_values)
    return st.fixed_dictionaries({"method": st.just(name)}, optional={f: value for f in fields})


def with_hostile(valid: st.SearchStrategy[dict], keys: list[str]) -> st.SearchStrategy[dict]:
    """A valid body with up to two of its fields (or extra ones) replaced by any JSON value."""
    hostile = st.dictionaries(st.sampled_from(keys), json_values, max_size=2)
    return st.builds(lambda body, bad: {**body, **bad}, valid, st.one_of(st.just({}), hostile))


text = st.text(min_size=1, max_size=60)
valid_common = {
    "max_tokens": st.integers(min_value=1, max_value=300),
    "temperature": st.floats(min_value=0, max_value=2),
    "top_p": st.floats(min_value=0, max_value=1, exclude_min=True) | st.sampled_from([1e-45, 5e-324, 1.0]),
    "top_k": st.integers(min_value=-1, max_value=300),
    "seed": st.integers(min_value=-(2**63), max_value=2**64 - 1),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "tokensieve": st.sampled_from(sorted(METHODS)).flatmap(method_params),
    "cache_salt": st.text(min_size=1, max_size=20),
}
COMMON_KEYS = [*valid_common, "n", "logprobs", "echo", "best_of", "model", "user"]
chat_bodies = with_hostile(
    st.fixed_dictionaries(
        {
            "messages": st.lists(
                st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": text}),
                min_size=1,
                max_size=3,
            )
        },
        optional=valid_common,
    ),
    ["messages", *COMMON_KEYS, "max_completion_tokens"],
)
completion_bodies = with_hostile(
    st.fixed_dictionaries(
        {
            "prompt": st.one_of(
                st.text(min_size=1, max_size=300),
                st.lists(st.integers(min_value=0, max_value=256), min_size=1, max_size=300),
            )
        },
        optional=valid_common,
    ),
    ["prompt", *COMMON_KEYS, "suffix"],
)


def parsed_or_400(parse, body):
    try:
        return parse(body)
    except APIError as exc:
        assert exc.status == 400 and exc.message and "Traceback" not in exc.message, exc.message
        return None


@FUZZ
@given(st.binary(max_size=200) | st.builds(lambda v: json.dumps(v).encode(), json_values))
def test_any_body_bytes_parse_to_an_object_or_a_400(raw):
    body = parsed_or_400(parse_json_object, raw)
    assert body is None or isinstance(body, dict)


@FUZZ
@given(chat_bodies, completion_bodies)
def test_any_request_fields_parse_or_get_a_400_naming_them(chat, completion):
    for parse, body in ((parse_chat_request, chat), (parse_completion_request, completion)):
        req = parsed_or_400(parse, body)
        if req is not None:
            assert (
                req.max_tokens >= 1
                and 0 < req.top_p <= 1
                and 0 <= req.temperature <= 2
                and math.isfinite(req.temperature)
            )


@pytest.fixture(scope="module")
def tiny():
    return byte_model(max_pos=256), byte_tokenizer()


@pytest.fixture(scope="module")
def preparer(tiny):
    model, tok = tiny
    return RequestPreparer(model, tok)


@FUZZ
@given(chat_bodies, completion_bodies)
def test_any_parsed_request_is_prepared_or_gets_a_4xx(preparer, chat, completion):
    t0 = time.monotonic()
    for parse, body in ((parse_chat_request, chat), (parse_completion_request, completion)):
        req = parsed_or_400(parse, body)
        if req is None:
            continue
        try:
            prep = preparer.prepare(req)
        except APIError as exc:
            assert 400 <= exc.status < 500 and exc.message, (body, exc.message)
            continue
        assert (
            isinstance(prep, PreparedRequest)
            and 1 <= prep.prompt_tokens
            and prep.prompt_tokens + prep.max_tokens <= 256
        )
    assert time.monotonic() - t0 < 10  # preparing any request is cheap (no generation)


@pytest.fixture(scope="module")
def fuzz_server(tiny):
    model, tok = tiny
    app = create_app(model, tok, model_name="tiny", max_queue=64, request_timeout_s=20, prefix_cache_gib=0.01)
    with serving(app) as base, httpx2.Client(base_url=base, timeout=60) as http:
        yield http, app


@settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from([CHAT, COMP]), chat_bodies, completion_bodies)
def test_the_app_answers_any_request_with_200_or_a_4xx_and_keeps_serving(fuzz_server, endpoint, chat, completion):
    http, app = fuzz_server
    body = chat if endpoint == CHAT else completion
    t0 = time.monotonic()
    r = http.post(endpoint, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert r.status_code == 200 or 400 <= r.status_code < 500, (body, r.status_code, r.text[:300])
    assert "internal_error" not in r.text and "Traceback" not in r.text, r.text[:300]  # streams carry errors as events
    if r.status_code != 200:
        err = r.json()["error"]
        assert err["message"] and err["type"] == "invalid_request_error", r.text
    assert time.monotonic() - t0 < 20  # no request holds the server past its timeout
    ok = http.post(CHAT, json={"messages": MSG, "max_tokens": 2})  # a healthy request still succeeds
    assert ok.status_code == 200 and http.get("/health").json()["status"] == "ok"
    assert not [rec for rec in app.state.engine.records if rec.outcome == "failed"]


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(sorted(METHODS)).flatmap(method_params))
def test_the_python_api_takes_any_method_parameters_or_raises_input_error(tiny, ext):
    import tokensieve

    model, tok = tiny
    params = {k: v for k, v in ext.items() if k != "method"}
    t0 = time.monotonic()
    try:
        res = tokensieve.generate(
            model, tok, "words, separators. and more words! " * 3, method=ext["method"], max_new_tokens=2, **params
        )
    except tokensieve.InputError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), str(exc)
    else:
        assert 1 <= res.generated_tokens <= 2 and res.method == ext["method"]
    assert time.monotonic() - t0 < 10


def _select_params(names: list[str]) -> st.SearchStrategy[dict]:
    """``{name: {...parameters}}`` for some of ``names`` (the fuzzed method parameters, ``method`` key dropped)."""
    each = [method_params(n).map(lambda p: {k: v for k, v in p.items() if k != "method"}) for n in names]
    return st.tuples(*each).map(lambda ps: dict(zip(names, ps))) if names else st.just({})


select_bodies = with_hostile(
    st.lists(st.sampled_from(sorted(METHODS)), min_size=1, max_size=3, unique=True).flatmap(
        lambda names: st.fixed_dictionaries(
            {"document": st.text(min_size=1, max_size=300), "question": text, "methods": st.just(names)},
            optional={"max_tokens": st.integers(min_value=1, max_value=4), "params": _select_params(names)},
        )
    ),
    ["document", "question", "methods", "max_tokens", "params", "extra"],
)


@settings(max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(select_bodies)
def test_the_selection_endpoint_answers_any_body_with_200_or_a_4xx(fuzz_server, body):
    http, app = fuzz_server
    r = http.post(
        "/v1/tokensieve/select", content=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 200 or 400 <= r.status_code < 500, (body, r.status_code, r.text[:300])
    if r.status_code == 200:
        data = r.json()
        assert [res["method"] for res in data["results"]] == body["methods"]
        n = data["prompt_tokens"]
        for res in data["results"]:
            kept = res["kept_indices"]
            assert kept is None or (kept == sorted(set(kept)) and all(0 <= i < n for i in kept))
    else:
        assert r.json()["error"]["message"] and "internal_error" not in r.text, r.text[:300]
    assert not [rec for rec in app.state.engine.records if rec.outcome == "failed"]


def test_api_error_response_carries_status_body_and_headers():
    from tokensieve.serve.protocol import client_gone

    err = APIError(429, "the queue is full", type="rate_limit_error", code="queue_full", headers={"Retry-After": "3"})
    res = err.response()
    assert res.status_code == 429 and res.headers["retry-after"] == "3"
    assert json.loads(res.body) == {
        "error": {"message": "the queue is full", "type": "rate_limit_error", "param": None, "code": "queue_full"}
    }
    gone = client_gone().response()
    assert gone.status_code == 499 and json.loads(gone.body)["error"]["code"] == "cancelled"
