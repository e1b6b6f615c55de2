"""The server engine's seams: one preparation per request, the tokenizer's two directions apart, a server that
pins its method's parameters (--lock-params), and a bounded load of concurrent clients (the in-process app,
real uvicorn, the official openai client; tiny models)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest
from eval_support import byte_model, byte_tokenizer
from test_serve import CHAT, MSG, PREFIX_DOC, WAIT_S, client, serving, slow, stream_text, wait_until

from tokensieve.engine.detokenize import Decoder
from tokensieve.engine.runner import generate
from tokensieve.methods.full import FullAttention
from tokensieve.methods.snapkv import SnapKV
from tokensieve.serve.app import create_app


@pytest.fixture(scope="module")
def tiny():
    return byte_model(max_pos=256), byte_tokenizer()


def spy_preparations(monkeypatch) -> dict[str, int]:
    """Counts, per method class, how often a method is prepared and validated for a prompt (runner.prepare does
    both, once per preparation; PrefixReuse forwards to its inner method)."""
    counts = {"prepare": 0, "validate": 0}
    for cls in (FullAttention, SnapKV):
        for name in ("prepare", "validate"):
            real = getattr(cls, name)

            def spy(self, *args, _real=real, _name=name, **kw):
                counts[_name] += 1
                return _real(self, *args, **kw)

            monkeypatch.setattr(cls, name, spy)
    return counts


def test_each_request_is_prepared_once_alone_streamed_batched_and_through_the_prefix_cache(tiny, monkeypatch):
    model, tok = tiny
    gate = threading.Event()
    app = create_app(
        model, tok, model_name="tiny", max_batch=4, max_queue=8, prefix_cache_gib=0.01, generate_fn=slow(0.0, gate)
    )
    engine = app.state.engine
    counts = spy_preparations(monkeypatch)  # after the app's own check of its default method
    with serving(app) as base, ThreadPoolExecutor(6) as pool:
        c = client(base)
        first = pool.submit(
            c.chat.completions.create, model="m", messages=MSG, max_tokens=3
        )  # runs alone, held at the gate
        wait_until(lambda: engine.busy, "the first request to run")
        snap = {"tokensieve": {"method": "snapkv", "budget": 64}}
        batch = [
            pool.submit(
                c.completions.create, model="m", prompt=f"batch row {i}", max_tokens=3, temperature=0, extra_body=snap
            )
            for i in range(3)
        ]
        wait_until(lambda: engine.queue_depth == 3, "three batchable requests to queue")
        gate.set()
        assert first.result(WAIT_S).usage.completion_tokens >= 1
        assert all(f.result(WAIT_S).usage.completion_tokens >= 1 for f in batch)
        assert max(r.batch_size for r in engine.records) == 3  # the three ran as one batch
        text, final, _ = stream_text(c.chat.completions.create(model="m", messages=MSG, max_tokens=3, stream=True))
        assert final is not None
        doc = [{"role": "system", "content": PREFIX_DOC}, {"role": "user", "content": "code?"}]
        for _ in range(2):  # a long prefix: alone, through the prefix cache (stores, then reuses)
            c.chat.completions.create(model="m", messages=doc, max_tokens=2)
        requests = 1 + 3 + 1 + 2
        assert len(engine.records) == requests and all(r.outcome == "completed" for r in engine.records)
        assert counts == {"prepare": requests, "validate": requests}  # once each: nothing prepared again by the worker
        c.close()


def test_decoding_never_waits_for_an_encoding(tiny):
    """A request holds the encoder's lock (a long prompt being tokenized); the running answer still streams
    to its end, because the worker decodes on its own tokenizer copy behind its own lock."""
    model, tok = tiny

    app = create_app(model, tok, model_name="tiny", generate_fn=slow(0.01))
    engine = app.state.engine
    assert engine.worker.decoder.copied and engine.worker.decoder.tokenizer is not tok
    with serving(app) as base:
        c = client(base)
        stream = c.chat.completions.create(model="m", messages=MSG, max_tokens=40, temperature=0, stream=True)
        it = iter(stream)
        next(it)  # the answer is running
        with engine.preparer.encode_lock:  # every encoding waits now
            text, final, chunks = stream_text(it)  # ... and the stream reaches its end regardless
        assert final is not None and engine.records[-1].outcome == "completed"
        ref = generate(model, tok, MSG, max_new_tokens=40)
        assert engine.records[-1].generated_tokens == ref.generated_tokens
        c.close()


def test_decoder_copy_decodes_as_the_tokenizer():
    tok = byte_tokenizer()
    dec = Decoder(tok)
    ids = tok("héllo, wörld")["input_ids"]
    assert (
        dec.copied
        and dec.tokenizer is not tok
        and dec(ids) == tok.decode(ids, skip_special_tokens=True) == "héllo, wörld"
    )


def test_lock_params_pins_the_servers_method_and_parameters(tiny):
    model, tok = tiny

    app = create_app(
        model, tok, model_name="tiny", method="snapkv", method_params={"budget": 64, "window_size": 8}, lock_params=True
    )
    with serving(app) as base, httpx2.Client(base_url=base, timeout=60) as http:
        for ext, param, words in [
            ({"budget": 65}, "tokensieve.budget", ["budget at 64", "got 65"]),
            ({"chunk_size": 4096}, "tokensieve.chunk_size", ["does not let requests set chunk_size"]),
            ({"method": "full"}, "tokensieve.method", ["'snapkv' only", "got 'full'"]),
            ({"method": "snapkv", "window_size": 16}, "tokensieve.window_size", ["window_size at 8"]),
        ]:
            r = http.post(CHAT, json={"messages": MSG, "max_tokens": 2, "tokensieve": ext})
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == param and err["code"] == "locked_parameter", (ext, r.text)
            assert all(w in err["message"] for w in words) and "--lock-params" in err["message"], err["message"]
        for ext in (None, {"method": "snapkv"}, {"budget": 64}, {"method": "snapkv", "budget": 64, "window_size": 8}):
            body = {"messages": MSG, "max_tokens": 2} | ({"tokensieve": ext} if ext else {})
            r = http.post(CHAT, json=body)
            assert r.status_code == 200 and r.json()["tokensieve"]["params"]["budget"] == 64, r.text
    unlocked = create_app(model, tok, model_name="tiny", method="snapkv", method_params={"budget": 64})
    with serving(unlocked) as base:  # the default: a request may choose
        r = httpx2.post(f"{base}{CHAT}", json={"messages": MSG, "max_tokens": 2, "tokensieve": {"budget": 65}})
        assert r.status_code == 200 and r.json()["tokensieve"]["params"]["budget"] == 65


def test_serve_cli_has_lock_params(capsys):
    from tokensieve import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0 and "--lock-params" in capsys.readouterr().out


LOAD_CLIENTS = 8
LOAD_REQUESTS = 3  # per client
LOAD_BOUND_S = 120.0
LOAD_RSS_GROWTH = 256 << 20  # bytes the process may grow by while the load runs (tiny models: far less)


def rss_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere, which makes the bound trivially true)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def test_concurrent_clients_all_finish_with_their_sequential_answers(tiny):
    """A bounded load: 8 openai clients x 3 requests at once (queue 32, batches of 4; chat, completions,
    streamed, different prompts and methods): no 5xx, none lost or stuck, each answer equal to the one the
    same request gets alone, resident memory bounded, and the server healthy and idle afterwards."""
    model, tok = tiny

    app = create_app(model, tok, model_name="tiny", max_queue=32, max_batch=4, request_timeout_s=LOAD_BOUND_S)
    engine = app.state.engine

    def ask(c: openai.OpenAI, i: int, j: int) -> str:
        prompt = f"client {i} asks question {j}: " + "words and more words. " * (i % 3)
        extra = {"tokensieve": {"method": "snapkv", "budget": 16, "window_size": 4}} if (i + j) % 3 == 0 else {}
        if j % 3 == 0:
            r = c.completions.create(model="m", prompt=prompt, max_tokens=6, temperature=0, extra_body=extra)
            return r.choices[0].text
        if j % 3 == 1:
            r = c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": prompt}], max_tokens=6, temperature=0, extra_body=extra
            )
            return r.choices[0].message.content
        text, final, _ = stream_text(
            c.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=6,
                temperature=0,
                stream=True,
                extra_body=extra,
            )
        )
        assert final is not None
        return text

    with serving(app) as base:
        clients = [client(base, timeout=LOAD_BOUND_S) for _ in range(LOAD_CLIENTS)]
        alone = {
            (i, j): ask(clients[i], i, j) for i in range(LOAD_CLIENTS) for j in range(LOAD_REQUESTS)
        }  # one at a time
        t0, rss0 = time.monotonic(), rss_bytes()
        with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
            # each client sends its requests one after another; the clients all at once
            futures = [
                pool.submit(lambda i=i: [ask(clients[i], i, j) for j in range(LOAD_REQUESTS)])
                for i in range(LOAD_CLIENTS)
            ]
            together = {}
            for i, f in enumerate(futures):
                for j, text in enumerate(f.result(LOAD_BOUND_S)):  # raises on any error status (5xx included)
                    together[(i, j)] = text
        assert time.monotonic() - t0 < LOAD_BOUND_S
        assert rss_bytes() - rss0 < LOAD_RSS_GROWTH
        assert together == alone
        n = 2 * LOAD_CLIENTS * LOAD_REQUESTS
        assert len(engine.records) == n and all(r.outcome == "completed" for r in engine.records)
        assert max(r.batch_size for r in engine.records) > 1  # some of them shared a batch
        h = httpx2.get(f"{base}/health").json()
        assert h["status"] == "ok" and h["queue_depth"] == 0 and not h["busy"]
        for c in clients:
            c.close()
