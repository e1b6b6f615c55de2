"""The OpenAI-compatible server: real uvicorn servers on 127.0.0.1, talked to with the official openai client
(and raw HTTP for what the client cannot send). Tiny random models for behaviour, SmolLM2 for real answers."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import openai
import pytest
import uvicorn
from conftest import TinyTokenizer, tiny_model
from eval_support import byte_model, byte_tokenizer

import tokensieve
from tokensieve.engine.detokenize import TextStream
from tokensieve.engine.runner import generate, generate_batch, stop_token_ids
from tokensieve.methods import METHODS
from tokensieve.serve.app import create_app
from tokensieve.serve.metrics import Metrics
from tokensieve.serve.protocol import parse_chat_request

WAIT_S = 30.0  # bound of every wait loop (never reached when the code works)


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1 (a free port) in a thread; yield its base URL."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", ws="none", lifespan="on", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), "the server to start")
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        assert not thread.is_alive(), "uvicorn did not stop"


def wait_until(cond: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def client(base: str, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=kw.pop("timeout", 120), **kw)


def chat(c: openai.OpenAI, content: str, **kw: Any):
    return c.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], **kw)


def stream_text(stream) -> tuple[str, Any, list]:
    """(text, last chunk with a finish_reason, all chunks) of a streamed chat or text completion."""
    parts, final, chunks = [], None, []
    for ch in stream:
        chunks.append(ch)
        for choice in ch.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            parts.append(piece or "")
            if choice.finish_reason is not None:
                final = ch
    return "".join(parts), final, chunks


def metric(base: str, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    text = httpx2.get(f"{base}/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def reference_text(model, tok, prompt, max_tokens: int) -> str:
    """What the server must answer (greedy): the runner alone, decoded without stripping."""
    res = generate(model, tok, prompt, max_new_tokens=max_tokens)
    stops = stop_token_ids(model, tok)
    return tok.decode([t for t in res.token_ids if t not in stops], skip_special_tokens=True)


def slow(delay_s: float, gate: threading.Event | None = None) -> Callable[..., Any]:
    """A generate that waits for ``gate`` (if given) and then sleeps ``delay_s`` per token."""

    def run(*args: Any, on_token=None, **kw: Any):
        if gate is not None:
            assert gate.wait(WAIT_S), "the test never opened the gate"

        def each(token_id: int):
            time.sleep(delay_s)
            return on_token(token_id)

        return generate(*args, on_token=each, **kw)

    return run


def slow_batch(delay_s: float) -> Callable[..., Any]:
    """A generate_batch that sleeps ``delay_s`` per row's token (a batch that takes a while to stream)."""

    def run(*args: Any, on_token=None, **kw: Any):
        def each(row: int, token_id: int):
            time.sleep(delay_s)
            return on_token(row, token_id)

        return generate_batch(*args, on_token=each, **kw)

    return run


def batch_sizes(base: str) -> tuple[float, float]:
    """(runs, runs of more than one request) from the server's batch-size histogram."""
    runs = metric(base, "tokensieve_batch_size_count")
    return runs, runs - metric(base, "tokensieve_batch_size_bucket", le="1.0")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny():
    """Byte-level tokenizer + tiny Llama with 256 positions (long-prompt errors are cheap)."""
    return byte_model(max_pos=256), byte_tokenizer()


@pytest.fixture(scope="module")
def tiny_server(tiny):
    model, tok = tiny
    app = create_app(model, tok, model_name="tiny", max_queue=64, default_max_tokens=16)
    with serving(app) as base:
        yield base, app


@pytest.fixture(scope="module")
def smol_server(smollm2):
    model, tok = smollm2
    with serving(create_app(model, tok, model_name="smollm2", method="full")) as base:
        yield base


# ---------------------------------------------------------------- text and parsing (no server)


def test_text_stream_stop_strings_span_tokens_and_are_not_included():
    tok = TinyTokenizer()
    ids = [12, 34, 56, 78, 90]  # "12 34 56 78 90"
    for stop, expected in [
        ("4 5", "12 3"),
        ("78", "12 34 56 "),
        ("12", ""),
        ("90", "12 34 56 78 "),
        ("xx", "12 34 56 78 90"),
    ]:
        ts = TextStream(tok.decode, [stop])
        pieces = []
        for t in ids:
            pieces.append(ts.push(t))
            if ts.stopped:
                break
        pieces.append(ts.finish())
        assert "".join(pieces) == ts.text == expected, (stop, pieces)
        assert ts.stopped == (stop in "12 34 56 78 90")
    # a possible stop-string start is held back, then released when it turns out not to be one
    ts = TextStream(tok.decode, ["34 99"])
    assert ts.push(12) == "12" and ts.push(34) == " " and ts.push(56) == "34 56"


def test_text_stream_holds_partial_utf8_characters():
    tok = byte_tokenizer()
    text = "né 日本 ok"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode())  # one token per byte: multi-byte characters span tokens
    ts = TextStream(lambda x: tok.decode(x, skip_special_tokens=True))
    pieces = [ts.push(t) for t in ids] + [ts.finish()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert pieces[ids.index(tok("日")["input_ids"][0])] == ""  # the first byte of 日 alone gives no text


def test_unknown_openai_fields_are_ignored():
    req = parse_chat_request(
        {
            "model": "gpt-4o",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            ],
            "frequency_penalty": 0.5,
            "presence_penalty": 0,
            "user": "u1",
            "logit_bias": {"1": 2},
            "metadata": {"a": "b"},
            "response_format": {"type": "text"},
            "parallel_tool_calls": False,
            "service_tier": "auto",
            "store": False,
        }
    )
    assert req.prompt == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert req.max_tokens == 256 and req.method is None


def test_two_apps_keep_separate_metrics(tiny):
    model, tok = tiny
    a, b = (
        create_app(model, tok),
        create_app(model, tok),
    )  # a shared (global) registry would raise "Duplicated timeseries"
    a.state.metrics.requests.labels("/health", "200").inc()
    assert a.state.metrics.registry is not b.state.metrics.registry
    assert b"tokensieve_requests_total{" not in b.state.metrics.render()[0]
    assert b'tokensieve_requests_total{endpoint="/health",status="200"} 1.0' in a.state.metrics.render()[0]
    Metrics()  # and neither touched prometheus_client's default registry


# ---------------------------------------------------------------- tiny model: behaviour


