"""Server overhead of `tokensieve serve`: time to the first streamed byte minus the model's own TTFT.

    PYTHONPATH=src .venv/bin/python benchmarks/serve_overhead.py            # writes benchmarks/results/serve_overhead.json

The server runs in a subprocess (uvicorn on 127.0.0.1, the real app from ``create_app``); this process
sends streaming chat requests from client threads with raw HTTP and timestamps the first body byte of
each response (the server sends headers and the first chunk when the first token is chosen). Each
response's last chunk reports the model's ``ttft_s`` (prefill + first token, measured by the runner) and
``queue_s`` (time waiting for the worker). Per request:

* ``overhead_s``      = first byte - ttft_s: everything the client waits for beyond the model, queueing included;
* ``server_overhead_s`` = first byte - ttft_s - queue_s: HTTP, JSON parsing and validation, tokenization
  and the chat template, method preparation, the hand-off to the worker thread and back, SSE framing.

Scenarios: one client (sequential) and 8 client threads at once (the load test), on a tiny random
Llama (byte tokenizer; TTFT of milliseconds, so the overhead is visible) and on SmolLM2-135M.
Clients and server share the machine's cores (2 on the reference machine), as they would locally.

Batching: ``--max-batch 1,8`` starts one server per value (``tokensieve serve --max-batch N``) and runs
the same scenarios, with the same requests, against each; every scenario reports its throughput
(``completion_tokens_per_s``: generated tokens of all requests / wall time) and whether each answer
equals the one the first ``--max-batch`` value gave (greedy answers must not depend on batching):

    PYTHONPATH=src .venv/bin/python benchmarks/serve_overhead.py --models smollm2 --max-batch 1,8 --max-tokens 32 --requests 0,32 --out benchmarks/results/serve_batch.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def tiny_model_and_tokenizer():
    """A 3-layer random Llama over a one-token-per-byte tokenizer (as in tests/eval_support.py)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import tokensieve
    from tokensieve.testing import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=257,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=None,
    )
    model = LlamaForCausalLM(cfg).eval()
    tokensieve.use_tokensieve_attention(model)
    return model, tok


def serve(model_name: str, port_file: str, max_queue: int, max_batch: int) -> None:
    """Subprocess: run the server, write its port to ``port_file``."""
    import uvicorn

    import tokensieve
    from tokensieve.serve.app import create_app

    model, tok = tiny_model_and_tokenizer() if model_name == "tiny" else tokensieve.load_model(model_name)
    app = create_app(model, tok, model_name=model_name, max_queue=max_queue, max_batch=max_batch)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws="none"))

    def announce() -> None:
        while not server.started:
            time.sleep(0.01)
        Path(port_file).write_text(str(server.servers[0].sockets[0].getsockname()[1]))

    threading.Thread(target=announce, daemon=True).start()
    server.run()


def one_request(http, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    t0 = time.perf_counter()
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()!r}")
        it = r.iter_raw()
        first = next(it)
        t_first = time.perf_counter()
        raw = first + b"".join(it)
    stats, text = None, []
    for line in raw.decode().split("\n\n"):
        if not line.startswith("data: {"):
            continue
        event = json.loads(line[6:])
        if "tokensieve" in event:
            stats = event["tokensieve"]
        text += [c["delta"].get("content") or "" for c in event.get("choices", [])]
    if stats is None:
        raise RuntimeError(f"no final chunk with tokensieve stats in {raw[-300:]!r}")
    ttfb = t_first - t0
    return {
        "ttfb_s": ttfb,
        "ttft_s": stats["ttft_s"],
        "queue_s": stats["queue_s"],
        "overhead_s": ttfb - stats["ttft_s"],
        "server_overhead_s": ttfb - stats["ttft_s"] - stats["queue_s"],
        "generated_tokens": stats["generated_tokens"],
        "text": "".join(text),
    }


def summary(values: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(values) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "mean_ms": round(float(a.mean()), 2),
        "max_ms": round(float(a.max()), 2),
    }


