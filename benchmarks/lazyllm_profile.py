"""Where a LazyLLM decoding step spends its time: the eager step, the fixed-shape (captured) step, the re-run step.

One process, random weights in a real shape (time does not depend on weight values). For each prompt length:

1. ``LazyLLM.step`` (the eager path: a ``DynamicCache``, a layer loop planned on the host): ``--steps`` steps
   timed, then one step under ``torch.profiler``;
2. the same prefill loaded into ``tokensieve.methods.lazyllm.LazyDecoder`` (a slot per token, the fixed-shape step
   captured as a CUDA graph, re-run on the host-planned path where a token comes back from the aux cache):
   ``--steps`` steps timed, each labelled replay or re-run, then one of each under the profiler where both occur.

Writes one JSON (``--out``): per length and path the step times (median, p90, per step), and per profile the
operators with the most self CPU and self device time, the number of device kernels and the wall time.
Usage on the GPU machine: ``PYTHONPATH=src python3 benchmarks/lazyllm_profile.py --lengths 8192,32768 --out $OUT/lazyllm_profile.json``
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tokensieve.bench.roofline import median, p90
from tokensieve.bench.timing import build_model, environment
from tokensieve.decode.static import bucket
from tokensieve.methods import make_method
from tokensieve.methods.lazyllm import LazyDecoder


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def top_ops(prof, key: str, n: int = 15) -> list[dict]:
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]:
        rows.append(
            {
                "name": e.key,
                "count": e.count,
                "self_cpu_ms": e.self_cpu_time_total / 1e3,
                "self_device_ms": getattr(e, "self_device_time_total", 0.0) / 1e3,
            }
        )
    return rows


def profiled(fn) -> dict:
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        sync()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    device_total = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1e3
    kernels = sum(
        e.count
        for e in events
        if getattr(e, "device_type", None) is not None
        and str(e.device_type).endswith("CUDA")
        and getattr(e, "self_device_time_total", 0) > 0
    )
    return {
        "wall_ms_profiled": wall * 1e3,
        "device_ms": device_total,
        "device_ops": kernels,
        "cpu_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
        "by_cpu": top_ops(prof, "self_cpu_time_total"),
        "by_device": top_ops(prof, "self_device_time_total"),
    }


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--steps", type=int, default=64, help="timed steps per path")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args.shape, torch.bfloat16 if dev.type == "cuda" else torch.float32, dev)
    method = make_method("lazyllm")
    out = {"shape": args.shape, "environment": environment(dev), "steps": args.steps, "rows": []}
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(dev)
        row: dict = {"length": n}
        # 1. the eager step
        state = method.prefill(model, ids)
        token = state.logits.argmax(-1, keepdim=True)
        times = []
        for _ in range(args.steps):
            times.append(timed(lambda: method.step(model, state, token)))
            token = state.logits.argmax(-1, keepdim=True)
        row["eager"] = {
            "step_median_s": median(times),
            "step_p90_s": p90(times),
            "steps_s": times,
            "revived_kv_computations": state.revived_computations,
            "profile": profiled(lambda: method.step(model, state, token)),
        }
        state = None
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        # 2. the static decoder
        state = method.prefill(model, ids)
        token = state.logits.argmax(-1, keepdim=True)
        dec = LazyDecoder(model, bucket(n + 2 * args.steps + 4), tuple(state.details["prune_layers"]))
        dec.capture()
        dec.load(state, 2 * args.steps + 4, tuple(state.details["keep_fractions"]))
        state = None
        times, kinds = [], []
        for _ in range(args.steps):
            before, got = dec.reruns, []
            times.append(timed(lambda: got.append(dec.step(token))))
            token = got[0].argmax(-1, keepdim=True)
            kinds.append("rerun" if dec.reruns > before else "replay")
        replay = [t for t, k in zip(times, kinds) if k == "replay"]
        rerun = [t for t, k in zip(times, kinds) if k == "rerun"]
        row["static"] = {
            "step_median_s": median(times),
            "step_p90_s": p90(times),
            "steps_s": times,
            "kinds": kinds,
            "replay_median_s": median(replay) if replay else None,
            "rerun_median_s": median(rerun) if rerun else None,
            "capture_s": dec.capture_s,
            "details": dec.details(),
        }
        profiles = {}
        for _ in range(8):  # profile one step of each kind that occurs
            before = dec.reruns
            got = []
            prof = profiled(lambda: got.append(dec.step(token)))
            token = got[0].argmax(-1, keepdim=True)
            profiles.setdefault("rerun" if dec.reruns > before else "replay", prof)
            if len(profiles) == 2:
                break
        row["static"]["profiles"] = profiles
        out["rows"].append(row)
        print(
            f"{n}: eager {median(row['eager']['steps_s']) * 1e3:.1f} ms; static {row['static']['step_median_s'] * 1e3:.1f} ms "
            f"(replay {len(replay)} x {1e3 * (median(replay) if replay else float('nan')):.1f} ms, "
            f"rerun {len(rerun)} x {1e3 * (median(rerun) if rerun else float('nan')):.1f} ms)",
            flush=True,
        )
        dec = None
        gc.collect()
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
