"""Shutdown of a real ``tokensieve serve`` process (SIGTERM / Ctrl-C): /health 503 while draining, queued and
new requests 503, running requests finish within --shutdown-timeout or end with an error event and [DONE],
a second signal ends them at once; the process exits 0 within its bound, with no traceback in its log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2
import pytest
from eval_support import save_model_dir

SRC = Path(__file__).resolve().parents[2] / "src"
WAIT_S = 60.0  # bound of every wait (start-up included: the child imports torch on a busy machine)

# The real CLI in a child process, with two test-only changes made before anything is imported: every generated
# token takes DELAY seconds (a request that runs long enough to be interrupted) and no token ends an answer
# (random weights would stop at a random point), so a request runs exactly max_tokens * DELAY seconds.
CHILD = textwrap.dedent("""
    import sys, time
    import tokensieve.engine.runner as runner
    DELAY = float(sys.argv[1])
    real = runner.generate
    def slow_generate(*args, on_token=None, **kw):
        def each(token_id):
            time.sleep(DELAY)
            return on_token(token_id)
        return real(*args, on_token=each, **kw)
    runner.generate = slow_generate
    runner.stop_token_ids = lambda model, tokenizer: set()
    from tokensieve.cli import main
    sys.exit(main(["serve", *sys.argv[2:]]))
""")


class Child:
    """A ``tokensieve serve`` child process on 127.0.0.1 (a free port); its log is collected as it comes."""

    def __init__(self, model_dir: Path, *args: str, delay_s: float = 0.05) -> None:
        env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                str(delay_s),
                "--model",
                str(model_dir),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--log-level",
                "info",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        end = time.monotonic() + WAIT_S
        while not any("Uvicorn running on" in line for line in self.lines):
            assert self.proc.poll() is None, "the server exited at start:\n" + self.log
            assert time.monotonic() < end, "the server did not start:\n" + self.log
            time.sleep(0.05)
        line = next(line for line in self.lines if "Uvicorn running on" in line)
        self.base = line.split("running on ")[1].split()[0]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def body(max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


def stream_events(base: str, max_tokens: int, started: threading.Event) -> list[Any]:
    """The data lines of a streamed chat completion, parsed (``[DONE]`` as a string); ``started`` is set at the first."""
    out: list[Any] = []
    with httpx2.stream("POST", f"{base}/v1/chat/completions", json=body(max_tokens, True), timeout=WAIT_S) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                out.append(data if data == "[DONE]" else json.loads(data))
                started.set()
    return out


def wait_for(cond, what: str, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def health(base: str) -> httpx2.Response:
    return httpx2.get(f"{base}/health", timeout=10)


def queued(base: str, pool: ThreadPoolExecutor):
    """A non-streamed request sent now; it waits in the queue behind the running one."""
    return pool.submit(lambda: httpx2.post(f"{base}/v1/chat/completions", json=body(4, False), timeout=WAIT_S))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("serve-model"), max_pos=512)


def assert_clean_log(child: Child) -> None:
    assert "Traceback" not in child.log and "Cancel " not in child.log, child.log


def test_sigterm_drains_running_request_and_refuses_queued_and_new_ones(model_dir):
    child = Child(model_dir, "--shutdown-timeout", "20", "--allowed-host", "my.box")
    try:
        # the CLI bound to loopback checks the Host header (DNS rebinding), with --allowed-host's names allowed
        assert httpx2.get(f"{child.base}/health", headers={"Host": "evil.example"}).status_code == 421
        assert httpx2.get(f"{child.base}/health", headers={"Host": "my.box:8000"}).status_code == 200
        started, pool = threading.Event(), ThreadPoolExecutor(4)
        running = pool.submit(stream_events, child.base, 60, started)  # 60 tokens x 0.05 s: ~3 s
        assert started.wait(WAIT_S), child.log
        waiting = queued(child.base, pool)
        wait_for(lambda: health(child.base).json()["queue_depth"] == 1, "the second request to queue")
        t0 = time.monotonic()
        child.signal(signal.SIGTERM)
        wait_for(lambda: health(child.base).status_code == 503, "/health to say draining", timeout=10)
        h = health(child.base)
        assert h.status_code == 503 and h.json()["status"] == "draining"
        q = waiting.result(WAIT_S)  # answered at once, never started
        assert q.status_code == 503 and q.json()["error"]["code"] == "shutting_down", q.text
        new = httpx2.post(f"{child.base}/v1/chat/completions", json=body(4, False), timeout=10)
        assert new.status_code == 503 and new.json()["error"]["code"] == "shutting_down"
        assert not running.done()  # still streaming while the server drains
        events = running.result(WAIT_S)
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length", events[-3:]
        assert sum(1 for e in events if isinstance(e, dict) and "error" in e) == 0
        assert child.wait(WAIT_S) == 0
        assert time.monotonic() - t0 < 20, "exited well within --shutdown-timeout once the running request finished"
        assert_clean_log(child)
    finally:
        child.close()


def test_shutdown_timeout_ends_a_long_stream_with_an_error_event(model_dir):
    child = Child(model_dir, "--shutdown-timeout", "1")
    try:
        started, pool = threading.Event(), ThreadPoolExecutor(2)
        running = pool.submit(stream_events, child.base, 400, started)  # 400 x 0.05 s = 20 s: past the timeout
        assert started.wait(WAIT_S), child.log
        t0 = time.monotonic()
        child.signal(signal.SIGTERM)
        events = running.result(WAIT_S)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "shutting_down" and events[-2]["error"]["type"] == "server_error", events[
            -2
        ]
        assert 0.9 < time.monotonic() - t0 < 8, "ended at the shutdown timeout, not at the end of the answer"
        assert child.wait(WAIT_S) == 0
        assert time.monotonic() - t0 < 1 + 8  # the timeout plus the flush and the worker's join
        assert_clean_log(child)
    finally:
        child.close()


def test_second_ctrl_c_ends_running_streams_at_once_with_clean_endings(model_dir):
    child = Child(model_dir, "--shutdown-timeout", "60")
    try:
        started, pool = threading.Event(), ThreadPoolExecutor(2)
        running = pool.submit(stream_events, child.base, 400, started)
        assert started.wait(WAIT_S), child.log
        child.signal(signal.SIGINT)
        wait_for(lambda: health(child.base).json()["status"] == "draining", "the drain")
        time.sleep(0.3)
        assert not running.done()
        t0 = time.monotonic()
        child.signal(signal.SIGINT)
        events = running.result(WAIT_S)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "shutting_down", events[-3:]
        assert child.wait(WAIT_S) == 0
        assert time.monotonic() - t0 < 8, "a second signal does not wait for the 60 s shutdown timeout"
        assert_clean_log(child)
    finally:
        child.close()
