"""The selection page's endpoint, ``POST /v1/tokensieve/select``, and the page itself (``GET /``) on a real uvicorn
server: each method's ``kept_indices`` are the method's own selection (GemFilter's equal ``tokensieve.generate``'s;
SnapKV's per-layer counts hold exactly ``budget`` entries per KV head), the token pieces join to the prompt, every
field is bounded (400 naming it), the API key, ``--lock-params`` and ``page=False`` apply. The page in a real
browser: tests/serve/test_page_browser.py."""

from __future__ import annotations

import hashlib
import json
import re
from base64 import b64encode
from typing import Any

import httpx2
import pytest
from conftest import TinyTokenizer, random_ids, run_cli, tiny_model
from eval_support import TEXT, byte_model, byte_tokenizer
from test_serve import serving

import tokensieve
from tokensieve.engine.runner import encode_prompt, generate, prepare
from tokensieve.evaluation.needle import make_messages
from tokensieve.methods import METHODS
from tokensieve.serve.app import LOOPBACK_HOSTS, create_app
from tokensieve.serve.batching import BatchPolicy
from tokensieve.serve.protocol import GenerationRequest
from tokensieve.serve.selection import MAX_QUESTION_CHARS, MAX_SELECT_TOKENS, generation_request, parse_select_request

KEY = "select-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DOC = TEXT[:1500] + "\nThe café sign says 日本.\n"
QUESTION = "Which river is near the old tower?"


@pytest.fixture(scope="module")
def tiny():
    return byte_model(max_pos=4096), byte_tokenizer()


@pytest.fixture(scope="module")
def base(tiny):
    model, tok = tiny
    app = create_app(model, tok, model_name="tiny", api_keys=[KEY], allowed_hosts=list(LOOPBACK_HOSTS))
    with serving(app) as url:
        yield url


def select(base: str, body: Any, headers: dict[str, str] = AUTH, **kw: Any) -> httpx2.Response:
    return httpx2.post(f"{base}/v1/tokensieve/select", json=body, headers=headers, timeout=120, **kw)


def body(**kw: Any) -> dict[str, Any]:
    return {"document": DOC, "question": QUESTION, "methods": ["gemfilter"], "max_tokens": 6, **kw}


def test_gemfilter_selection_and_answer_are_the_methods_own(base, tiny):
    model, tok = tiny
    params = {"topk": 200, "filter_layer": 1}
    r = select(base, body(params={"gemfilter": params}))
    assert r.status_code == 200, r.text
    data = r.json()
    (res,) = data["results"]
    ref = tokensieve.generate(model, tok, make_messages(DOC, QUESTION), method="gemfilter", max_new_tokens=6, **params)
    assert res["selection"] == "tokens" and res["kept_indices"] == ref.kept_indices and len(ref.kept_indices) == 200
    assert res["answer"] == ref.text and res["prompt_tokens"] == ref.prompt_tokens == data["prompt_tokens"]
    assert res["kv_kept"] == pytest.approx(200 / ref.prompt_tokens)  # every layer holds the 200 kept tokens
    assert res["kept_per_layer"] is None and res["ttft_s"] > 0 and res["params"]["topk"] == 200


def test_snapkv_per_layer_counts_hold_the_budget_and_the_window(base, tiny):
    model, _ = tiny
    budget, window = 300, 32
    r = select(base, body(methods=["snapkv", "full"], params={"snapkv": {"budget": budget, "window_size": window}}))
    assert r.status_code == 200, r.text
    snap, full = r.json()["results"]
    n = snap["prompt_tokens"]
    layers = snap["kept_per_layer"]
    heads = model.config.num_key_value_heads
    assert snap["selection"] == "kv" and layers["kv_heads"] == heads
    assert layers["layers"] == list(range(model.config.num_hidden_layers)) and len(layers["counts"]) == len(
        layers["layers"]
    )
    for row in layers["counts"]:
        assert len(row) == n and max(row) <= heads
        assert sum(row) == heads * budget  # every KV head keeps exactly `budget` prompt entries
        assert all(c == heads for c in row[n - window :])  # the observation window is always kept
    union = [i for i in range(n) if any(row[i] for row in layers["counts"])]
    assert snap["kept_indices"] == union and 0 < len(union) < n
    assert snap["kv_kept"] == pytest.approx(budget / n)
    # full attention: no selection, the whole prompt in every layer
    assert full["selection"] == "none" and full["kept_indices"] is None and full["kv_kept"] == pytest.approx(1.0)


