"""`tokensieve serve`'s start-up banner and its one log line per request (logging, quiet with --quiet)."""

from __future__ import annotations

import logging
import re

import httpx2
import pytest
from conftest import patch_model_load
from eval_support import byte_model, byte_tokenizer
from test_serve import chat, client, serving, wait_until

from tokensieve import cli
from tokensieve.serve import request_log
from tokensieve.serve.app import create_app

LINE = re.compile(
    r"^(?P<verb>\w+) (?P<path>\S+) status=(?P<status>\d+) method=(?P<method>\S+) prompt_tokens=(?P<prompt>\S+) "
    r"kept_tokens=(?P<kept>\S+) kv_kept=(?P<kv>\S+) ttft_s=(?P<ttft>\S+) total_s=(?P<total>[\d.]+)$"
)


@pytest.fixture(scope="module")
def byte_pair():
    return byte_model(seed=3), byte_tokenizer()


def lines(caplog) -> list[re.Match]:
    out = []
    for r in caplog.records:
        if r.name == request_log.log.name:
            m = LINE.match(r.getMessage())
            assert m, r.getMessage()
            out.append(m)
    return out


def test_one_line_per_request_with_the_answer_figures(byte_pair, caplog):
    caplog.set_level(logging.INFO, logger=request_log.log.name)
    model, tok = byte_pair
    prompt = "an evicting method keeps its budget of this prompt's entries " * 2
    with serving(create_app(model, tok)) as base:
        c = client(base)
        r = chat(c, prompt, max_tokens=3, extra_body={"tokensieve": {"method": "snapkv", "budget": 40}})
        stream = chat(c, "stream me", max_tokens=3, stream=True)
        final = [ch for ch in stream if ch.choices and ch.choices[0].finish_reason][0]
        bad = httpx2.post(f"{base}/v1/chat/completions", json={"messages": "not a list"})
        httpx2.get(f"{base}/health")
        c.close()
        wait_until(lambda: len(lines(caplog)) >= 3, "three request lines")
    got = lines(caplog)
    assert len(got) == 3  # /health is not logged
    ts = r.model_extra["tokensieve"]
    first = got[0]
    assert (first["verb"], first["path"], first["status"], first["method"]) == (
        "POST",
        "/v1/chat/completions",
        "200",
        "snapkv",
    )
    assert int(first["prompt"]) == int(first["kept"]) == ts["prompt_tokens"] and int(first["kv"]) == 40
    assert float(first["ttft"]) == pytest.approx(ts["ttft_s"], abs=1e-3) and ts["ttft_s"] <= float(first["total"])
    streamed = got[1]  # logged when the stream ended, with the final chunk's figures
    fts = final.model_extra["tokensieve"]
    assert streamed["status"] == "200" and streamed["method"] == "full"
    assert int(streamed["kv"]) == fts["kv_kept"] == fts["prompt_tokens"] == int(streamed["prompt"])
    assert bad.status_code == 400 and got[2]["status"] == "400"
    assert got[2]["method"] == got[2]["prompt"] == got[2]["ttft"] == "-"  # no answer, no figures


def test_no_lines_when_the_logger_is_quiet(byte_pair, caplog):
    caplog.set_level(logging.WARNING, logger="tokensieve.serve")
    model, tok = byte_pair
    with serving(create_app(model, tok)) as base:
        c = client(base)
        chat(c, "hello", max_tokens=2)
        c.close()
    assert not [r for r in caplog.records if r.name.startswith("tokensieve.serve")]


def run_serve(monkeypatch, caplog, byte_pair, *argv: str) -> tuple[int, list[str]]:
    """``tokensieve serve ARGV`` up to the point where uvicorn would start (the model: the byte model)."""
    from tokensieve.serve import server

    patch_model_load(monkeypatch, lambda args: byte_pair)
    monkeypatch.setattr(server.DrainingServer, "run", lambda self: None)
    caplog.set_level(logging.DEBUG, logger="tokensieve.serve")  # restored after the test (serve sets its level)
    rc = cli.main(["serve", *argv])
    return rc, [r.getMessage() for r in caplog.records if r.name == "tokensieve.serve.banner"]


def test_banner_names_model_method_address_auth_and_limits(monkeypatch, caplog, byte_pair):
    rc, banner = run_serve(
        monkeypatch,
        caplog,
        byte_pair,
        "--method",
        "snapkv",
        "--param",
        "budget=64",
        "--api-key",
        "k1",
        "--api-key",
        "k2",
        "--port",
        "8123",
        "--max-queue",
        "3",
        "--max-batch",
        "2",
    )
    text = "\n".join(banner)
    assert rc == 0 and banner[0].startswith("tokensieve serve: model smollm2 (")
    assert "float32 on cpu" in banner[0] and "engine transformers" in banner[0]
    assert "method: snapkv {'budget': 64} by default; a request may name another: full, gemfilter" in text
    assert "address: http://127.0.0.1:8123 (loopback only)" in text
    assert "auth: API key required on /v1 (2 keys)" in text
    assert "selection page: http://127.0.0.1:8123/ (and POST /v1/tokensieve/select" in text
    assert "queue 3, batch 2, request timeout 600 s, default max_tokens 256" in text


def test_banner_without_keys_and_locked_params(monkeypatch, caplog, byte_pair):
    rc, banner = run_serve(monkeypatch, caplog, byte_pair, "--lock-params", "--request-timeout", "0")
    text = "\n".join(banner)
    assert rc == 0 and "auth: off (no --api-key)" in text and "method: full for every request (--lock-params)" in text
    assert "request timeout none" in text
    rc, banner = run_serve(monkeypatch, caplog, byte_pair, "--no-page")
    assert rc == 0 and "  selection page: off (--no-page)" in banner
    rc, banner = run_serve(monkeypatch, caplog, byte_pair, "--port", "0")
    assert rc == 0 and any(line.startswith("  selection page: GET / (and POST") for line in banner), banner


def test_quiet_serve_prints_no_banner(monkeypatch, caplog, byte_pair, capsys):
    monkeypatch.delenv("TOKENSIEVE_API_KEY", raising=False)
    rc, banner = run_serve(monkeypatch, caplog, byte_pair, "-q")
    assert rc == 0 and banner == [] and "loading" not in capsys.readouterr().err
    assert logging.getLogger("tokensieve.serve").getEffectiveLevel() == logging.WARNING
