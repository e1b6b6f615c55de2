"""`tokensieve bench`: TTFT, peak memory, KV bytes, decode steps against their roofline, and end-to-end latency vs prompt length."""

from __future__ import annotations

import argparse
from pathlib import Path

from tokensieve.commands.common import (
    add_dtype_device_args,
    add_method_args,
    announce_loading,
    method_params,
    non_negative_int,
    parse_sizes,
)

# tokensieve.bench.timing.SHAPES' names, for --shape without importing torch (tests/commands/test_cli_errors.py checks they agree).
SHAPE_NAMES = ("llama3.1-8b", "llama3.1-70b", "llama3.2-1b", "mistral-nemo-12b", "qwen2.5-7b", "smollm2-135m", "tiny")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        description="Build a model in a real architecture's shape with random weights (time and memory do not depend on weight values) or load a checkpoint, then measure per method and length: median TTFT after warm-up, peak memory, KV bytes after prefill, the median and p90 decoding step, "
        "the roofline of a step (the weights and the KV entries it attends to, at the device's copy bandwidth measured in the same run; "
        "a rough figure on the CPU) and the fraction of it reached, and the end-to-end latency of an --answer-tokens answer.",
    )
    p.add_argument("--shape", default="llama3.1-8b", help=f"one of: {', '.join(SHAPE_NAMES)} (default llama3.1-8b)")
    p.add_argument(
        "--model", default=None, help="a real checkpoint (folder, .gguf or embedded name) instead of --shape"
    )
    p.add_argument(
        "--lengths",
        type=parse_sizes,
        default=[8192, 32768, 65536, 131072],
        help="prompt lengths (default 8k,32k,64k,128k)",
    )
    add_method_args(p, multi=True)
    add_dtype_device_args(p, dtype_default="bfloat16")
    p.add_argument("--repeats", type=int, default=3, help="TTFT runs per cell, median reported (default 3)")
    p.add_argument(
        "--decode-tokens",
        type=int,
        default=128,
        help="decoding steps timed for the median/p90 step and the roofline (default 128; 0 skips)",
    )
    p.add_argument(
        "--answer-tokens",
        type=non_negative_int,
        default=None,
        help="end-to-end latency of an answer this long: TTFT + its steps, measured in one run, not "
        "extrapolated (default 256; 0 skips; not with --batches, whose answers are --decode-tokens long)",
    )
    p.add_argument(
        "--no-cold-run",
        action="store_true",
        help="skip each cell's first, untimed run (by default its TTFT is reported apart as ttft_cold_s: "
        "compiles and graph captures for a new length happen there, never in the medians)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="fuse each captured decoding step with torch.compile first (about a minute per capacity "
        "bucket on a GPU, paid in the cold run and reported there, never in the step figures)",
    )
    p.add_argument(
        "--batches",
        type=parse_sizes,
        default=None,
        help="batch throughput instead: answer this many prompts at once per cell, e.g. 1,4,16 "
        "(tokens/s of a --decode-tokens answer per row, and the ratio to batch 1)",
    )
    p.add_argument("--out", default=None, help="write JSON here (and a PNG plot beside it)")
    p.add_argument(
        "--force",
        action="store_true",
        help="run a GPU-sized shape (over 1B parameters, e.g. the default llama3.1-8b) on the CPU anyway "
        "(refused by default: tens of GB of weights and hours per cell)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.bench.timing import SHAPES
    from tokensieve.core.models import load_model, parse_dtype
    from tokensieve.errors import InputError
    from tokensieve.methods import make_method

    if args.model is None and args.shape not in SHAPES:
        raise InputError(f"unknown shape {args.shape!r}; expected one of: {', '.join(SHAPES)}")
    if args.model is None and not args.force:
        refuse_gpu_shape_on_cpu(args.shape, args.device)
    if args.repeats < 1:
        raise InputError(f"--repeats must be >= 1, got {args.repeats}")
    if args.decode_tokens < 0:
        raise InputError(f"--decode-tokens must be >= 0, got {args.decode_tokens}")
    if args.batches is not None and args.answer_tokens is not None:
        raise InputError(
            f"--answer-tokens {args.answer_tokens} does not apply with --batches (their answers are "
            f"--decode-tokens long); drop one of them"
        )
    if args.batches is not None and args.compile:
        raise InputError(
            "--compile does not apply with --batches (each batch cell captures its own steps); drop one of them"
        )
    params = method_params(args)
    for name, p in params.items():
        make_method(name, **p)  # a bad parameter fails before any model is built
    drafts = {p["filter_model"] for p in params.values() if isinstance(p.get("filter_model"), str)}
    if drafts and not args.model:
        raise InputError(
            "--filter-model needs --model: a draft is a real checkpoint of the model's tokenizer "
            "(random-weight shapes with a draft: benchmarks/draft_gpu.py)"
        )
    dtype = parse_dtype(args.dtype)
    if args.out and args.batches is None:  # the PNG beside it needs matplotlib: say so before anything runs
        from tokensieve.errors import require_extra

        require_extra("plots", "tokensieve bench --out (its PNG)")
    announce_loading(args, args.model or f"the {args.shape} shape (random weights)")
    from tokensieve.bench.timing import run_bench

    model = None
    if args.model:
        model, _tok = load_model(args.model, dtype=dtype, device=args.device)
        model.generation_config.eos_token_id = None
        for p in params.values():
            if isinstance(p.get("filter_model"), str):
                from tokensieve.core.draft import check_draft, load_draft

                announce_loading(args, p["filter_model"])
                p["filter_model"] = load_draft(p["filter_model"], model)
                check_draft(p["filter_model"], model, _tok)
    methods = {name: {"method": name, **params[name]} for name in args.methods}
    if args.batches is not None:
        from tokensieve.bench.timing import run_batch_bench

        if args.decode_tokens < 1:
            raise InputError(f"--decode-tokens must be >= 1 with --batches, got {args.decode_tokens}")
        res = run_batch_bench(
            args.model or args.shape,
            args.lengths,
            args.batches,
            methods,
            dtype=dtype,
            device=args.device,
            decode_tokens=args.decode_tokens,
            model=model,
        )
        print(format_batch_table(res))
        _write(res, args.out)
        return 0
    res = run_bench(
        args.model or args.shape,
        args.lengths,
        methods,
        dtype=dtype,
        device=args.device,
        repeats=args.repeats,
        decode_tokens=args.decode_tokens,
        model=model,
        answer_tokens=256 if args.answer_tokens is None else args.answer_tokens,
        cold_runs=not args.no_cold_run,
        compile=args.compile,
    )
    print(format_table(res))
    if args.out:
        from tokensieve.evaluation.plots import bench_plot

        _write(res, args.out, plot=bench_plot)
    else:
        _write(res, args.out)
    return 0


def refuse_gpu_shape_on_cpu(shape: str, device: str | None) -> None:
    """``InputError`` for a shape over ``bench.CPU_MAX_PARAMETERS`` parameters when the run would be on the CPU."""
    import torch

    from tokensieve.bench.timing import CPU_MAX_PARAMETERS, shape_parameters
    from tokensieve.core.models import default_device
    from tokensieve.errors import InputError

    if torch.device(device or default_device()).type != "cpu":
        return
    n = shape_parameters(shape)
    if n > CPU_MAX_PARAMETERS:
        small = [s for s in ("tiny", "smollm2-135m") if shape_parameters(s) <= CPU_MAX_PARAMETERS]
        raise InputError(
            f"the {shape} shape ({n / 1e9:.1f}B parameters) is a GPU-sized run and this run is on the CPU; "
            f"use {' or '.join(f'--shape {s}' for s in small)} (or --model PATH), or --force to run it anyway"
        )


def _write(res: dict, out: str | None, plot=None) -> None:
    """Write the sweep's JSON to ``out`` (and ``plot(res, PNG beside it)`` when given)."""
    if not out:
        return
    from tokensieve.bench.timing import save

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(res, str(path))
    if plot is not None:
        plot(res, path.with_suffix(".png"))
    print(f"wrote {path}" + (f" and {path.with_suffix('.png')}" if plot is not None else ""))


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    """``value * scale`` formatted, or "-" where it was not measured (a key missing from an older result too)."""
    return "-" if value is None else format(value * scale, spec)


def format_table(res: dict) -> str:
    bw = res.get("bandwidth_gb_s")
    answer = res.get("answer_tokens")
    lines = [
        f"{'method':>14} {'length':>8} {'TTFT s':>8} {'vs full':>8} {'peak GiB':>9} {'KV GiB':>8} {'kept':>8} {'KV kept':>8} "
        f"{'dec tok/s':>9} {'step ms':>8} {'p90 ms':>8} {'roofline':>8} {'e2e s':>8}"
    ]
    full = {r["length"]: r["ttft_s"] for r in res["rows"] if r["label"] == "full" and r["status"] == "ok"}
    for r in res["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['label']:>14} {r['length']:>8} {r['status'][:60]}")
            continue
        ratio = f"{full[r['length']] / r['ttft_s']:.2f}x" if r["length"] in full else "-"
        lines.append(
            f"{r['label']:>14} {r['length']:>8} {r['ttft_s']:8.3f} {ratio:>8} {r['peak_memory_bytes'] / 2**30:9.2f} "
            f"{(r['kv_bytes_prefill'] or 0) / 2**30:8.3f} {r['kept_tokens'] or '-':>8} {r.get('kv_kept') or '-':>8} "
            f"{_fmt(r['decode_tokens_per_s'], '.1f'):>9} {_fmt(r.get('decode_step_median_s'), '.2f', 1e3):>8} "
            f"{_fmt(r.get('decode_step_p90_s'), '.2f', 1e3):>8} {_fmt(r.get('roofline_fraction'), '.2g'):>8} "
            f"{_fmt(r.get('e2e_s'), '.3f'):>8}"
        )
    if bw:
        lines.append(
            f"roofline: fraction of the floor (weights + KV attended) / {bw:.1f} GB/s copy bandwidth reached by "
            f"the median step" + ("" if res["environment"].get("gpu") else " (CPU: a rough figure)")
        )
    if answer:
        lines.append(f"e2e: TTFT + {answer - 1} decoding steps, a {answer}-token answer")
    return "\n".join(lines)


def format_batch_table(res: dict) -> str:
    lines = [
        f"{'method':>14} {'length':>8} {'batch':>6} {'TTFT s':>8} {'decode tok/s':>13} {'vs batch 1':>10} "
        f"{'e2e tok/s':>10} {'per-row tok/s':>13} {'peak GiB':>9}"
    ]
    for r in res["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['label']:>14} {r['length']:>8} {r['batch']:>6} {r['status'][:60]}")
            continue
        ratio = f"{r['speedup_vs_batch1']:.2f}x" if r["speedup_vs_batch1"] else "-"
        dec = f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] else "-"
        e2e = f"{r['e2e_tokens_per_s']:.1f}" if r["e2e_tokens_per_s"] else "-"
        per = f"{r['per_sequence_tokens_per_s']:.1f}" if r["per_sequence_tokens_per_s"] else "-"
        lines.append(
            f"{r['label']:>14} {r['length']:>8} {r['batch']:>6} {r['ttft_s']:8.3f} {dec:>13} {ratio:>10} "
            f"{e2e:>10} {per:>13} {r['peak_memory_bytes'] / 2**30:9.2f}"
        )
    return "\n".join(lines)