def test_tokens_join_to_the_prompt_and_split_characters_have_empty_pieces(base, tiny):
    _, tok = tiny
    r = select(base, body(methods=["full"], max_tokens=1))
    data = r.json()
    ids = encode_prompt(tok, make_messages(DOC, QUESTION))[0].tolist()
    tokens = data["tokens"]
    assert len(tokens) == len(ids) == data["prompt_tokens"]
    text = "".join(t["text"] for t in tokens)
    assert text == tok.decode(ids, skip_special_tokens=False) and DOC in text
    at = 0
    for t in tokens:  # contiguous spans of the joined text
        assert t["start"] == at and t["end"] == at + len(t["text"]) and text[t["start"] : t["end"]] == t["text"]
        at = t["end"]
    # "日" is three bytes (three tokens of the byte tokenizer): the first two have no text, the third has the character
    i = next(k for k, t in enumerate(tokens) if t["text"] == "日")
    assert tokens[i - 1]["text"] == tokens[i - 2]["text"] == ""


@pytest.mark.parametrize(
    "change, param",
    [
        ({"document": ""}, "document"),
        ({"document": 5}, "document"),
        ({"question": "  "}, "question"),
        ({"question": "x" * (MAX_QUESTION_CHARS + 1)}, "question"),
        ({"methods": []}, "methods"),
        ({"methods": "gemfilter"}, "methods"),
        ({"methods": ["gemfilter", "gemfilter"]}, "methods"),
        ({"methods": ["nope"]}, "methods"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": MAX_SELECT_TOKENS + 1}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"params": []}, "params"),
        ({"params": {"snapkv": {"budget": 8}}}, "params"),  # a method not in methods
        ({"params": {"gemfilter": 3}}, "params.gemfilter"),
        ({"params": {"gemfilter": {"topk": "many"}}}, "params.gemfilter"),
        ({"params": {"gemfilter": {"no_such": 1}}}, "params.gemfilter"),
        ({"extra": 1}, "extra"),
        ({"document": "word " * 5000}, "document"),  # longer than the model's 4096 positions
    ],
)
def test_bad_fields_get_400_naming_the_field(base, change, param):
    r = select(base, body(**change))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]


