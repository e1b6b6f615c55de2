"""The selection page in a real headless Chromium (Debian's chromium + chromium-driver), driven over the W3C WebDriver
protocol (plain HTTP to chromedriver: no browser-automation package), against a real ``tokensieve serve`` process on
a tiny offline model with an API key: the page loads, a document is uploaded through the file input, a question runs
with GemFilter and SnapKV, and the highlighted token indices in the DOM equal the ``kept_indices`` the API returns for
the same request; the answers appear; a bad parameter shows the server's own error message.

Without Chromium the test skips, except under CI (``CI=true``), where it fails: ``make test-browser`` installs it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from eval_support import TEXT, save_model_dir

SRC = Path(__file__).resolve().parents[2] / "src"
WAIT_S = 60.0  # bound of every wait (the server's start imports torch on a busy machine)
KEY = "page-test-key"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver element reference key
CHROMIUM_FLAGS = [  # headless, and no connection attempt to anything but the page (the machine's network is closed)
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
# Small settings so that both methods drop tokens of a ~1500-token prompt (their defaults keep 1024).
PARAMS = {"gemfilter": {"topk": 200, "filter_layer": 1}, "snapkv": {"budget": 300}}
QUESTION = "Which river is near the old tower?"


def find_browser() -> tuple[str, str]:
    """Paths of chromium and chromedriver; skips the test when either is missing, fails under CI."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    missing = " and ".join(n for n, p in (("chromium", chromium), ("chromedriver", driver)) if not p)
    why = f"{missing} not installed (Debian: apt-get install chromium chromium-driver; make test-browser does it)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the browser test: {why}")
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, what: str, timeout: float = WAIT_S) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


