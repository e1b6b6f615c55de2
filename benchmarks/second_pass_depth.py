"""A target's second pass on the kept tokens, for a model too large for one GPU, from cut-down depths of it.

GemFilter's second pass is a prefill of the model over the kept tokens and its first token. For a target whose
weights do not fit one GPU (the Llama-3.1-70B shape: 131 GiB in bfloat16 against an H100's 79 GiB) this times that
prefill (full attention over ``--tokens`` random tokens, ``tokensieve.bench.bench_method``: median of ``--repeats``
after a cold run) on the same shape with its decoder stack cut to each of ``--layers``. Decoder layers are alike in
shape and cost, so TTFT(L) = a + b * L (a: embedding, final norm, LM head, sampling; b: one layer); a least-squares
fit over the depths gives the whole depth's estimate. ``--check-shape`` (default the Llama-3.1-8B shape, which
fits) checks the method: its depths are fitted the same way without its whole depth, and the estimate is set
against the whole model measured in the same run.

    python benchmarks/second_pass_depth.py --out "$OUT"          # one H100, about two minutes
    python benchmarks/second_pass_depth.py --smoke --out /tmp/s  # tiny shapes on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

GIB = 1 << 30


def bad_input(message: str) -> NoReturn:
    """One line on stderr and exit code 2, as the CLI answers bad input."""
    print(f"second_pass_depth.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_ints(text: str, what: str, lo: int, hi: int) -> list[int]:
    try:
        out = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        bad_input(f"{what} must be comma-separated integers, got {text!r}")
    if len(out) < 2 or not all(lo <= v <= hi for v in out):
        bad_input(f"{what} needs two or more values in [{lo}, {hi}], got {text!r}")
    return out


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares intercept and slope of (layers, seconds)."""
    slope, intercept = statistics.linear_regression([x for x, _ in points], [y for _, y in points])
    return intercept, slope


def time_depth(shape: str, layers: int, tokens: int, repeats: int, device: torch.device, dtype: torch.dtype) -> dict:
    """TTFT of full attention over ``tokens`` on ``shape`` cut to ``layers`` decoder layers (random weights)."""
    from tokensieve.bench.roofline import weights_bytes
    from tokensieve.bench.timing import bench_method, build_model
    from tokensieve.methods import make_method

    model = build_model(shape, dtype, device, seed=0, layers=layers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = asdict(bench_method(model, make_method("full"), tokens, repeats=repeats, decode_tokens=0, cold_run=True))
    weights = weights_bytes(model)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out = {"shape": shape, "layers": layers, "weights_gib": round(weights / GIB, 2)}
    return out | {k: row[k] for k in ("status", "ttft_s", "ttft_runs", "ttft_cold_s", "peak_memory_bytes")}


def main() -> None:
    from tokensieve.bench.timing import SHAPES, environment, shape_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder of second_pass_depth.json (default $OUT)")
    p.add_argument("--shape", default="llama3.1-70b", help="the target's shape (default llama3.1-70b)")
    p.add_argument("--layers", default="10,20,40", help="depths timed (default 10,20,40)")
    p.add_argument("--check-shape", default="llama3.1-8b", help="a shape that fits, to check the fit (default 8B)")
    p.add_argument("--check-layers", default="4,8,16", help="its depths fitted (default 4,8,16; the whole is timed)")
    p.add_argument("--tokens", type=int, default=1024, help="kept tokens: the second pass's prompt (default 1024)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per depth after a cold one (default 5)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script")
    args = p.parse_args()
    if args.smoke:
        args.shape, args.check_shape, args.layers, args.check_layers, args.tokens = "tiny", "tiny", "1,2", "1,2", 64
    for s in (args.shape, args.check_shape):
        if s not in SHAPES:
            bad_input(f"unknown shape {s!r}; expected one of: {', '.join(SHAPES)}")
    if not 1 <= args.tokens <= 1 << 20 or not 1 <= args.repeats <= 20:
        bad_input("--tokens in [1, 1M], --repeats in [1, 20]")
    full_depth = shape_config(args.shape).num_hidden_layers
    check_depth = shape_config(args.check_shape).num_hidden_layers
    layers = parse_ints(args.layers, "--layers", 1, full_depth)
    check_layers = parse_ints(args.check_layers, "--check-layers", 1, check_depth)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = Path(args.out) / "second_pass_depth.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict = {
        "script": "benchmarks/second_pass_depth.py",
        "command": " ".join(sys.argv),
        "tokens": args.tokens,
        "repeats": args.repeats,
        "environment": environment(device),
        "rows": [],
    }

    def run(shape: str, depth: int) -> dict:
        row = time_depth(shape, depth, args.tokens, args.repeats, device, dtype)
        data["rows"].append(row)
        path.write_text(json.dumps(data, indent=1))
        print(f"{shape} {depth} layers: {row['status']} ttft {row['ttft_s']}", flush=True)
        return row

    def estimate(shape: str, depths: list[int], whole: int) -> dict:
        pts = [(r["layers"], r["ttft_s"]) for r in (run(shape, d) for d in depths) if r["status"] == "ok"]
        if len(pts) < 2:
            return {"shape": shape, "status": "too few depths ran"}
        a, b = fit(pts)
        return {"shape": shape, "intercept_s": a, "per_layer_s": b, "layers": whole, "estimate_s": a + b * whole}

    check = estimate(args.check_shape, check_layers, check_depth)
    whole = run(args.check_shape, check_depth)
    if whole["status"] == "ok" and "estimate_s" in check:
        check["measured_s"] = whole["ttft_s"]
        check["estimate_over_measured"] = round(check["estimate_s"] / whole["ttft_s"], 3)
    data["check"] = check
    data["target"] = estimate(args.shape, layers, full_depth)
    path.write_text(json.dumps(data, indent=1))
    print(json.dumps({"check": check, "target": data["target"]}, indent=1))


if __name__ == "__main__":
    main()