def test_the_key_and_the_request_form_are_checked(base):
    assert select(base, body(), headers={}).status_code == 401
    assert select(base, body(), headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = httpx2.post(f"{base}/v1/tokensieve/select", content=b"{}", headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 415
    r = httpx2.post(
        f"{base}/v1/tokensieve/select", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_selection_runs_skip_the_prefix_cache_and_are_counted(base):
    assert select(base, body(methods=["full", "snapkv"])).status_code == 200
    health = httpx2.get(f"{base}/health").json()
    assert health["prefix_cache"]["enabled"] and health["prefix_cache"]["entries"] == 0
    metrics = httpx2.get(f"{base}/metrics").text
    assert 'tokensieve_requests_total{endpoint="/v1/tokensieve/select",status="200"}' in metrics


def test_selection_requests_never_batch(tiny):
    model, tok = tiny
    app = create_app(model, tok, max_batch=4)
    engine = app.state.engine
    sel = parse_select_request(body(methods=["snapkv"]), list(METHODS))
    plain = engine.prepare(GenerationRequest(kind="completion", prompt="hello there", max_tokens=2, method="snapkv"))
    marked = engine.prepare(generation_request(sel, "snapkv", None))
    marked.run.record_selection = True
    policy = BatchPolicy(4)
    assert policy.batchable(plain) and not policy.batchable(marked)


def _inline(html: str, tag: str) -> str:
    (text,) = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    return text


def test_page_is_one_file_with_its_csp_and_the_servers_methods(base):
    for path in ("/", "/ui"):
        r = httpx2.get(base + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html, csp = r.text, r.headers["content-security-policy"]
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        digest = b64encode(hashlib.sha256(_inline(html, tag).encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # no external asset
    assert "innerHTML" not in html and "insertAdjacentHTML" not in html  # text goes in as text only
    config = json.loads(re.search(r'<script type="application/json" id="config">(.*?)</script>', html, re.S).group(1))
    assert [m["name"] for m in config["methods"]] == list(METHODS)
    assert config["api_key_required"] is True and config["model"] == "tiny"
    # the Host check covers the page (DNS rebinding)
    assert httpx2.get(base + "/", headers={"Host": "evil.example"}).status_code == 421


def test_no_page_and_lock_params(tiny):
    model, tok = tiny
    with serving(create_app(model, tok, page=False)) as url:
        assert httpx2.get(url + "/").status_code == 404
        assert select(url, body(), headers={}).status_code == 404
    with serving(create_app(model, tok, method="snapkv", method_params={"budget": 300}, lock_params=True)) as url:
        config = re.search(r'id="config">(.*?)</script>', httpx2.get(url + "/").text, re.S).group(1)
        assert [m["name"] for m in json.loads(config)["methods"]] == ["snapkv"]
        r = select(url, body(), headers={})
        assert r.status_code == 400 and "snapkv" in r.json()["error"]["message"]
        r = select(url, body(methods=["snapkv"], params={"snapkv": {"budget": 100}}), headers={})
        assert r.status_code == 400 and r.json()["error"]["code"] == "locked_parameter"
        r = select(url, body(methods=["snapkv"]), headers={})
        assert r.status_code == 200 and r.json()["results"][0]["params"]["budget"] == 300


def test_serve_help_names_no_page(capsys):
    code, out, _ = run_cli(["serve", "--help"], capsys)
    assert code == 0 and "--no-page" in out


def test_streamingllm_keeps_its_sinks_and_recent_window_in_every_layer_and_head(base, tiny):
    model, _ = tiny
    budget, sinks = 64, 4
    r = select(base, body(methods=["streamingllm"], params={"streamingllm": {"budget": budget, "n_initial": sinks}}))
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    n, heads = res["prompt_tokens"], model.config.num_key_value_heads
    expected = [heads if i < sinks or i >= n - (budget - sinks) else 0 for i in range(n)]  # the paper's cache
    assert res["kept_per_layer"]["counts"] == [expected] * model.config.num_hidden_layers
    assert res["kept_indices"] == [i for i in range(n) if expected[i]]


def test_the_per_layer_record_leaves_out_sliding_layers_and_is_made_only_when_asked():
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    model = tiny_model("gemma3", layers=4, layer_types=types, sliding_window=16)
    run = prepare(model, None, random_ids(120), "snapkv", budget=48, window_size=8)
    plain = generate(model, TinyTokenizer(), run, max_new_tokens=2)
    assert "kept_per_layer" not in plain.details  # other requests pay nothing
    run.record_selection = True
    res = generate(model, TinyTokenizer(), run, max_new_tokens=2)
    rec = res.details["kept_per_layer"]
    assert rec["layers"] == [1, 3] and rec["kv_heads"] == model.config.num_key_value_heads
    assert [sum(row) for row in rec["counts"]] == [48 * rec["kv_heads"]] * 2
    assert res.token_ids == plain.token_ids  # recording changes nothing of the run


def test_an_unexpected_error_is_a_json_500_and_the_server_keeps_serving(tiny):
    model, tok = tiny
    app = create_app(model, tok)

    def broken(ids):
        raise RuntimeError("no pieces today")

    app.state.engine.prompt_pieces = broken
    with serving(app) as url:
        r = select(url, body(), headers={})
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert "no pieces today" in r.json()["error"]["message"]
        assert httpx2.get(url + "/health").json()["status"] == "ok"