def test_chat_and_completion_match_the_runner(tiny, tiny_server):
    model, tok = tiny
    base, _ = tiny_server
    c = client(base)
    msgs = "the quick brown fox"
    r = chat(c, msgs, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    assert r.choices[0].index == 0 and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reference_text(model, tok, [{"role": "user", "content": msgs}], 12)
    ts = r.model_extra["tokensieve"]
    assert r.usage.prompt_tokens == ts["prompt_tokens"] == len(msgs.encode()) == ts["kept_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert ts["method"] == "full" and ts["ttft_s"] > 0 and ts["queue_s"] >= 0
    assert r.usage.model_extra["kept_tokens"] == ts["kept_tokens"] and r.usage.model_extra["ttft_s"] == ts["ttft_s"]
    assert r.usage.model_extra["kv_kept"] == ts["kv_kept"] == ts["prompt_tokens"]  # full attention keeps every entry
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 12 else "stop")

    t = c.completions.create(model="m", prompt="jumps over", max_tokens=7, temperature=0)
    assert t.object == "text_completion" and t.id.startswith("cmpl-")
    assert t.choices[0].text == reference_text(model, tok, "jumps over", 7)
    ids = tok("jumps over")["input_ids"]
    by_ids = c.completions.create(model="m", prompt=ids, max_tokens=7, temperature=0)  # token ids as the prompt
    assert by_ids.choices[0].text == t.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    c.close()


def test_stream_equals_non_stream_and_has_openai_chunks(tiny_server):
    base, _ = tiny_server
    c = client(base)
    for seed_text in ("alpha beta", "gamma"):
        full = chat(c, seed_text, max_tokens=14, temperature=0)
        text, final, chunks = stream_text(
            chat(c, seed_text, max_tokens=14, temperature=0, stream=True, stream_options={"include_usage": True})
        )
        assert text == full.choices[0].message.content
        assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
        assert len({ch.id for ch in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
        assert final.choices[0].finish_reason == full.choices[0].finish_reason
        assert final.model_extra["tokensieve"]["kept_tokens"] == full.model_extra["tokensieve"]["kept_tokens"]
        streamed_usage, usage = chunks[-1].usage.model_dump(exclude_none=True), full.usage.model_dump(exclude_none=True)
        assert streamed_usage.pop("ttft_s") > 0 and usage.pop("ttft_s") > 0  # two runs: two times
        assert chunks[-1].choices == [] and streamed_usage == usage
        # one chunk per token that produced text, each non-empty after the first
        assert all(ch.choices[0].delta.content for ch in chunks[1:-2])
    comp = c.completions.create(model="m", prompt="delta", max_tokens=9, temperature=0)
    text, final, chunks = stream_text(
        c.completions.create(model="m", prompt="delta", max_tokens=9, temperature=0, stream=True)
    )
    assert text == comp.choices[0].text and final.choices[0].finish_reason == comp.choices[0].finish_reason
    assert all(ch.object == "text_completion" for ch in chunks)
    c.close()


def test_stop_strings_end_the_answer_streamed_or_not():
    model, tok = tiny_model("llama"), TinyTokenizer()  # readable text: token ids as numbers
    app = create_app(model, tok, model_name="tiny-ids")
    with serving(app) as base:
        c = client(base)
        full = c.completions.create(model="m", prompt="5 6 7", max_tokens=12, temperature=0).choices[0]
        assert full.finish_reason == "length"
        stop = full.text[7:11]  # four characters in the middle, spanning tokens
        expected = full.text[: full.text.find(stop)]
        for stream in (False, True):
            kw = dict(model="m", prompt="5 6 7", max_tokens=12, temperature=0, stop=[stop, "never"])
            if stream:
                text, final, _ = stream_text(c.completions.create(stream=True, **kw))
                reason = final.choices[0].finish_reason
            else:
                ch = c.completions.create(**kw).choices[0]
                text, reason = ch.text, ch.finish_reason
            assert (text, reason) == (expected, "stop"), (stream, stop)
        assert (
            c.completions.create(model="m", prompt="5 6 7", max_tokens=12, temperature=0, stop="zz").choices[0].text
            == full.text
        )
        c.close()
        rec = app.state.engine.records
        assert rec[-2].generated_tokens < 12 and rec[-1].generated_tokens == 12  # a stop string stops generation


def test_sampling_is_seeded_and_bounded(tiny_server):
    base, _ = tiny_server
    c = client(base)
    kw = dict(max_tokens=10, temperature=1.5, top_p=0.9, seed=1234)
    a, b = chat(c, "sample me", **kw), chat(c, "sample me", **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    c.close()


def test_every_method_runs_per_request(tiny_server):
    base, _ = tiny_server
    c = client(base)
    prompt = "a longer prompt so that selection and eviction have something to drop: " * 2
    for name in METHODS:
        r = chat(c, prompt, max_tokens=4, temperature=0, extra_body={"tokensieve": {"method": name}})
        assert r.model_extra["tokensieve"]["method"] == name
    r = chat(c, prompt, max_tokens=4, temperature=0, extra_body={"tokensieve": {"method": "gemfilter", "topk": 20}})
    ts = r.model_extra["tokensieve"]
    assert ts["kept_tokens"] == 20 < ts["prompt_tokens"] and ts["params"]["topk"] == 20
    r = chat(
        c,
        prompt,
        max_tokens=4,
        temperature=0,
        extra_body={"tokensieve": {"method": "snapkv", "budget": 40, "window_size": 8}},
    )
    ts = r.model_extra["tokensieve"]
    assert ts["params"]["budget"] == 40
    # an evicting method computes on the whole prompt but keeps only its budget of KV entries: both are reported
    assert ts["kept_tokens"] == ts["prompt_tokens"] > 40 and ts["kv_kept"] == 40 == r.usage.model_extra["kv_kept"]
    c.close()


def test_server_default_method_and_params_apply_unless_the_request_names_one(tiny):
    model, tok = tiny
    app = create_app(model, tok, method="gemfilter", method_params={"topk": 10})
    with serving(app) as base:
        c = client(base)
        prompt = "x" * 40
        assert chat(c, prompt, max_tokens=2).model_extra["tokensieve"]["kept_tokens"] == 10
        r = chat(c, prompt, max_tokens=2, extra_body={"tokensieve": {"topk": 12}})  # overrides a default parameter
        assert r.model_extra["tokensieve"]["kept_tokens"] == 12
        r = chat(c, prompt, max_tokens=2, extra_body={"tokensieve": {"method": "full"}})
        assert r.model_extra["tokensieve"]["kept_tokens"] == 40
        assert httpx2.get(f"{base}/health").json()["method"] == "gemfilter"
        c.close()


def test_models_health_metrics(tiny_server):
    base, _ = tiny_server
    c = client(base)
    assert [m.id for m in c.models.list()] == ["tiny"]
    assert c.models.retrieve("tiny").owned_by == "tokensieve"
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"
    h = httpx2.get(f"{base}/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["model"] == "tiny"
    chat(c, "count me", max_tokens=3)
    text = httpx2.get(f"{base}/metrics").text
    for family in (
        "tokensieve_requests_total",
        "tokensieve_ttft_seconds_bucket",
        "tokensieve_request_duration_seconds_bucket",
        "tokensieve_kept_tokens_total",
        "tokensieve_kv_kept_total",
        "tokensieve_queue_depth",
        "tokensieve_queue_wait_seconds_count",
        "tokensieve_kept_ratio_bucket",
        "tokensieve_jobs_total",
    ):
        assert family in text, family
    assert metric(base, "tokensieve_requests_total", endpoint="/v1/chat/completions", status="200") >= 1
    assert metric(base, "tokensieve_ttft_seconds_count", method="full") >= 1
    assert metric(base, "tokensieve_queue_depth") == 0
    nf = httpx2.get(f"{base}/v2/nothing")
    assert nf.status_code == 404 and nf.json()["error"]["code"] == "not_found"
    c.close()


# ---------------------------------------------------------------- bad requests

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hello"}]

BAD_REQUESTS = [
    # (endpoint, body, param, words the message must contain)
    (CHAT, {"messages": []}, "messages", ["non-empty", "empty array"]),
    (CHAT, {"model": "m"}, "messages", ["messages must be"]),
    (CHAT, {"messages": "hello"}, "messages", ['"hello"']),
    (CHAT, {"messages": [{"role": "user", "content": "  "}]}, "messages", ["empty"]),
    (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", ['"robot"', "user"]),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", ["5"]),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content",
        ["image_url"],
    ),
    (CHAT, {"messages": MSG, "max_tokens": 0}, "max_tokens", [">= 1", "got 0"]),
    (CHAT, {"messages": MSG, "max_tokens": -5}, "max_tokens", ["got -5"]),
    (CHAT, {"messages": MSG, "max_tokens": "10"}, "max_tokens", ['"10"']),
    (CHAT, {"messages": MSG, "max_tokens": 2.5}, "max_tokens", ["2.5"]),
    (CHAT, {"messages": MSG, "max_tokens": True}, "max_tokens", ["true"]),
    (CHAT, {"messages": MSG, "max_completion_tokens": 0}, "max_completion_tokens", ["got 0"]),
    (CHAT, {"messages": MSG, "max_tokens": 10_000}, "max_tokens", ["256", "10000"]),
    (CHAT, {"messages": MSG, "temperature": -0.1}, "temperature", ["[0, 2]", "-0.1"]),
    (CHAT, {"messages": MSG, "temperature": 2.5}, "temperature", ["2.5"]),
    (CHAT, {"messages": MSG, "temperature": "hot"}, "temperature", ['"hot"']),
    (CHAT, {"messages": MSG, "top_p": 0}, "top_p", ["(0, 1]", "got 0"]),
    (CHAT, {"messages": MSG, "top_p": 1.5}, "top_p", ["1.5"]),
    (CHAT, {"messages": MSG, "seed": "x"}, "seed", ['"x"']),
    (CHAT, {"messages": MSG, "n": 2}, "n", ["got 2"]),
    (CHAT, {"messages": MSG, "stream": "yes"}, "stream", ['"yes"']),
    (CHAT, {"messages": MSG, "stop": 5}, "stop", ["5"]),
    (CHAT, {"messages": MSG, "stop": [""]}, "stop", ["empty"]),
    (CHAT, {"messages": MSG, "logprobs": True}, "logprobs", ["not supported"]),
    (CHAT, {"messages": MSG, "model": 7}, "model", ["7"]),
    (CHAT, {"messages": MSG, "tokensieve": "snapkv"}, "tokensieve", ['"snapkv"']),
    (CHAT, {"messages": MSG, "tokensieve": {"method": "magic"}}, "tokensieve.method", ["'magic'", "gemfilter"]),
    (CHAT, {"messages": MSG, "tokensieve": {"method": "snapkv", "budgett": 5}}, "tokensieve", ["budgett", "budget"]),
    (CHAT, {"messages": MSG, "tokensieve": {"method": "snapkv", "budget": -3}}, "tokensieve", ["budget", "-3"]),
    (CHAT, {"messages": MSG, "tokensieve": {"method": "gemfilter", "topk": "many"}}, "tokensieve", ["topk", "many"]),
    (
        CHAT,
        {"messages": MSG, "tokensieve": {"method": "gemfilter", "filter_layer": 99}},
        "tokensieve",
        ["filter_layer", "99"],
    ),
    (CHAT, {"messages": [{"role": "user", "content": "y" * 300}]}, "messages", ["300 tokens", "256"]),
    (COMP, {"prompt": "z" * 257}, "prompt", ["257 tokens", "256"]),
    (COMP, {"model": "m"}, "prompt", ["prompt must be"]),
    (COMP, {"prompt": ""}, "prompt", ["empty"]),
    (COMP, {"prompt": ["one", "two"]}, "prompt", ["2 prompts"]),
    (COMP, {"prompt": [1, 2, 99999]}, "prompt", ["99999"]),
    (COMP, {"prompt": "hi", "max_tokens": 0}, "max_tokens", ["got 0"]),
    (COMP, {"prompt": "hi", "echo": True}, "echo", ["not supported"]),
    (COMP, {"prompt": "hi", "best_of": 3}, "best_of", ["got 3"]),
]


def test_bad_requests_get_400_naming_the_problem(tiny_server):
    base, _ = tiny_server
    with httpx2.Client(base_url=base, timeout=60) as http:
        for endpoint, body, param, words in BAD_REQUESTS:
            r = http.post(endpoint, json=body)
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["param"] == param, (body, err)
            assert all(w in err["message"] for w in words), (body, err["message"])
        for raw, words in [
            (b'{"messages": [', ["not valid JSON"]),
            (b"[1, 2]", ["JSON object", "array"]),
            (b"", ["empty"]),
            (b"\xff\xfe", ["JSON"]),
        ]:
            r = http.post(CHAT, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", (raw, r.text)
            assert all(w in r.json()["error"]["message"] for w in words), r.text
        assert http.get(CHAT).status_code == 405
    # the official client sees the same: a BadRequestError with OpenAI's body
    c = client(base)
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, "hi", max_tokens=3, extra_body={"tokensieve": {"method": "h2o", "heavy": "x"}})
    assert e.value.body["param"] == "tokensieve" and "heavy" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        chat(c, "hi", max_tokens=3, stream=True, temperature=9)  # a stream is refused before it starts
    # fields OpenAI clients send that this server does not use are accepted
    r = chat(
        c,
        "fine",
        max_tokens=2,
        frequency_penalty=0.5,
        presence_penalty=0.1,
        user="u",
        logit_bias={"5": 1},
        metadata={"k": "v"},
        response_format={"type": "text"},
        extra_body={"repetition_penalty": 1.1},
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    assert metric(base, "tokensieve_requests_total", endpoint=CHAT, status="400") >= len(
        [b for b in BAD_REQUESTS if b[0] == CHAT]
    )
    c.close()


def test_chat_template_refusal_is_400_and_bad_server_default_fails_at_start(tiny):
    model, _ = tiny
    tok = byte_tokenizer()
    tok.chat_template = "{% if messages[0].role == 'assistant' %}{{ raise_exception('conversations start with the user') }}{% endif %}{{ messages[0].content }}"
    with serving(create_app(model, tok)) as base:
        r = httpx2.post(f"{base}{CHAT}", json={"messages": [{"role": "assistant", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert "conversations start with the user" in r.json()["error"]["message"]
        assert httpx2.post(f"{base}{CHAT}", json={"messages": MSG, "max_tokens": 2}).status_code == 200
    with pytest.raises(tokensieve.InputError, match="filter_layer must be in"):
        create_app(model, tok, method="gemfilter", method_params={"filter_layer": 99})


def test_method_parameters_of_any_json_type_get_200_or_400_never_500(tiny_server):
    base, _ = tiny_server
    values = [None, True, -1, 0, 1.5, "x", [1, 2], {"a": 1}, 2**70]
    prompt = "words, separators. and more words! " * 3
    statuses: dict[int, int] = {}
    with httpx2.Client(base_url=base, timeout=60) as http:
        for name, cls in METHODS.items():
            for field in dataclasses.fields(cls):
                for v in values:
                    body = {
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": 2,
                        "tokensieve": {"method": name, field.name: v},
                    }
                    r = http.post(CHAT, json=body)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    assert r.status_code in (200, 400), (name, field.name, v, r.text)
                    if r.status_code == 400:
                        assert (
                            r.json()["error"]["param"] == "tokensieve" and field.name in r.json()["error"]["message"]
                        ), r.text
    assert statuses[200] > 0 and statuses[400] > 0
    r = httpx2.post(f"{base}{CHAT}", json={"messages": MSG, "tokensieve": {"method": "gemfilter", "topk": True}})
    assert r.status_code == 400 and "must be a 64-bit integer, got True" in r.json()["error"]["message"]


# ---------------------------------------------------------------- concurrency, cancellation, timeouts, failures


def test_client_disconnect_mid_stream_cancels_the_request(tiny):
    model, tok = tiny
    app = create_app(model, tok, model_name="tiny", generate_fn=slow(0.02))
    engine = app.state.engine
    with serving(app) as base:
        c = client(base)
        stream = chat(c, "go on and on", max_tokens=200, temperature=0, stream=True)
        got = [next(iter(stream)) for _ in range(3)]
        assert got[0].choices[0].delta.role == "assistant"
        stream.close()  # the client goes away after 3 chunks
        wait_until(lambda: any(r.outcome == "cancelled" for r in engine.records), "the cancelled job to end")
        rec = [r for r in engine.records if r.outcome == "cancelled"][0]
        assert 3 <= rec.generated_tokens < 200  # it stopped early: its slot is free for others
        assert metric(base, "tokensieve_jobs_total", outcome="cancelled") == 1
        health = httpx2.get(f"{base}/health").json()
        assert health["status"] == "ok" and health["queue_depth"] == 0
        r = chat(c, "next", max_tokens=5, temperature=0)  # the next request works
        assert r.usage.completion_tokens >= 1 and engine.records[-1].outcome == "completed"
        c.close()


def test_full_queue_gets_429_and_a_departed_waiter_frees_its_slot(tiny):
    model, tok = tiny
    gate = threading.Event()
    app = create_app(model, tok, model_name="tiny", max_queue=1, generate_fn=slow(0.0, gate))
    engine = app.state.engine
    with serving(app) as base, ThreadPoolExecutor(4) as pool:
        c = client(base)
        first = pool.submit(chat, c, "first", max_tokens=4, temperature=0)
        wait_until(lambda: engine.busy, "the first request to run")

        def leaver() -> None:  # waits in the queue, then gives up (client-side timeout)
            with pytest.raises(httpx2.ReadTimeout):
                httpx2.post(
                    f"{base}{CHAT}", json={"messages": MSG, "max_tokens": 3}, timeout=httpx2.Timeout(30, read=0.5)
                )

        gone = pool.submit(leaver)
        wait_until(lambda: engine.queue_depth == 1, "the second request to queue")
        r = httpx2.post(f"{base}{CHAT}", json={"messages": MSG, "max_tokens": 3})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1 and "max-queue 1" in r.json()["error"]["message"]
        with pytest.raises(openai.RateLimitError):
            chat(c, "also too many", max_tokens=3)
        gone.result(WAIT_S)
        wait_until(lambda: engine.queue_depth == 0, "the departed request to leave the queue")
        second = pool.submit(chat, c, "second", max_tokens=4, temperature=0)  # takes the freed slot
        wait_until(lambda: engine.queue_depth == 1, "the third request to queue")
        gate.set()
        assert first.result(WAIT_S).usage.completion_tokens >= 1
        assert second.result(WAIT_S).usage.completion_tokens >= 1
        assert [r.outcome for r in engine.records] == ["cancelled", "completed", "completed"]
        assert metric(base, "tokensieve_requests_total", endpoint=CHAT, status="429") == 2
        c.close()


def test_request_timeout_gives_504_and_stops_generation(tiny):
    model, tok = tiny
    app = create_app(model, tok, model_name="tiny", request_timeout_s=1.0, generate_fn=slow(0.05))
    engine = app.state.engine
    with serving(app) as base:
        c = client(base)
        with pytest.raises(openai.APIStatusError) as e:
            chat(c, "too slow", max_tokens=240, temperature=0)  # 240 x 50 ms, far past the 1 s timeout
        assert e.value.status_code == 504 and e.value.body["code"] == "timeout" and "1 s" in e.value.body["message"]
        wait_until(lambda: len(engine.records) == 1, "the timed-out job to end")
        assert engine.records[0].outcome == "timeout" and engine.records[0].generated_tokens < 240
        # a stream that already started ends with an error event (the client raises), not [DONE] alone
        stream = chat(c, "slow stream", max_tokens=240, temperature=0, stream=True)
        with pytest.raises(openai.APIError) as e:
            stream_text(stream)
        assert "timeout" in str(e.value)
        wait_until(lambda: len(engine.records) == 2, "the timed-out stream to end")
        assert engine.records[1].outcome == "timeout"
        assert chat(c, "quick", max_tokens=3).usage.completion_tokens >= 1  # still serving
        c.close()


def test_engine_exception_gives_500_and_the_server_keeps_running(tiny):
    model, tok = tiny

    def flaky(m, t, run, **kw):  # run: the request's prepared run (tokensieve.engine.runner.Prepared)
        if len(run.input_ids[0]) == 4:  # the prompt "boom"
            raise RuntimeError("simulated engine failure")
        return generate(m, t, run, **kw)

    app = create_app(model, tok, model_name="tiny", generate_fn=flaky)
    with serving(app) as base:
        c = client(base)
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as e:
                chat(c, "boom", max_tokens=3, stream=stream)
            assert "simulated engine failure" in e.value.body["message"] and e.value.body["type"] == "server_error"
            assert chat(c, "fine now", max_tokens=3).usage.completion_tokens >= 1
        assert metric(base, "tokensieve_jobs_total", outcome="failed") == 2
        real_prepare = app.state.engine.prepare
        app.state.engine.prepare = lambda req: 1 / 0  # a bug before the queue: answered 500, connection kept
        with httpx2.Client(base_url=base, timeout=60) as http:
            r = http.post(CHAT, json={"messages": MSG})
            assert r.status_code == 500 and "ZeroDivisionError" in r.json()["error"]["message"]
            app.state.engine.prepare = real_prepare
            assert http.post(CHAT, json={"messages": MSG, "max_tokens": 2}).status_code == 200
        assert httpx2.get(f"{base}/health").json()["status"] == "ok"
        c.close()


def test_load_32_requests_from_8_threads_none_lost_none_mixed(tiny, tiny_server):
    model, tok = tiny
    base, app = tiny_server
    n_req, max_tokens = 32, 12
    prompts = [f"request {i}: the {'abcdefgh'[i % 8]} item is number {i * 37 % 101}" for i in range(n_req)]
    kinds = ["chat", "chat-stream", "completion", "completion-stream"]
    expected = [
        reference_text(
            model, tok, [{"role": "user", "content": p}] if kinds[i % 4].startswith("chat") else p, max_tokens
        )
        for i, p in enumerate(prompts)
    ]
    assert len(set(expected)) > n_req // 2  # distinct prompts give (mostly) distinct answers: a mix-up would show
    done_before = len(app.state.engine.records)

    def ask(i: int) -> str:
        c = client(base)
        try:
            kind, p = kinds[i % 4], prompts[i]
            if kind == "chat":
                return chat(c, p, max_tokens=max_tokens, temperature=0).choices[0].message.content
            if kind == "chat-stream":
                return stream_text(chat(c, p, max_tokens=max_tokens, temperature=0, stream=True))[0]
            if kind == "completion":
                return c.completions.create(model="m", prompt=p, max_tokens=max_tokens, temperature=0).choices[0].text
            return stream_text(
                c.completions.create(model="m", prompt=p, max_tokens=max_tokens, temperature=0, stream=True)
            )[0]
        finally:
            c.close()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(n_req), timeout=120))
    assert answers == expected
    records = list(app.state.engine.records)[done_before:]
    assert len(records) == n_req and all(r.outcome == "completed" for r in records)
    assert app.state.engine.peak_queue_depth >= 2  # they really waited behind each other
    assert metric(base, "tokensieve_queue_depth") == 0


# ---------------------------------------------------------------- batches (--max-batch)


def ask_kind(base: str, kind: str, prompt: str, **kw: Any) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of one chat or text completion, streamed or not."""
    c = client(base)
    try:
        if kind == "chat":
            r = chat(c, prompt, **kw)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
        if kind == "completion":
            r = c.completions.create(model="m", prompt=prompt, **kw)
            return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
        method = chat if kind == "chat-stream" else lambda c, p, **k: c.completions.create(model="m", prompt=p, **k)
        text, final, chunks = stream_text(method(c, prompt, stream=True, stream_options={"include_usage": True}, **kw))
        return text, final.choices[0].finish_reason, chunks[-1].usage.completion_tokens
    finally:
        c.close()


def hold_worker(base: str, engine, pool: ThreadPoolExecutor):
    """Submit a request that keeps the worker busy (its generate waits for the test's gate), so that the
    requests sent next wait in the queue together."""
    blocker = pool.submit(ask_kind, base, "chat", "hold the worker", max_tokens=2)
    wait_until(lambda: engine.busy, "the blocking request to run")
    return blocker


def test_batched_requests_get_the_answers_they_get_alone(tiny):
    model, tok = tiny
    gate = threading.Event()
    app = create_app(model, tok, model_name="tiny", max_batch=4, generate_fn=slow(0.0, gate))
    engine = app.state.engine
    kinds = ["chat", "chat-stream", "completion", "completion-stream", "chat", "completion-stream"]
    asks = [  # prompts of different lengths, different max_tokens, a stop string: each row ends on its own
        (kinds[i], f"request {i}: {'abcdef'[i] * (3 + 7 * i)} item {i * 37 % 101}", {"max_tokens": n, "temperature": 0})
        for i, n in enumerate([12, 5, 9, 16, 7, 3])
    ]
    with serving(app) as base, ThreadPoolExecutor(8) as pool:
        blocker = hold_worker(base, engine, pool)
        alone_reference = reference_text(model, tok, asks[0][1], 12)  # the runner alone (a completion prompt)
        stop = alone_reference[4:7]
        asks[2] = ("completion", asks[0][1], {"max_tokens": 12, "temperature": 0, "stop": [stop]})
        futures = []
        for i, (kind, prompt, kw) in enumerate(asks):
            futures.append(pool.submit(ask_kind, base, kind, prompt, **kw))
            wait_until(lambda: engine.queue_depth == i + 1, "the request to queue")  # arrival order = queue order
        runs_before, _ = batch_sizes(base)
        gate.set()
        batched = [f.result(WAIT_S) for f in futures]
        blocker.result(WAIT_S)
        records = list(engine.records)[-len(asks) :]
        assert sorted(r.batch_size for r in records) == [2, 2, 4, 4, 4, 4]  # 4 together, then the other 2
        assert all(r.outcome == "completed" for r in records)
        runs, multi = batch_sizes(base)
        assert (runs - runs_before, multi) == (2, 2)
        # the same requests one at a time (nothing waits: each runs alone)
        alone = [ask_kind(base, kind, prompt, **kw) for kind, prompt, kw in asks]
        assert all(r.batch_size == 1 for r in list(engine.records)[-len(asks) :])
    assert batched == alone
    assert batched[2] == (alone_reference[: alone_reference.find(stop)], "stop", batched[2][2]) and batched[2][2] < 12
    assert [a[2] for a in alone] == [12, 5, batched[2][2], 16, 7, 3]
    assert len({a[0] for a in alone}) == len(asks)  # distinct answers: a mix-up between rows would show


def test_a_client_leaving_a_batch_does_not_disturb_the_others(tiny):
    model, tok = tiny
    gate = threading.Event()
    app = create_app(
        model, tok, model_name="tiny", max_batch=4, generate_fn=slow(0.0, gate), generate_batch_fn=slow_batch(0.01)
    )
    engine = app.state.engine
    stayers = [("chat", "stay with me", 40), ("completion", "and me too, please", 30)]

    def leaver() -> int:
        c = client(base)
        stream = chat(c, "leave early", max_tokens=60, temperature=0, stream=True)
        got = [next(iter(stream)) for _ in range(3)]
        stream.close()  # the client goes away after 3 chunks
        c.close()
        return len(got)

    with serving(app) as base, ThreadPoolExecutor(4) as pool:
        blocker = hold_worker(base, engine, pool)
        gone = pool.submit(leaver)
        wait_until(lambda: engine.queue_depth == 1, "the leaving request to queue")
        stay = [pool.submit(ask_kind, base, kind, p, max_tokens=n, temperature=0) for kind, p, n in stayers]
        wait_until(lambda: engine.queue_depth == 3, "the staying requests to queue")
        gate.set()
        assert gone.result(WAIT_S) == 3
        answers = [f.result(WAIT_S) for f in stay]
        blocker.result(WAIT_S)
        records = list(engine.records)[-3:]
        left = [r for r in records if r.outcome == "cancelled"]
        assert len(left) == 1 and 3 <= left[0].generated_tokens < 60 and left[0].batch_size == 3
        assert all(r.batch_size == 3 for r in records)
        assert batch_sizes(base)[1] == 1
    for (kind, prompt, n), (text, reason, tokens) in zip(stayers, answers):
        msgs = [{"role": "user", "content": prompt}] if kind == "chat" else prompt
        assert (text, reason, tokens) == (reference_text(model, tok, msgs, n), "length", n)


def test_mixed_methods_in_the_queue_batch_by_method_and_all_get_their_own_answers(tiny):
    model, tok = tiny
    gate = threading.Event()
    app = create_app(model, tok, model_name="tiny", max_batch=4, generate_fn=slow(0.0, gate))
    engine = app.state.engine
    doc = "a longer prompt so that selection and eviction have something to drop: " * 2
    asks = [  # (question, tokensieve parameters, sampling)
        ("one", {}, {}),
        ("two", {"method": "h2o", "budget": 40}, {}),  # h2o runs one prompt at a time
        ("three", {"method": "snapkv", "budget": 40}, {}),
        ("four", {}, {}),  # joins "one"
        ("five", {"method": "gemfilter", "topk": 20}, {}),
        ("six", {"method": "snapkv", "budget": 40}, {}),  # joins "three"
        ("seven", {"method": "snapkv", "budget": 48}, {}),  # other parameters: alone
        ("eight", {}, {"temperature": 1.5, "seed": 5}),  # seeded: alone, and as reproducible as alone
        ("eight", {}, {"temperature": 1.5, "seed": 5}),
    ]
    with serving(app) as base, ThreadPoolExecutor(10) as pool:
        blocker = hold_worker(base, engine, pool)
        futures = []
        for i, (q, ext, sampling) in enumerate(asks):
            kw = {"max_tokens": 6, "temperature": 0, **sampling, "extra_body": {"tokensieve": ext}}
            futures.append(pool.submit(ask_kind, base, "chat", doc + q, **kw))
            wait_until(lambda: engine.queue_depth == i + 1, "the request to queue")
        gate.set()
        answers = [f.result(WAIT_S) for f in futures]
        blocker.result(WAIT_S)
        records = list(engine.records)[-len(asks) :]
        assert sorted(r.batch_size for r in records) == [1, 1, 1, 1, 1, 2, 2, 2, 2]
        assert {r.method for r in records if r.batch_size == 2} == {"full", "snapkv"}
    for (q, ext, _sampling), (text, _, _) in zip(asks[:-2], answers[:-2]):
        params = {k: v for k, v in ext.items() if k != "method"}
        assert text == method_text(
            model, tok, [{"role": "user", "content": doc + q}], 6, ext.get("method", "full"), **params
        ), q
    assert answers[-1] == answers[-2]


def test_a_running_batch_takes_one_slot_of_the_queue_bound(tiny):
    model, tok = tiny
    gate, batch_gate = threading.Event(), threading.Event()

    def gated_batch(*args: Any, **kw: Any):
        assert batch_gate.wait(WAIT_S), "the test never opened the batch gate"
        return generate_batch(*args, **kw)

    app = create_app(
        model,
        tok,
        model_name="tiny",
        max_queue=2,
        max_batch=4,
        generate_fn=slow(0.0, gate),
        generate_batch_fn=gated_batch,
    )
    engine = app.state.engine

    def refused() -> None:
        r = httpx2.post(f"{base}{CHAT}", json={"messages": MSG, "max_tokens": 3})
        assert (
            r.status_code == 429
            and r.json()["error"]["code"] == "queue_full"
            and "max-queue 2" in r.json()["error"]["message"]
        )
        assert int(r.headers["retry-after"]) >= 1

    with serving(app) as base, ThreadPoolExecutor(6) as pool:
        blocker = hold_worker(base, engine, pool)
        first = [pool.submit(ask_kind, base, "chat", f"first {i}", max_tokens=3, temperature=0) for i in range(2)]
        wait_until(lambda: engine.queue_depth == 2, "two requests to queue")
        refused()  # one runs, max_queue wait
        gate.set()
        wait_until(
            lambda: engine.queue_depth == 0 and metric(base, "tokensieve_running_requests") == 2,
            "the two to run as one batch",
        )
        then = [pool.submit(ask_kind, base, "chat", f"then {i}", max_tokens=3, temperature=0) for i in range(2)]
        wait_until(lambda: engine.queue_depth == 2, "two more to queue behind the batch")
        refused()  # the batch of two takes one slot, as one request does: max_queue still wait, no more
        batch_gate.set()
        assert all(f.result(WAIT_S)[2] >= 1 for f in first + then + [blocker])
        assert sorted(r.batch_size for r in engine.records) == [1, 2, 2, 2, 2]


def test_max_batch_must_be_a_positive_integer(tiny):
    model, tok = tiny
    for bad in (0, -1, 2.0, True):
        with pytest.raises(tokensieve.InputError, match=f"max_batch must be an integer >= 1.*got {bad!r}"):
            create_app(model, tok, max_batch=bad)


# ---------------------------------------------------------------- SmolLM2: real answers


@pytest.mark.real_model
def test_smollm2_chat_stream_equals_non_stream(smol_server):
    c = client(smol_server)
    question = "What is the capital of France?"
    full = chat(c, question, max_tokens=12, temperature=0)
    answer = full.choices[0].message.content
    assert "Paris" in answer and full.model == "smollm2"
    text, final, chunks = stream_text(chat(c, question, max_tokens=12, temperature=0, stream=True))
    assert text == answer and len(chunks) >= 4
    assert final.choices[0].finish_reason == full.choices[0].finish_reason
    c.close()


@pytest.mark.real_model
def test_smollm2_gemfilter_per_request_keeps_topk(smol_server):
    c = client(smol_server)
    doc = "The harbour was quiet that morning, and the gulls circled over the fishing boats. " * 6
    r = chat(
        c,
        doc + "What was quiet?",
        max_tokens=3,
        temperature=0,
        extra_body={"tokensieve": {"method": "gemfilter", "topk": 32}},
    )
    ts = r.model_extra["tokensieve"]
    assert ts["method"] == "gemfilter" and ts["kept_tokens"] == 32 and ts["prompt_tokens"] > 100
    assert r.usage.prompt_tokens == ts["prompt_tokens"]
    c.close()


# ---------------------------------------------------------------- prefix cache


def method_text(model, tok, prompt, max_tokens: int, method: str, **params: Any) -> str:
    """The runner alone (no prefix cache) with ``method``: what the server must answer (greedy)."""
    res = generate(model, tok, prompt, method=method, max_new_tokens=max_tokens, **params)
    stops = stop_token_ids(model, tok)
    return tok.decode([t for t in res.token_ids if t not in stops], skip_special_tokens=True)


PREFIX_DOC = "Ada keeps the vault; its code is 4711. " * 3


def test_prefix_cache_reuses_the_document_and_answers_are_unchanged(tiny):
    model, tok = tiny
    app = create_app(model, tok, model_name="tiny", prefix_cache_gib=0.01)
    runs = [  # (system + question) or (document and question in one user message), method
        ([{"role": "system", "content": PREFIX_DOC}, {"role": "user", "content": "code?"}], {}),
        ([{"role": "system", "content": PREFIX_DOC}, {"role": "user", "content": "who?"}], {}),
        (
            [{"role": "system", "content": PREFIX_DOC}, {"role": "user", "content": "where is it?"}],
            {"method": "snapkv", "budget": 48, "window_size": 4},
        ),
        (
            [{"role": "system", "content": PREFIX_DOC}, {"role": "user", "content": "what?"}],
            {"method": "gemfilter", "topk": 24},
        ),
        ([{"role": "user", "content": PREFIX_DOC + "\nQuestion: code?"}], {}),
        ([{"role": "user", "content": PREFIX_DOC + "\nQuestion: keeper?"}], {}),
    ]
    with serving(app) as base:
        c = client(base)
        cached = []
        for msgs, ext in runs:
            r = c.chat.completions.create(
                model="m", messages=msgs, max_tokens=6, temperature=0, extra_body={"tokensieve": ext}
            )
            params = {k: v for k, v in ext.items() if k != "method"}
            assert r.choices[0].message.content == method_text(model, tok, msgs, 6, ext.get("method", "full"), **params)
            ts = r.model_extra["tokensieve"]
            assert ts["prefix_cached_tokens"] == r.usage.prompt_tokens_details.cached_tokens
            cached.append(ts["prefix_cached_tokens"])
        doc_tokens = len(tok(PREFIX_DOC)["input_ids"])
        # the first request computes the document; every later one, in either shape, shares it (longest shared
        # prefix); GemFilter recomputes its last window_size (16) tokens, whose queries score the prompt
        assert cached[0] == 0 and all(doc_tokens <= n < doc_tokens + 12 for n in cached[1:3] + cached[4:]), cached
        assert cached[3] == len(tok(PREFIX_DOC + "\n\nwhat?")["input_ids"]) - 16
        # streamed: the same count in the usage chunk
        stream = c.chat.completions.create(
            model="m",
            messages=runs[1][0],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, final, chunks = stream_text(stream)
        streamed_cached = chunks[-1].usage.prompt_tokens_details.cached_tokens
        assert (
            streamed_cached >= cached[1] and final.model_extra["tokensieve"]["prefix_cached_tokens"] == streamed_cached
        )
        assert text == method_text(model, tok, runs[1][0], 6, "full")
        assert metric(base, "tokensieve_prefix_cache_lookups_total", result="hit") == 6
        assert metric(base, "tokensieve_prefix_cache_lookups_total", result="miss") == 1
        assert metric(base, "tokensieve_prefix_cached_tokens_total") == sum(cached) + streamed_cached
        store = app.state.engine.prefix_store
        assert metric(base, "tokensieve_prefix_cache_bytes") == store.nbytes > 0
        assert metric(base, "tokensieve_prefix_cache_entries") == len(store) >= 1
        health = httpx2.get(f"{base}/health").json()["prefix_cache"]
        assert health["enabled"] and health["bytes"] == store.nbytes and health["max_bytes"] == int(0.01 * (1 << 30))
        c.close()


def test_prefix_cache_off(tiny):
    model, tok = tiny
    app = create_app(model, tok, model_name="tiny", prefix_cache_gib=0)
    msgs = [{"role": "system", "content": PREFIX_DOC}, {"role": "user", "content": "code?"}]
    with serving(app) as base:
        c = client(base)
        for _ in range(2):
            r = c.chat.completions.create(model="m", messages=msgs, max_tokens=4, temperature=0)
            assert (
                r.usage.prompt_tokens_details.cached_tokens == 0 == r.model_extra["tokensieve"]["prefix_cached_tokens"]
            )
        assert httpx2.get(f"{base}/health").json()["prefix_cache"] == {"enabled": False, "reason": "disabled (size 0)"}
        assert metric(base, "tokensieve_prefix_cache_lookups_total", result="miss") == 0
        c.close()


# ---------------------------------------------------------------- hostile input, tenants (issue 22)


def test_sampling_values_inside_the_documented_ranges_never_give_nan(tiny, tiny_server):
    model, tok = tiny
    base, _ = tiny_server
    c = client(base)
    greedy = chat(c, "pick the likeliest", max_tokens=8, temperature=0).choices[0].message.content
    assert greedy == reference_text(model, tok, [{"role": "user", "content": "pick the likeliest"}], 8)
    for kw in (
        {"temperature": 5e-324},
        {"temperature": 1e-300},
        {"temperature": 1e-9, "top_p": 0.5},
        {"temperature": 1.0, "top_p": 5e-324},
        {"temperature": 2.0, "top_p": 1e-300, "top_k": 3},
    ):
        for stream in (False, True):
            top_k = kw.pop("top_k", None)
            r = chat(
                c,
                "pick the likeliest",
                max_tokens=8,
                stream=stream,
                **kw,
                extra_body={"top_k": top_k} if top_k else None,
            )
            if top_k:
                kw["top_k"] = top_k
            text = stream_text(r)[0] if stream else r.choices[0].message.content
            assert text == greedy, kw  # a tiny temperature is greedy; a tiny top_p keeps only the likeliest token
    c.close()


def test_method_parameters_are_bounded_before_any_work(tiny_server):
    base, app = tiny_server
    done = len(app.state.engine.records)
    prompt = "words, separators. and more words! " * 3
    with httpx2.Client(base_url=base, timeout=60) as http:
        for name, cls in METHODS.items():
            for f in dataclasses.fields(cls):
                for v in (2**62, -(2**62), 2**31, [2**40]):
                    body = {
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": 2,
                        "tokensieve": {"method": name, f.name: v},
                    }
                    r = http.post(CHAT, json=body)
                    assert r.status_code == 400, (name, f.name, v, r.text)
                    assert r.json()["error"]["param"] == "tokensieve" and f.name in r.json()["error"]["message"], r.text
        # performance-only widths: a request may not set them below the server's minimum
        for ext in (
            {"method": "h2o", "budget": 40, "chunk_size": 1},
            {"method": "sepllm", "block_size": 16},
            {"method": "gemfilter", "topk": 20, "window_size": 4, "chunk_size": 8},
        ):
            r = http.post(CHAT, json={"messages": MSG, "max_tokens": 2, "tokensieve": ext})
            assert r.status_code == 400 and "at least 128" in r.json()["error"]["message"], (ext, r.text)
        r = http.post(
            CHAT, json={"messages": MSG, "max_tokens": 2, "tokensieve": {"method": "sepllm", "block_size": 128}}
        )
        assert r.status_code == 200
        # a pooling / span width wider than the prompt is fine (the widths are bounded by MAX_SPAN_WIDTH)
        for name, ext in (("gemfilter", {"topk": 8}), ("snapkv", {"budget": 20, "window_size": 4})):
            r = http.post(
                CHAT,
                json={
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 2,
                    "tokensieve": {"method": name, "kernel": 4095, "dilation": 4095, "pooling": "max", **ext},
                },
            )
            assert r.status_code == 200, r.text
    assert len(app.state.engine.records) == done + 3  # the refused ones never reached the worker


def test_prompt_plus_max_tokens_past_the_positions_is_400_with_vllms_wording(tiny_server):
    base, _ = tiny_server
    with httpx2.Client(base_url=base, timeout=60) as http:
        for endpoint, body, n, param in [
            (CHAT, {"messages": [{"role": "user", "content": "p" * 200}]}, 200, "messages"),
            (COMP, {"prompt": "q" * 250}, 250, "prompt"),
        ]:
            r = http.post(endpoint, json={**body, "max_tokens": 60})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "context_length_exceeded" and err["param"] == param
            assert err["message"] == (
                f"This model's maximum context length is 256 tokens. However, you requested {n + 60} tokens "
                f"({n} in the messages, 60 in the completion). Please reduce the length of the messages or completion."
            )
            assert http.post(endpoint, json={**body, "max_tokens": 256 - n}).status_code == 200  # exactly at the limit
        # without max_tokens the server's default (16) is cut to what the positions leave
        r = http.post(COMP, json={"prompt": "r" * 250, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 6
        r = http.post(COMP, json={"prompt": "r" * 256})  # nothing left for an answer
        assert r.status_code == 400 and "256 in the messages" in r.json()["error"]["message"]


def test_text_no_tokenizer_can_encode_is_400(tiny_server):
    base, _ = tiny_server
    with httpx2.Client(base_url=base, timeout=60) as http:
        for endpoint, body, param in [
            (CHAT, {"messages": [{"role": "user", "content": "a \udcff b"}]}, "messages"),
            (COMP, {"prompt": "a \ud800"}, "prompt"),
        ]:
            raw = json.dumps(body).encode()  # "\\udcff": valid JSON, a lone surrogate once decoded
            r = http.post(endpoint, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert "not valid Unicode" in r.json()["error"]["message"]


def test_cache_salt_keeps_tenants_apart(tiny):
    """Client B cannot learn how much of client A's prompt is cached: with another salt (or none) it
    reuses nothing, whatever it guesses; A's own later requests still reuse A's prefix."""
    model, tok = tiny
    app = create_app(model, tok, model_name="tiny", prefix_cache_gib=0.01)
    secret = "Vault log: the code is 4711. Keep it. " * 2
    msgs = lambda question: [{"role": "system", "content": secret}, {"role": "user", "content": question}]  # noqa: E731
    with serving(app) as base:
        a, b = client(base), client(base)

        def cached(c, question, salt=None, **kw):
            extra = {"cache_salt": salt} if salt is not None else {}
            r = c.chat.completions.create(
                model="m", messages=msgs(question), max_tokens=2, temperature=0, extra_body=extra, **kw
            )
            assert r.usage.prompt_tokens_details.cached_tokens == r.model_extra["tokensieve"]["prefix_cached_tokens"]
            return r.usage.prompt_tokens_details.cached_tokens

        def attacker(c) -> list[int]:
            """B's guesses at A's code, with its own salt and with none: the cached counts it sees."""
            counts = [cached(c, "what is the code?", "tenant-b"), cached(c, "what is the code?")]
            for g in (4700, 4711, 4712):
                r = c.chat.completions.create(
                    model="m",
                    messages=[
                        {"role": "system", "content": secret.replace("4711", str(g))},
                        {"role": "user", "content": "x?"},
                    ],
                    max_tokens=2,
                    extra_body={"cache_salt": "tenant-c"},
                )
                counts.append(r.usage.prompt_tokens_details.cached_tokens)
            return counts

        assert cached(a, "what is the code?", "tenant-a") == 0  # A computes and stores its document
        assert cached(a, "who keeps it?", "tenant-a") >= len(secret)  # A reuses it
        seen = attacker(b)
        assert seen[:3] == [0, 0, 0]  # B's exact copy of A's document: nothing cached, no hint of a match
        assert cached(a, "and the keeper?", "tenant-a") >= len(secret)  # A's entry is still A's
        store = app.state.engine.prefix_store
        assert len({e.salt for e in store.entries()}) >= 3 and all(
            e.salt is None or len(e.salt) == 64 for e in store.entries()
        )
        r = httpx2.post(f"{base}{CHAT}", json={"messages": MSG, "cache_salt": ""})
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"
        a.close()
        b.close()
    # what B sees is what it sees on a server where A never was: its counts depend on its own requests only
    with serving(create_app(model, tok, model_name="tiny", prefix_cache_gib=0.01)) as fresh:
        b = client(fresh)
        assert attacker(b) == seen
        b.close()


def test_a_failed_request_drops_only_its_own_prefix_entries(tiny):
    model, tok = tiny

    def flaky(m, t, run, on_token=None, **kw):
        def each(token_id):
            if "boom" in t.decode(run.input_ids[0]):
                raise RuntimeError("simulated failure after the prefill")
            return on_token(token_id)

        return generate(m, t, run, on_token=each, **kw)

    app = create_app(model, tok, model_name="tiny", prefix_cache_gib=0.01, generate_fn=flaky)
    store = app.state.engine.prefix_store
    doc = [{"role": "system", "content": PREFIX_DOC}, {"role": "user", "content": "code?"}]
    with serving(app) as base:
        c = client(base)
        assert (
            c.chat.completions.create(model="m", messages=doc, max_tokens=2).usage.prompt_tokens_details.cached_tokens
            == 0
        )
        kept = [e.ids.tolist() for e in store.entries()]
        assert len(kept) == 1
        with pytest.raises(openai.InternalServerError):  # another client's request stores its own document, then fails
            c.chat.completions.create(
                model="m",
                messages=[{"role": "system", "content": "boom " * 20}, {"role": "user", "content": "q?"}],
                max_tokens=2,
            )
        assert [e.ids.tolist() for e in store.entries()] == kept  # its entry is gone, the first client's stays
        r = c.chat.completions.create(model="m", messages=doc, max_tokens=2)
        assert r.usage.prompt_tokens_details.cached_tokens >= len(PREFIX_DOC)
        assert metric(base, "tokensieve_prefix_cache_entries") == len(store)
        c.close()


def test_api_keys_guard_v1_and_keep_each_keys_prefix_cache_apart(tiny):
    model, tok = tiny
    app = create_app(model, tok, model_name="tiny", prefix_cache_gib=0.01, api_keys=["key-one", "key-two"])
    doc = [{"role": "system", "content": PREFIX_DOC}, {"role": "user", "content": "code?"}]
    with serving(app) as base:
        for headers in (
            {},
            {"authorization": "Bearer wrong"},
            {"authorization": "key-one"},
            {"authorization": "Basic key-one"},
            {"authorization": "Bearer key-one-and-more"},
            {"authorization": "Bearer"},
        ):
            for method, path in (
                ("POST", CHAT),
                ("POST", COMP),
                ("GET", "/v1/models"),
                ("GET", "/v1/models/tiny"),
                ("GET", "/v1/nothing"),
            ):
                r = httpx2.request(method, f"{base}{path}", json={"messages": MSG, "max_tokens": 2}, headers=headers)
                assert r.status_code == 401, (headers, path, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert httpx2.get(f"{base}/health").status_code == 200 and httpx2.get(f"{base}/metrics").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            client(base).models.list()  # client() sends the key "x"
        one = openai.OpenAI(base_url=f"{base}/v1", api_key="key-one", max_retries=0)
        two = openai.OpenAI(base_url=f"{base}/v1", api_key="key-two", max_retries=0)
        assert [m.id for m in one.models.list()] == ["tiny"]

        def cached(c):
            return c.chat.completions.create(
                model="m", messages=doc, max_tokens=2
            ).usage.prompt_tokens_details.cached_tokens

        assert cached(one) == 0 and cached(one) >= len(PREFIX_DOC)  # key one stores, then reuses, its document
        assert cached(two) == 0  # key two sends the same document: nothing of key one's is visible
        assert cached(two) >= len(PREFIX_DOC)
        assert metric(base, "tokensieve_requests_total", endpoint="/v1/models", status="401") >= 6
        one.close()
        two.close()


def test_bodies_must_be_json_and_within_the_size_limit(tiny):
    model, tok = tiny
    app = create_app(model, tok, model_name="tiny", max_body_bytes=4096)
    engine = app.state.engine
    with serving(app) as base, httpx2.Client(base_url=base, timeout=60) as http:
        body = json.dumps({"messages": MSG, "max_tokens": 2}).encode()
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            r = http.post(CHAT, content=body, headers={"content-type": ctype} if ctype else {})
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", (ctype, r.text)
        for ctype in ("application/json", "Application/JSON; charset=utf-8"):
            assert http.post(CHAT, content=body, headers={"content-type": ctype}).status_code == 200
        big = json.dumps({"messages": [{"role": "user", "content": "z" * 5000}]}).encode()
        r = http.post(CHAT, content=big, headers={"content-type": "application/json"})  # Content-Length: refused unread
        assert (
            r.status_code == 413
            and r.json()["error"]["code"] == "request_too_large"
            and "4096" in r.json()["error"]["message"]
        )

        def chunks():  # no Content-Length: counted while it is read
            for i in range(0, len(big), 1000):
                yield big[i : i + 1000]

        r = http.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert len(engine.records) == 2  # only the two good requests reached the worker
        assert http.post(CHAT, json={"messages": MSG, "max_tokens": 2}).status_code == 200


def test_a_prompt_far_past_the_positions_is_refused_before_it_is_tokenized(tiny_server):
    base, app = tiny_server
    engine = app.state.engine
    calls: list[str] = []
    real = engine.preparer._encode
    engine.preparer._encode = lambda req, param: calls.append(param) or real(req, param)
    try:
        with httpx2.Client(base_url=base, timeout=60) as http:
            for endpoint, body, param in [
                (
                    CHAT,
                    {"messages": [{"role": "system", "content": "d" * 3000}, {"role": "user", "content": "q"}]},
                    "messages",
                ),
                (COMP, {"prompt": "e" * 100_000}, "prompt"),
                (COMP, {"prompt": [5] * 300}, "prompt"),
            ]:
                r = http.post(endpoint, json=body)
                err = r.json()["error"]
                assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == param, (
                    r.text
                )
                assert "256 positions" in err["message"]
            assert calls == []  # none of them reached the tokenizer
            assert (
                http.post(CHAT, json={"messages": [{"role": "user", "content": "f" * 300}]}).status_code == 400
            )  # tokenized, then refused
            assert calls == ["messages"]
    finally:
        engine.preparer._encode = real


def test_serve_cli_refuses_a_blank_api_key_in_one_line(capsys):
    from tokensieve import cli

    assert cli.main(["serve", "--api-key", " padded "]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--api-key" in err and "Traceback" not in err


def test_the_request_timeout_stops_a_prefill_within_one_layer(tiny):
    model, tok = tiny
    app = create_app(model, tok, model_name="tiny", request_timeout_s=0.6)
    engine = app.state.engine
    calls: list[float] = []

    def slow_layer(module, args):  # each decoder layer of the prefill takes 0.4 s: the whole prefill 1.2 s
        if threading.current_thread().name == "tokensieve-engine":
            calls.append(time.monotonic())
            time.sleep(0.4)

    with serving(app) as base:  # registered after the engine's own deadline check: that one runs first
        hooks = [layer.register_forward_pre_hook(slow_layer) for layer in model.model.layers]
        try:
            t0 = time.monotonic()
            r = httpx2.post(f"{base}{CHAT}", json={"messages": MSG, "max_tokens": 4})
            took = time.monotonic() - t0
        finally:
            for h in hooks:
                h.remove()
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        wait_until(lambda: len(engine.records) == 1, "the job to end")
        # layers 0 and 1 started before the deadline; layer 2 (at ~0.8 s) found it passed and never ran
        assert len(calls) == 2 and engine.records[0].outcome == "timeout" and engine.records[0].generated_tokens == 0
        assert took < 1.1, took
        assert httpx2.get(f"{base}/health").json()["status"] == "ok"
        assert httpx2.post(f"{base}{CHAT}", json={"messages": MSG, "max_tokens": 2}).status_code == 200  # still serving


def test_health_reports_a_worker_stuck_past_its_deadline(tiny):
    model, tok = tiny
    gate = threading.Event()

    def stuck(*args, **kw):  # one step that ignores every check (a C loop)
        assert gate.wait(WAIT_S)
        return generate(*args, **kw)

    app = create_app(model, tok, model_name="tiny", request_timeout_s=0.5, generate_fn=stuck)
    with serving(app) as base, ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(httpx2.post, f"{base}{CHAT}", json={"messages": MSG, "max_tokens": 2}, timeout=WAIT_S)
        assert waiting.result(WAIT_S).status_code == 504  # the client gets its answer at the deadline
        wait_until(lambda: httpx2.get(f"{base}/health").status_code == 503, "/health to see the stuck worker")
        h = httpx2.get(f"{base}/health").json()
        assert h["status"] == "stalled" and h["busy"] and h["overdue_s"] > 2.0
        gate.set()
        wait_until(lambda: httpx2.get(f"{base}/health").status_code == 200, "the worker to come back")
        assert httpx2.get(f"{base}/health").json()["overdue_s"] == 0


def test_host_header_is_checked_on_a_loopback_server(tiny):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example."""
    model, tok = tiny
    from tokensieve.serve.app import LOOPBACK_HOSTS, host_name

    assert [host_name(h) for h in ("[::1]:8000", "LocalHost.:80", "127.0.0.1", "my.box:1")] == [
        "::1",
        "localhost",
        "127.0.0.1",
        "my.box",
    ]
    app = create_app(model, tok, model_name="tiny", allowed_hosts=[*LOOPBACK_HOSTS, "My.Box"])
    with serving(app) as base:
        port = base.rsplit(":", 1)[1]
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "", "192.168.1.10"):
            for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", CHAT)):
                r = httpx2.request(
                    method, f"{base}{path}", headers={"Host": host}, json={"messages": MSG, "max_tokens": 2}
                )
                assert r.status_code == 421, (host, path, r.status_code)
                assert r.json()["error"]["code"] == "invalid_host" and r.headers["content-type"] == "application/json"
        for host in (
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            "localhost",
            f"[::1]:{port}",
            "127.0.0.2",
            f"my.box:{port}",
            "MY.BOX",
        ):
            assert httpx2.get(f"{base}/v1/models", headers={"Host": host}).status_code == 200, host
        r = httpx2.post(
            f"{base}{CHAT}", json={"messages": MSG, "max_tokens": 2}, headers={"Origin": "http://evil.example"}
        )
        assert r.status_code == 200 and not any(k.lower().startswith("access-control-") for k in r.headers)  # no CORS
        pre = httpx2.options(
            f"{base}{CHAT}", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert pre.status_code == 405 and not any(k.lower().startswith("access-control-") for k in pre.headers)
    with serving(create_app(model, tok, model_name="tiny", allowed_hosts=["*"])) as base:
        assert httpx2.get(f"{base}/health", headers={"Host": "anything.example"}).status_code == 200
    with serving(create_app(model, tok, model_name="tiny")) as base:  # the library's default: no check
        assert httpx2.get(f"{base}/health", headers={"Host": "anything.example"}).status_code == 200
    with pytest.raises(tokensieve.InputError, match="allowed_hosts"):
        create_app(model, tok, allowed_hosts="localhost")


def test_serve_cli_refuses_a_blank_allowed_host_in_one_line(capsys):
    from tokensieve import cli

    assert cli.main(["serve", "--allowed-host", " "]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--allowed-host" in err and "Traceback" not in err
