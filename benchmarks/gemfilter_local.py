"""TTFT of GemFilter's local filter pass vs the dense one and full attention, up to millions of tokens (GPU).

Cells (label x length), token-id prompts on a random-weight model of a real shape:

* ``full``: full-attention prefill (lengths up to ``--full-max``, default 131072).
* ``dense``: GemFilter, dense one-shot filter pass (the paper).
* ``local``: GemFilter, ``filter_attention="local"`` one-shot filter pass, SDPA over query chunks.
* ``local_flex``: the same pass with one FlexAttention call per layer (``local_kernel="flex"``, compiled;
  the compile happens in the warm-up at each length and is reported as ``compile_s``).
* ``local_chunked``: the local pass streamed chunk by chunk (``chunk_size``): only layer r's keys grow with n.
* ``dense_chunked``: the dense pass layer by layer over chunks (the README's 1M-token row), for comparison.

TTFT = prefill including the first token's logits, device-synchronised, median of ``--repeats``
after one warm-up call per label at ``--warmup-length``. Peak memory = ``torch.cuda.max_memory_allocated``
(reset per cell; with ``--filter-only`` one figure per GPU). ``--filter-only`` builds only layers
``0..r`` (``tokensieve.integrations.filter_model.build_filter_model``) spread by ``--device-map`` / ``--max-memory``
(accelerate; modules put on ``cpu`` are offloaded and run on the GPU) and times the filter pass alone
(``GemFilter.select``): the shape of a model larger than one GPU, e.g. Llama-3.1-70B. The JSON is rewritten after every cell (a timeout keeps what finished; an existing
file is extended, cells re-run replace their old row); ``--plot`` draws TTFT vs length (log-log).

GPU commands (each under 9 minutes on an H100; Llama-3.1-8B shape, bf16, r = 13, k = 1024, w = 2048):
    python benchmarks/gemfilter_local.py --lengths 8k,32k,128k --labels full,dense,local
    python benchmarks/gemfilter_local.py --lengths 256k,1M --labels local_chunked
    python benchmarks/gemfilter_local.py --lengths 2M,4M --labels local_chunked --plot benchmarks/results/gemfilter_local.png
    python benchmarks/gemfilter_local.py --shape llama3.1-70b --filter-only --filter-layer 36 \
        --lengths 32k,128k --labels dense,local_flex   # layers 0..36 of the 70B shape (~61 GiB) on one GPU
    python benchmarks/gemfilter_local.py --shape llama3.1-70b --filter-only --filter-layer 36 --lengths 32k \
        --labels dense --max-memory 0=40GiB,cpu=200GiB   # the same, spread over the GPU and the host
CPU check: python benchmarks/gemfilter_local.py --shape tiny --device cpu --dtype float32 --lengths 512,2k \
    --labels full,dense,local,local_chunked --filter-layer 2 --topk 64 --n-recent 128 --chunk-size 256
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from tokensieve.bench.roofline import weights_bytes
from tokensieve.bench.timing import build_model, shape_config
from tokensieve.commands.common import parse_sizes
from tokensieve.errors import InputError
from tokensieve.integrations.filter_model import build_filter_model, filter_fraction
from tokensieve.methods import FullAttention
from tokensieve.methods.gemfilter import DEFAULT_N_INITIAL, DEFAULT_N_RECENT, GemFilter

LABELS = ("full", "dense", "local", "local_flex", "local_chunked", "dense_chunked")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """``0=40GiB,cpu=200GiB`` -> ``{0: "40GiB", "cpu": "200GiB"}``."""
    if not text:
        return None
    out: dict[int | str, str] = {}
    for part in text.split(","):
        dev, sep, cap = part.partition("=")
        if not sep or not cap:
            raise InputError(f"--max-memory entries look like 0=40GiB or cpu=200GiB, got {part!r}")
        out[int(dev) if dev.strip().isdigit() else dev.strip()] = cap.strip()
    return out


def make(label: str, args: argparse.Namespace) -> FullAttention | GemFilter:
    if label == "full":
        return FullAttention()
    kw: dict[str, Any] = dict(topk=args.topk, filter_layer=args.filter_layer, filter_attention="dense")
    if label.startswith("local"):
        kw |= dict(
            filter_attention="local",
            n_initial=args.n_initial,
            n_recent=args.n_recent,
            local_kernel="flex" if label == "local_flex" else "sdpa",
        )
    if label.endswith("chunked"):
        kw |= dict(chunk_size=args.chunk_size)
    return GemFilter(**kw)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gpus(device: torch.device) -> list[int]:
    return list(range(torch.cuda.device_count())) if device.type == "cuda" else []


def run_cell(
    model, method, n: int, device: torch.device, repeats: int, seed: int = 0, filter_only: bool = False
) -> dict[str, Any]:
    """TTFT (s, median) and peak memory (GiB) of ``method``'s prefill on a random prompt of ``n`` tokens
    (``filter_only``: of GemFilter's filter pass alone, ``select``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=g).to(device)  # [1, n]
    if isinstance(method, GemFilter):
        method.validate(model, n)
    times, details = [], {}
    torch.cuda.empty_cache() if device.type == "cuda" else None
    for g in gpus(device):
        torch.cuda.reset_peak_memory_stats(g)
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            if filter_only:
                state = None
                int(method.select(model, ids)[-1])
            else:
                state = method.prefill(model, ids)
                int(state.logits[0, -1].argmax())  # the first token
        sync(device)
        times.append(time.perf_counter() - t0)
        if state is not None:
            details = {k: v for k, v in state.details.items() if isinstance(v, (int, float, bool))}
        del state
        gc.collect()
    peaks = [round(torch.cuda.max_memory_allocated(g) / 2**30, 2) for g in gpus(device)]
    return dict(
        ttft_s=round(statistics.median(times), 4),
        times_s=[round(t, 4) for t in times],
        peak_gib=max(peaks) if peaks else None,
        peak_gib_per_gpu=peaks or None,
        details=details,
    )


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in LABELS:
        pts = sorted((r["length"], r["ttft_s"]) for r in rows if r["label"] == label and r.get("status") == "ok")
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--lengths", type=parse_sizes, default=[8192, 32768, 131072])
    ap.add_argument("--labels", default="full,dense,local")
    ap.add_argument("--topk", type=int, default=1024)
    ap.add_argument("--filter-layer", type=int, default=13)
    ap.add_argument("--n-initial", type=int, default=DEFAULT_N_INITIAL)
    ap.add_argument("--n-recent", type=int, default=DEFAULT_N_RECENT)
    ap.add_argument("--chunk-size", type=int, default=32768)
    ap.add_argument("--full-max", type=int, default=131072, help="longest prompt for the full and one-shot cells")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup-length", type=int, default=4096)
    ap.add_argument("--out", default="benchmarks/results/gemfilter_local.json")
    ap.add_argument("--plot", default=None, help="write a log-log TTFT vs length plot here")
    ap.add_argument(
        "--filter-only",
        action="store_true",
        help="build only layers 0..r (random weights) and time the filter pass alone (no full cells)",
    )
    ap.add_argument("--device-map", default="auto", help="with --filter-only: accelerate strategy (default auto)")
    ap.add_argument(
        "--max-memory",
        default=None,
        help="with --filter-only: per-device caps, e.g. 0=40GiB,cpu=200GiB (accelerate's max_memory)",
    )
    args = ap.parse_args(argv)
    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    bad = [x for x in labels if x not in LABELS]
    if bad:
        raise InputError(f"unknown labels {bad}; expected some of {LABELS}")
    device = torch.device(args.device)
    if args.filter_only and "full" in labels:
        raise InputError("--filter-only times the filter pass: drop 'full' from --labels")
    t0 = time.perf_counter()
    if args.filter_only:
        model = build_filter_model(
            shape_config(args.shape),
            args.filter_layer,
            device_map=args.device_map,
            max_memory=parse_max_memory(args.max_memory),
            dtype=DTYPES[args.dtype],
        )
    else:
        model = build_model(args.shape, DTYPES[args.dtype], device)
    build_s = time.perf_counter() - t0
    out = Path(args.out)
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"rows": []}
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("lengths", "labels", "out", "plot")}
    if device.type == "cuda":
        result["device"] = torch.cuda.get_device_name(device)
        result["gpus"] = [torch.cuda.get_device_name(g) for g in gpus(device)]
    if args.filter_only:
        result["filter_model"] = dict(
            build_s=round(build_s, 1),
            weight_gib=round(weights_bytes(model) / 2**30, 2),
            device_map=sorted({str(d) for d in getattr(model, "hf_device_map", {"": "cpu"}).values()}),
            fraction=filter_fraction(shape_config(args.shape), args.filter_layer),
        )
        print(f"filter model: {result['filter_model']}", flush=True)
    rows: list[dict[str, Any]] = result["rows"]
    fo = args.filter_only
    for label in labels:  # warm-up: kernels, allocator
        w = min(args.warmup_length, args.chunk_size + 64) if label.endswith("chunked") else args.warmup_length
        run_cell(model, make(label, args), max(w, args.topk + 1), device, 1, filter_only=fo)
    for n in args.lengths:
        for label in labels:
            if label in ("full", "dense", "local", "local_flex") and n > args.full_max:
                continue
            key = dict(
                label=label,
                length=n,
                shape=args.shape,
                n_recent=args.n_recent if label.startswith("local") else None,
                filter_only=fo or None,
            )
            try:
                compile_s = None
                if label == "local_flex":  # a new length compiles flex's kernel and its mask once: timed apart
                    t0 = time.perf_counter()
                    run_cell(model, make(label, args), n, device, 1, filter_only=fo)
                    compile_s = round(time.perf_counter() - t0, 2)
                row = (
                    key
                    | dict(status="ok", compile_s=compile_s)
                    | run_cell(model, make(label, args), n, device, args.repeats, filter_only=fo)
                )
            except torch.OutOfMemoryError:
                row = key | dict(status="oom", ttft_s=None)
            rows[:] = [r for r in rows if {k: r.get(k) for k in key} != key] + [row]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))
            print(
                f"{label:>14} {n:>9} {row['status']:>4} ttft {row.get('ttft_s')} s peak {row.get('peak_gib')} GiB",
                flush=True,
            )
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\n{'label':>14} {'length':>9} {'TTFT s':>9} {'peak GiB':>9} {'filter s':>9}")
    for r in sorted(rows, key=lambda r: (r["length"], LABELS.index(r["label"]))):
        d = r.get("details", {})
        print(
            f"{r['label']:>14} {r['length']:>9} {str(r.get('ttft_s')):>9} {str(r.get('peak_gib')):>9} {str(d.get('filter_s', '')):>9}"
        )
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