class Server:
    """``tokensieve serve`` in a child process on 127.0.0.1 (a free port), with an API key."""

    def __init__(self, model_dir: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        code = "import sys; from tokensieve.cli import main; sys.exit(main(['serve', *sys.argv[1:]]))"
        args = [
            "--model",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--api-key",
            KEY,
            "--log-level",
            "info",
        ]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        wait_for(lambda: self.proc.poll() is not None or any("Uvicorn running on" in x for x in self.lines), "start")
        assert self.proc.poll() is None, "the server exited at start:\n" + "\n".join(self.lines)
        line = next(x for x in self.lines if "Uvicorn running on" in x)
        self.base = line.split("running on ")[1].split()[0]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Browser:
    """A headless Chromium session through chromedriver's W3C WebDriver endpoints."""

    def __init__(self, chromium: str, driver: str, profile: str) -> None:
        port = free_port()
        self.driver = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx2.Client(timeout=WAIT_S)
        wait_for(lambda: self._ready(), "chromedriver to answer")
        options = {"binary": chromium, "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]}
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def _ready(self) -> bool:
        try:
            return bool(self.http.get(f"{self.url}/status").json()["value"]["ready"])
        except (httpx2.HTTPError, ValueError, KeyError):
            return False

    def call(self, verb: str, path: str, body: dict[str, Any] | None = None) -> Any:
        r = self.http.request(
            verb, self.url + path, json=body if body is not None else ({} if verb == "POST" else None)
        )
        data = r.json()
        assert r.status_code == 200, f"WebDriver {verb} {path}: {data}"
        return data["value"]

    def s(self, verb: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.call(verb, f"/session/{self.session}{path}", body)

    def go(self, url: str) -> None:
        self.s("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        return self.s("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def type(self, css: str, text: str) -> None:
        self.s("POST", f"/element/{self.find(css)}/value", {"text": text})

    def click(self, css: str) -> None:
        self.s("POST", f"/element/{self.find(css)}/click")

    def js(self, script: str, *args: Any) -> Any:
        return self.s("POST", "/execute/sync", {"script": script, "args": list(args)})

    def close(self) -> None:
        try:
            self.call("DELETE", f"/session/{self.session}")
        finally:
            self.http.close()
            self.driver.terminate()
            self.driver.wait(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium, driver = find_browser()
    with tempfile.TemporaryDirectory(prefix="tokensieve-chromium-") as profile:
        b = Browser(chromium, driver, profile)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    srv = Server(save_model_dir(tmp_path_factory.mktemp("page-model"), max_pos=4096))
    try:
        yield srv
    finally:
        srv.close()


def api(server: Server, body: dict[str, Any]) -> httpx2.Response:
    return httpx2.post(
        f"{server.base}/v1/tokensieve/select", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=WAIT_S
    )


def highlighted(b: Browser, method: str) -> list[int]:
    return b.js(
        "return [...document.querySelectorAll(`.doc[data-method='${arguments[0]}'] .tok.kept`)]"
        ".map((s) => Number(s.dataset.i));",
        method,
    )


def fill_and_run(b: Browser, server: Server, doc_file: Path, params: dict[str, Any]) -> None:
    """Load the page, give the key, upload the document, type the question, pick gemfilter + snapkv, run."""
    b.go(server.base + "/")
    wait_for(lambda: b.js("return document.querySelectorAll('input[name=method]').length > 0"), "the method list")
    assert b.js("return document.getElementById('key-box').hidden") is False  # the server needs a key: asked for
    b.type("#api-key", KEY)
    b.type("#file", str(doc_file))  # the file input: read in the browser (FileReader)
    wait_for(lambda: b.js("return document.getElementById('document').value.length > 0"), "the file to load")
    b.type("#question", QUESTION)
    b.js("for (const box of document.querySelectorAll('input[name=method]')) box.checked = false;")
    b.click("input[name=method][value=gemfilter]")
    b.click("input[name=method][value=snapkv]")
    b.js("document.getElementById('params').value = arguments[0];", json.dumps(params))
    b.js("document.getElementById('max-tokens').value = '6';")
    b.js("delete document.getElementById('status').dataset.done; document.getElementById('error').textContent = '';")
    b.click("#run")


def test_page_highlights_equal_the_api_selection_and_shows_errors(browser, server, tmp_path):
    # multi-byte characters (tokens split inside them) and markup that must stay text
    doc = TEXT[:1500] + '\nThe café sign says 日本. <b id="injected">bold</b><img src=x onerror="window.pwned=1">\n'
    doc_file = tmp_path / "doc.txt"
    doc_file.write_text(doc, encoding="utf-8")
    b = browser

    fill_and_run(b, server, doc_file, PARAMS)
    wait_for(
        lambda: b.js(
            "return document.getElementById('status').dataset.done === '1' || "
            "document.getElementById('error').textContent !== ''"
        ),
        "the results",
    )
    assert b.js("return document.getElementById('error').textContent") == ""
    assert b.js("return document.getElementById('document').value") == doc  # the upload, read as UTF-8

    body = {
        "document": doc,
        "question": QUESTION,
        "methods": ["gemfilter", "snapkv"],
        "max_tokens": 6,
        "params": PARAMS,
    }
    r = api(server, body)
    assert r.status_code == 200, r.text
    data = r.json()
    n = data["prompt_tokens"]
    by_method = {res["method"]: res for res in data["results"]}
    for method in ("gemfilter", "snapkv"):
        res = by_method[method]
        kept = res["kept_indices"]
        assert 0 < len(kept) < n, (method, len(kept), n)  # a real selection: some tokens dropped
        assert highlighted(b, method) == kept, method
        shown = b.js(
            "return document.querySelector(`.card[data-method='${arguments[0]}'] .answer`).textContent;", method
        )
        assert shown == res["answer"], method
        ttft = b.js(
            "return document.querySelector(`.card[data-method='${arguments[0]}'] .stat-ttft`).textContent;", method
        )
        assert ttft.endswith(" s") and float(ttft.split()[0]) > 0
    # the page shows the prompt's text, escaped: the document's characters as text, in token order
    shown_text = b.js("return document.querySelector(`.doc[data-method='gemfilter']`).textContent;")
    assert shown_text == "".join(t["text"] for t in data["tokens"]) and doc in shown_text
    assert b.js("return document.getElementById('injected') === null && window.pwned === undefined")
    assert b.js("return document.querySelectorAll('.doc img, .doc b').length") == 0
    assert by_method["snapkv"]["selection"] == "kv" and by_method["gemfilter"]["selection"] == "tokens"
    # SnapKV's per-layer strip: one canvas with a row block per layer
    rows = len(by_method["snapkv"]["kept_per_layer"]["counts"])
    strip = "const c = document.querySelector(`.view[data-method='snapkv'] canvas.strip`); return c && c.dataset.rows;"
    assert rows > 0 and b.js(strip) == str(rows)

    bad = {"snapkv": {"budget": "many"}}
    fill_and_run(b, server, doc_file, bad)
    shown_error = wait_for(lambda: b.js("return document.getElementById('error').textContent"), "the error message")
    r = api(server, {**body, "params": bad})
    assert r.status_code == 400
    assert shown_error == r.json()["error"]["message"] and "budget" in shown_error
    assert b.js("return document.querySelectorAll('.doc').length") == 0  # no stale results next to the error