def run_scenario(
    base: str, model: str, clients: int, requests: int, max_tokens: int, warmup: int = 4
) -> dict[str, Any]:
    import httpx2

    def prompt(i: int) -> str:
        return f"Request {i}: name one colour of the item number {i * 37 % 101} and say why."

    def worker(ids: list[int]) -> list[dict[str, Any]]:
        with httpx2.Client(base_url=base, timeout=600) as http:
            return [one_request(http, prompt(i), max_tokens) | {"id": i} for i in ids]

    worker(list(range(-warmup, 0)))  # warm the model and the connection path
    before = batch_sizes(base)
    chunks = [list(range(c, requests, clients)) for c in range(clients)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        rows = [row for part in pool.map(worker, chunks) for row in part]
    wall = time.perf_counter() - t0
    after = batch_sizes(base)
    generated = sum(r["generated_tokens"] for r in rows)
    out: dict[str, Any] = {
        "model": model,
        "clients": clients,
        "requests": len(rows),
        "max_tokens": max_tokens,
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(rows) / wall, 2),
        "completion_tokens": generated,
        "completion_tokens_per_s": round(generated / wall, 2),
    }
    for key in ("ttfb_s", "ttft_s", "queue_s", "overhead_s", "server_overhead_s"):
        out[key.replace("_s", "")] = summary([r[key] for r in rows])
    # runs of the engine per batch-size bucket (cumulative: le="1.0" counts runs of one request)
    out["batch_size_runs"] = {le: after[le] - before.get(le, 0.0) for le in after}
    out["answers"] = {r["id"]: r["text"] for r in rows}
    return out


def batch_sizes(base: str) -> dict[str, float]:
    """The server's batch-size histogram (cumulative counts per bucket), from /metrics."""
    import httpx2

    prefix = 'tokensieve_batch_size_bucket{le="'
    return {
        line[len(prefix) :].split('"')[0]: float(line.split()[-1])
        for line in httpx2.get(f"{base}/metrics").text.splitlines()
        if line.startswith(prefix)
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # subprocess mode: the model to serve
    ap.add_argument("--port-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2 (default both)")
    ap.add_argument("--clients", type=int, default=8, help="client threads of the load scenario (default 8)")
    ap.add_argument("--max-batch", default="1", help="comma-separated --max-batch values, one server each (default 1)")
    ap.add_argument(
        "--max-tokens", type=int, default=None, help="max_tokens of every request (default: 8 tiny, 4 smollm2)"
    )
    ap.add_argument(
        "--requests",
        default=None,
        help="SEQUENTIAL,LOAD: requests of the one-client and the load scenario, 0 skips one (default: 64,256 tiny, 16,64 smollm2)",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_overhead.json"))
    args = ap.parse_args()
    batches = [int(b) for b in args.max_batch.split(",")]
    if args.serve:
        serve(args.serve, args.port_file, max_queue=1024, max_batch=batches[0])
        return 0
    plan = {  # model: (sequential requests, load requests, max_tokens)
        "tiny": (64, 256, 8),
        "smollm2": (16, 64, 4),
    }
    scenarios = []
    load_before = os.getloadavg()
    first_answers: dict[tuple[str, int], dict[int, str]] = {}  # (model, clients): the first --max-batch value's answers
    for model, max_batch in [(m, b) for m in args.models.split(",") for b in batches]:
        seq_n, load_n, max_tokens = plan[model]
        max_tokens = args.max_tokens or max_tokens
        if args.requests:
            seq_n, load_n = (int(n) for n in args.requests.split(","))
        with tempfile.TemporaryDirectory() as tmp:
            port_file = Path(tmp) / "port"
            env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
            proc = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--serve",
                    model,
                    "--port-file",
                    str(port_file),
                    "--max-batch",
                    str(max_batch),
                ],
                env=env,
            )
            try:
                deadline = time.monotonic() + 300
                while not port_file.exists():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the {model} server did not start")
                    time.sleep(0.1)
                time.sleep(0.05)
                base = f"http://127.0.0.1:{port_file.read_text()}"
                for clients, n in [(c, n) for c, n in ((1, seq_n), (args.clients, load_n)) if n > 0]:
                    s = {"max_batch": max_batch} | run_scenario(base, model, clients, n, max_tokens)
                    answers = s.pop("answers")
                    same = first_answers.setdefault((model, clients), answers)
                    s["answers_equal_to_first_max_batch"] = sum(answers[i] == same[i] for i in answers)
                    print(json.dumps(s), flush=True)
                    scenarios.append(s)
            finally:
                proc.terminate()
                proc.wait(60)
    import torch

    result = {
        "command": ("PYTHONPATH=src .venv/bin/python benchmarks/serve_overhead.py " + " ".join(sys.argv[1:])).strip(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
            "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        },
        "definitions": {
            "ttfb": "client: request sent -> first byte of the streamed response body",
            "ttft": "server-reported model TTFT (prefill + first token), from the response's tokensieve.ttft_s",
            "queue": "server-reported wait for the worker (tokensieve.queue_s)",
            "overhead": "ttfb - ttft (queueing included)",
            "server_overhead": "ttfb - ttft - queue",
        },
        "scenarios": scenarios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
