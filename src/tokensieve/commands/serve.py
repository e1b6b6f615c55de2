"""`tokensieve serve`: an OpenAI-compatible HTTP server (chat and text completions, streaming) over one model.

FastAPI, uvicorn and the model are imported in ``run`` only, so the rest of the CLI works without the
server's dependencies (FastAPI, uvicorn and prometheus-client are regular dependencies of tokensieve).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from tokensieve.commands.common import non_negative_int, positive_int

log = logging.getLogger("tokensieve.serve.banner")


def _port(text: str) -> int:
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is in [0, 65535], got {text!r}")
    return value


def _seconds(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds (0 = no timeout), got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0 (0 = no timeout), got {text!r}")
    return value or None


def _non_negative(what: str) -> Callable[[str], float]:
    """An argparse type: a finite number >= 0; ``what`` completes "expected a number of ..." in its error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of {what}, got {text!r}") from None
        if not 0 <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected a number of {what}, got {text!r}")
        return value

    return parse


_drain_seconds = _non_negative("seconds >= 0")
_gib = _non_negative("GiB >= 0 (0 disables the prefix cache)")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    from tokensieve.commands.common import add_method_args, add_model_args, parse_model_name, parse_size

    p = sub.add_parser(
        "serve",
        description=(
            "Serve a model over HTTP with OpenAI's API: POST /v1/chat/completions and /v1/completions "
            '("stream": true for server-sent events), GET /v1/models, /health, /metrics (Prometheus). '
            "Requests run one at a time from a bounded queue (or in batches: --max-batch); a request may pick its own method with "
            '"tokensieve": {"method": "snapkv", "budget": 512}. A web page at / shows which prompt tokens each method '
            "keeps, its answer, TTFT and KV kept (--no-page turns it off). See docs/serve.md."
        ),
    )
    add_model_args(p)
    add_method_args(p, filter_model=False)
    p.add_argument(
        "--filter-model",
        dest="filter_models",
        action="append",
        default=[],
        type=parse_model_name,
        metavar="NAME|PATH",
        help="a draft model of the same tokenizer for GemFilter's filter pass (repeatable): loaded at start; a request "
        'names one with "tokensieve": {"method": "gemfilter", "filter_model": NAME} (null: the model '
        "itself); with --method gemfilter the first is the server's default. With --engine vllm the model is not "
        "loaded in transformers at all: the filter pass always runs on a draft (docs/gemfilter.md)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only; see --api-key)"
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=None,
        metavar="NAME",
        help="a Host name the server answers besides loopback ones (repeatable; '*' for any). Bound to loopback, "
        "requests whose Host header is not localhost, 127.0.0.1, ::1 or one of these get 421 (DNS rebinding); "
        "bound elsewhere, the Host is checked only when this is given",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1 requests (401 otherwise; /health and /metrics stay open); "
        "give it several times for several clients, each with its own prefix-cache entries "
        "(default: the TOKENSIEVE_API_KEY environment variable, else no key)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=parse_size,
        default=8 << 20,
        help="request bodies larger than this get 413 before they are read (default 8M)",
    )
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--max-queue",
        type=non_negative_int,
        default=16,
        help="requests that may wait while one runs; more get 429 (default 16)",
    )
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=1,
        help="requests generated together in one batch where they can share it (same method and parameters, "
        "full/gemfilter/snapkv/streamingllm, greedy or the same sampling without a seed; default 1: one at a time)",
    )
    p.add_argument(
        "--lock-params",
        action="store_true",
        help="requests run with this server's --method and its parameters only: a request that names another "
        'method or another parameter value in its "tokensieve" object gets 400 naming the field',
    )
    p.add_argument(
        "--request-timeout",
        type=_seconds,
        default=600.0,
        help="seconds from arrival to the last token before a request gets 504 (default 600; 0 = none)",
    )
    p.add_argument(
        "--default-max-tokens", type=parse_size, default=256, help="max_tokens of requests that give none (default 256)"
    )
    p.add_argument(
        "--served-model-name", default=None, help="model id in /v1/models and responses (default: the --model value)"
    )
    p.add_argument(
        "--prefix-cache-gib",
        type=_gib,
        default=1.0,
        help="prefix cache size in GiB: a shared prompt prefix (system prompt, document) is computed once (default 1; 0 disables it; docs/prefix_cache.md)",
    )
    p.add_argument(
        "--engine",
        choices=["transformers", "vllm"],
        default="transformers",
        help="what generates: transformers (default; every method) or vllm (vLLM's async engine on the tokens "
        "GemFilter keeps, or the whole prompt with --method full; needs pip install 'tokensieve[vllm]'; docs/vllm.md)",
    )
    p.add_argument(
        "--vllm-max-model-len",
        type=positive_int,
        default=None,
        help="--engine vllm: vLLM's max_model_len, kept prompt + answer (default: the model's)",
    )
    p.add_argument(
        "--vllm-max-num-seqs",
        type=positive_int,
        default=None,
        help="--engine vllm: requests vLLM runs at once (default: vLLM's)",
    )
    p.add_argument(
        "--vllm-gpu-memory-utilization",
        type=_fraction,
        default=None,
        help="--engine vllm: fraction of GPU memory vLLM may take, leave room for the filter model (default: vLLM's 0.9)",
    )
    p.add_argument(
        "--vllm-enforce-eager", action="store_true", help="--engine vllm: no CUDA graphs / compilation (faster start)"
    )
    p.add_argument(
        "--shutdown-timeout",
        type=_drain_seconds,
        default=30.0,
        help="at SIGTERM or Ctrl-C: seconds the running requests may take to finish while /health answers 503 "
        "'draining' and new and queued requests get 503; then they are ended (streams get an error event and "
        "[DONE]); a second signal ends them at once (default 30; 0 ends them at once)",
    )
    p.add_argument(
        "--no-page",
        dest="page",
        action="store_false",
        help="do not serve the selection page (GET /) nor its POST /v1/tokensieve/select: an API-only server "
        "(docs/serve.md, 'The selection page')",
    )
    p.add_argument(
        "--log-level",
        default=None,
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (default info; warning with --quiet)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no start-up banner, no log line per request, no 'loading' line (warnings and errors still print)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.errors import require_extra

    require_extra("serve", "the server")
    import uvicorn

    from tokensieve.commands import common
    from tokensieve.commands.common import build_methods, method_params
    from tokensieve.errors import InputError
    from tokensieve.serve.app import create_app

    build_methods(args)  # bad --param values fail here, before the model loads
    params = method_params(args)[args.method]
    keys = args.api_key or ([os.environ["TOKENSIEVE_API_KEY"]] if os.environ.get("TOKENSIEVE_API_KEY") else [])
    if any(not k.strip() or k != k.strip() for k in keys):
        raise InputError("--api-key: a key must be non-empty, without surrounding spaces")
    if args.max_body_bytes < 1:
        raise InputError(f"--max-body-bytes must be at least 1, got {args.max_body_bytes}")
    from tokensieve.serve.app import LOOPBACK_HOSTS, host_name, is_loopback

    extra = args.allowed_host or []
    if any(not host_name(h) or " " in h.strip() for h in extra):
        raise InputError(f"--allowed-host: a host name must be non-empty, without spaces, got {extra!r}")
    allowed = (list(LOOPBACK_HOSTS) + extra) if is_loopback(args.host) else (extra or None)
    front = {"api_keys": keys, "max_body_bytes": args.max_body_bytes, "allowed_hosts": allowed, "page": args.page}
    if len(set(args.filter_models)) != len(args.filter_models):
        raise InputError(f"--filter-model: each draft once, got {args.filter_models}")
    if args.engine == "vllm":
        app = _vllm_app(args, params, front)
    else:
        model, tok = common.load(args)
        drafts = _load_drafts(args, model)
        if drafts and args.method == "gemfilter":
            params = {**params, "filter_model": args.filter_models[0]}
        app = create_app(
            model,
            tok,
            model_name=args.served_model_name or args.model,
            method=args.method,
            method_params=params,
            max_queue=args.max_queue,
            request_timeout_s=args.request_timeout,
            default_max_tokens=args.default_max_tokens,
            prefix_cache_gib=args.prefix_cache_gib,
            max_batch=args.max_batch,
            lock_params=args.lock_params,
            filter_models=drafts,
            **front,
        )
    if not is_loopback(args.host) and not keys:
        print(
            f"tokensieve serve: warning: listening on {args.host}, not loopback, without --api-key: anyone who can reach it "
            f"can use it",
            file=sys.stderr,
        )
    from tokensieve.serve.server import DrainingServer

    # The banner and the per-request lines (tokensieve.serve.request_log) go through logging, INFO unless --quiet.
    logging.getLogger("tokensieve.serve").setLevel(logging.WARNING if args.quiet else logging.INFO)
    for line in banner(args, app, params, keys):
        log.info(line)
    log_level = args.log_level or ("warning" if args.quiet else "info")
    config = uvicorn.Config(
        # uvicorn's access log is off: tokensieve's line per request says more (method, tokens, TTFT, time)
        app,
        host=args.host,
        port=args.port,
        log_level=log_level,
        access_log=False,
        ws="none",
        lifespan="on",
    )
    DrainingServer(config, app.state.engine, args.shutdown_timeout).run()
    return 0


def banner(args: argparse.Namespace, app: Any, params: dict[str, Any], keys: list[str]) -> list[str]:
    """The start-up banner's lines: model, method(s), address, auth, limits (``tokensieve serve`` logs them)."""
    import torch

    from tokensieve.methods import METHODS
    from tokensieve.serve.app import is_loopback

    engine = app.state.engine
    model = getattr(engine, "model", None)
    shown = {k: v for k, v in params.items() if not k.startswith("_")}
    what = f"{args.model}"
    if args.engine == "transformers" and model is not None and hasattr(model, "dtype"):
        what += (
            f" ({type(model).__name__}, {str(model.dtype).removeprefix('torch.')} on {model.device}, "
            f"{torch.get_num_threads()} CPU threads)"
        )
    if args.engine == "vllm":
        from tokensieve.serve.vllm_engine import vllm_methods

        others = [m for m in vllm_methods() if m != args.method]
    else:
        others = [m for m in METHODS if m != args.method]
    method = f"{args.method}" + (f" {shown}" if shown else "")
    method += (
        " for every request (--lock-params)"
        if args.lock_params
        else f" by default; a request may name another: {', '.join(others)}"
    )
    if args.filter_models:
        method += f"; drafts for GemFilter's filter pass: {', '.join(args.filter_models)}"
    port = "a free port (uvicorn's line below says which)" if args.port == 0 else str(args.port)
    url = f"http://{args.host}:{port}" if args.port else f"{args.host}, {port}"
    where = url + " (loopback only)" if is_loopback(args.host) else " (reachable from other machines)"
    auth = f"API key required on /v1 ({len(keys)} key{'s' if len(keys) != 1 else ''})" if keys else "off (no --api-key)"
    timeout = f"{args.request_timeout:g} s" if args.request_timeout else "none"
    limits = (
        f"queue {args.max_queue}, batch {args.max_batch}, request timeout {timeout}, "
        f"default max_tokens {args.default_max_tokens}, body {args.max_body_bytes} bytes, "
        f"prefix cache {args.prefix_cache_gib:g} GiB, shutdown drain {args.shutdown_timeout:g} s"
    )
    return [
        f"tokensieve serve: model {what}, engine {args.engine}",
        f"  method: {method}",
        f"  address: {where}",
        f"  auth: {auth}",
        f"  limits: {limits}",
        "  selection page: off (--no-page)"
        if not getattr(args, "page", True)
        else f"  selection page: {url + '/' if args.port else 'GET /'} (and POST /v1/tokensieve/select; --no-page turns both off)",
        "  one line per request follows (--quiet: none)",
    ]


def _load_drafts(args: argparse.Namespace, model: Any, device: str | None = None) -> dict[str, Any]:
    """The --filter-model drafts, by name, each loaded once on ``model``'s device (or ``device``)."""
    from tokensieve.commands.common import announce_loading
    from tokensieve.core.draft import load_draft

    drafts = {}
    for name in args.filter_models:
        announce_loading(args, name)
        drafts[name] = load_draft(name, model) if model is not None else load_draft(name, None, args.dtype, device)
    return drafts


def _vllm_app(args: argparse.Namespace, params: dict[str, Any], front: dict[str, Any]) -> Any:
    """``--engine vllm``: the filter model (transformers) and the vLLM engine args for the same checkpoint.
    What can be checked without loading (vLLM installed, the method, the model's form) is checked first."""
    from tokensieve.core.models import cache_dir, dtype_name, model_source
    from tokensieve.errors import InputError
    from tokensieve.integrations.vllm_adapter import VLLMNotInstalledError, import_vllm
    from tokensieve.serve.app import app_for_engine
    from tokensieve.serve.vllm_engine import VLLMEngine, vllm_methods

    try:
        import_vllm()
    except VLLMNotInstalledError as exc:
        raise InputError(f"--engine vllm: {exc}") from None
    if args.method not in vllm_methods():
        raise InputError(
            f"--engine vllm cannot run method {args.method!r}; expected one of: {', '.join(vllm_methods())}"
        )
    kind, where = model_source(args.model)
    if kind == "gguf":
        raise InputError(
            f"--engine vllm needs a transformers model folder or an embedded model name, got the .gguf file {where}"
        )
    from tokensieve.commands import common

    drafts: dict[str, Any] = {}
    if args.filter_models:  # the filter pass runs on a draft: the model itself is needed by vLLM only
        from tokensieve.core.draft import check_same_tokenizer
        from tokensieve.core.models import load_tokenizer

        if kind == "embedded" and not (cache_dir() / str(where) / "config.json").exists():
            common.load(args)  # an embedded model is stored as a folder on first load: vLLM reads that folder
        tok = load_tokenizer(args.model)
        drafts = _load_drafts(args, None, args.device)
        for draft in drafts.values():
            check_same_tokenizer(tok, draft.tokenizer)
        model = drafts[args.filter_models[0]].model
    else:
        model, tok = common.load(args)  # an embedded model is stored as a folder on first load: vLLM reads that folder
    engine_args: dict[str, Any] = {
        "model": str(cache_dir() / str(where)) if kind == "embedded" else str(where),
        "dtype": dtype_name(str(model.dtype).removeprefix("torch.")),
        "seed": 0,
        "enforce_eager": args.vllm_enforce_eager,
        "disable_log_stats": True,
    }
    for key in ("max_model_len", "max_num_seqs", "gpu_memory_utilization"):
        value = getattr(args, f"vllm_{key}")
        if value is not None:
            engine_args[key] = value
    engine = VLLMEngine(
        model,
        tok,
        engine_args,
        method=args.method,
        method_params=params,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout,
        lock_params=args.lock_params,
        filter_models=drafts,
    )
    return app_for_engine(
        engine, model_name=args.served_model_name or args.model, default_max_tokens=args.default_max_tokens, **front
    )
