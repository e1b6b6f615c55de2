"""Decode speed on the GPU: eager (DynamicCache, one launch per op) vs static buffers + captured CUDA graph.

For each method and prompt length, in one process on one model (random weights in a real shape):

* eager: ``generate(..., decode="eager")`` for ``--check-steps`` tokens;
* graph: ``generate(..., decode="static")`` for ``--tokens`` tokens (the end-to-end answer), its capture
  made beforehand in a warm-up call with the same pool (``capture_s`` reported apart);
* tokens: the first ``--check-steps`` tokens of both paths compared;
* roofline: a step must read the weights and the KV entries it attends to once; bytes / the device copy
  bandwidth measured in this run (a large device-to-device copy, bytes read + written) is the floor, and
  ``floor / median step`` the fraction reached (the rules live in ``tokensieve.bench.roofline``, shared with
  ``tokensieve bench``);
* transformers' own ``model.generate`` (dynamic cache, SDPA) per-token time at each length, same run.

Writes one JSON (``--out``) and prints a table. Usage (on the GPU machine):
``PYTHONPATH=src python3 benchmarks/decode_bench.py --lengths 32768,131072 --out $OUT/decode.json``

``--attention-kernel torch,triton`` runs the static (graph) rows once per attention path of the decode step
(``StaticDecoder.attention_kernel``; default ``auto`` alone) in the same process, each with its own decoder pool:
one row per method, length and kernel, labelled ``attention_kernel`` (asked) and ``attention_path`` (what ran);
the eager figures are measured once and repeated in each kernel's row. CPU smoke run:
``PYTHONPATH=src python3 benchmarks/decode_bench.py --shape tiny --device cpu --lengths 512 --methods full,streamingllm --tokens 8 --check-steps 4 --attention-kernel torch --out /tmp/d.json``

``--batches 1,4,16`` measures batch throughput instead (``tokensieve.bench.timing.run_batch_bench``): per method,
length and batch size, ``batch`` prompts answered together with ``--tokens`` tokens each; decode tokens/s
of the batch and its ratio to batch 1. Runs on the CPU too (``--shape tiny --device cpu``):
``PYTHONPATH=src python3 benchmarks/decode_bench.py --batches 1,4,16 --lengths 8192 --methods full,gemfilter --out $OUT/batch_8k.json``
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from tokensieve.bench.roofline import copy_bandwidth, decode_step_bytes, median, p90, roofline_step_s, weights_bytes
from tokensieve.bench.timing import _IdTokenizer, build_model, environment
from tokensieve.decode.slots import SlotState
from tokensieve.decode.static import ATTENTION_KERNELS, DecoderPool, StaticDecoder, bucket
from tokensieve.engine.runner import generate
from tokensieve.errors import InputError
from tokensieve.methods import make_method
from tokensieve.methods.base import cache_stats

METHODS = {
    "full": {},
    "gemfilter": {"topk": 1024, "filter_layer": 13},
    "snapkv": {"budget": 1024},
    "streamingllm": {"budget": 1024, "n_initial": 4},
    "h2o": {"budget": 1024},
    "sepllm": {
        "n_initial": 4,
        "n_recent": 256,
        "separator_ids": (13, 11, 627, 198),
    },  # 4 ids as separators (rare in random prompts)
    "lazyllm": {},
}  # the default schedule
# LazyLLM's counters: how many steps the fixed-shape (captured) step answered, how many re-ran for revivals
LAZY_DETAILS = (
    "decode_fixed_shape_steps",
    "decode_revival_reruns",
    "revived_kv_computations",
    "prompt_computed_pct_total",
)


def params_for(name: str, shape: str) -> dict:
    """``METHODS[name]`` fitted to a shape: small shapes (``tiny``) have fewer layers than GemFilter's filter layer
    and fewer ids than SepLLM's separators; what does not fit is dropped (the method's default)."""
    from tokensieve.bench.timing import SHAPES

    cfg = SHAPES[shape]
    params = {k: v for k, v in METHODS[name].items() if not (k == "filter_layer" and v >= cfg["num_hidden_layers"])}
    if "separator_ids" in params:
        params["separator_ids"] = tuple(i for i in params["separator_ids"] if i < cfg["vocab_size"])
    return params


class RecordingPool(DecoderPool):
    """A decoder pool that remembers the decoder it handed out last (the row's attention path is read from it)."""

    last: StaticDecoder | None = None

    def get(self, batch: int, entries: int, slots: type[SlotState] = SlotState) -> tuple[StaticDecoder, bool]:
        dec, made = super().get(batch, entries, slots)
        self.last = dec
        return dec, made

    def get_own(self, kind, entries: int, make):  # a method's own decoder (LazyLLM's)
        dec, made = super().get_own(kind, entries, make)
        self.last = dec
        return dec, made


def free_memory(dev: torch.device) -> None:
    """Drop the last run's tensors before the next one (the GPU's cached blocks too)."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


@torch.inference_mode()
def first_step_error(model, ids: torch.Tensor, name: str, params: dict, kernel: str = "auto") -> tuple[float, bool]:
    """Relative error ||static - eager|| / ||eager|| of the logits of the first decoding step from one prefill."""
    m = make_method(name, **params)
    state = m.prefill(model, ids.to(model.device))
    token = state.logits.argmax(-1, keepdim=True)
    dec = StaticDecoder(model, bucket(max(cache_stats(state.cache)[0]) + 1), use_graph=False, attention_kernel=kernel)
    dec.load(state.cache, state.next_position, 1)
    a = dec.step(token).float().clone()
    b = m.step(model, state, token).float()
    del dec, state
    return float((a - b).norm() / b.norm()), bool(a.argmax() == b.argmax())


def hf_generate_per_token(model, ids: torch.Tensor, steps: int) -> float:
    """Seconds per decoded token of transformers' generate (dynamic cache, SDPA attention)."""
    model.set_attn_implementation("sdpa")
    try:

        def run(n: int) -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        run(2)
        return (run(steps + 1) - run(1)) / steps
    finally:
        from tokensieve.core.attention import use_tokensieve_attention

        use_tokensieve_attention(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tokens", type=int, default=256, help="answer length for end-to-end latency")
    ap.add_argument("--check-steps", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--compile", action="store_true", help="fuse the captured step with torch.compile first")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager path (and the token comparison)")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the first-step logits comparison")
    ap.add_argument("--batches", default=None, help="batch throughput at these batch sizes, e.g. 1,4,16")
    ap.add_argument(
        "--attention-kernel",
        default="auto",
        help="the static step's attention, one run each: comma-separated of " + ", ".join(ATTENTION_KERNELS),
    )
    ap.add_argument("--device", default=None, help="default: cuda when available (--batches also runs on cpu)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument(
        "--require-identical",
        action="store_true",
        help="exit 1 unless every row's static tokens equal the eager path's for all --check-steps steps",
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kernels = args.attention_kernel.split(",")
    if bad := [k for k in kernels if k not in ATTENTION_KERNELS]:
        ap.error(f"--attention-kernel takes {', '.join(ATTENTION_KERNELS)}, got {', '.join(bad)}")
    if args.batches:
        return batch_main(args, dev)
    model = build_model(args.shape, getattr(torch, args.dtype), dev)
    weights = weights_bytes(model)
    cfg = model.config
    bw = copy_bandwidth(dev, gib=4.0 if dev.type == "cuda" else None)
    tok = _IdTokenizer()
    pools = {k: RecordingPool(model, compile=args.compile, attention_kernel=k) for k in kernels}
    out = {
        "shape": args.shape,
        "environment": environment(dev),
        "weights_bytes": weights,
        "copy_bandwidth_Bps": bw,
        "kv_bytes_per_entry": None,
        "compile": args.compile,
        "attention_kernels": kernels,
        "tokens": args.tokens,
        "check_steps": args.check_steps,
        "dtype": args.dtype,
        "rows": [],
    }
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, weights {weights / 2**30:.1f} GiB", flush=True)
    # warm-up (kernels, cuBLAS, allocator) at a small length
    warm = torch.randint(0, cfg.vocab_size, (1, 2048), generator=torch.Generator().manual_seed(0))
    for name in args.methods.split(","):
        generate(
            model, tok, warm, name, max_new_tokens=4, decode="eager", allow_long=True, **params_for(name, args.shape)
        )
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        for name in args.methods.split(","):
            try:
                eager = (
                    None
                    if args.no_eager
                    else generate(
                        model,
                        tok,
                        ids,
                        name,
                        max_new_tokens=args.check_steps + 1,
                        decode="eager",
                        allow_long=True,
                        **params_for(name, args.shape),
                    )
                )
            except torch.OutOfMemoryError:
                eager = "oom"
            free_memory(dev)
            for kernel in kernels:
                row = {"method": name, "length": n, "params": params_for(name, args.shape), "attention_kernel": kernel}
                try:
                    if eager == "oom":
                        raise torch.OutOfMemoryError("eager path")
                    row |= static_row(args, model, tok, ids, name, pools[kernel], eager, weights, bw, kernel, out)
                except torch.OutOfMemoryError:
                    row["status"] = "oom"
                    print(f"{name:>10} {n:>7} [{kernel}]: out of memory", flush=True)
                except InputError as e:  # e.g. attention_kernel="triton" for H2O's eviction
                    row["status"] = f"refused: {e}"
                    print(f"{name:>10} {n:>7} [{kernel}]: {e}", flush=True)
                out["rows"].append(row)
                if len(kernels) > 1:  # one kernel's buffers at a time (two 128k decoders do not fit beside the weights)
                    pools[kernel].decoders.clear()
                free_memory(dev)
                with open(args.out, "w") as f:
                    json.dump(out, f, indent=1)
        if not args.no_hf and dev.type == "cuda":
            try:
                per = hf_generate_per_token(model, ids.to(dev), 32)
                out["rows"].append({"method": "transformers.generate", "length": n, "status": "ok", "step_mean_s": per})
                print(f"transformers.generate {n}: {per * 1e3:.1f} ms/token", flush=True)
            except torch.OutOfMemoryError:
                out["rows"].append({"method": "transformers.generate", "length": n, "status": "oom"})
            gc.collect()
            torch.cuda.empty_cache()
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)

    if args.require_identical:
        differ = [
            f"{r['method']} {r['length']} [{r.get('attention_kernel')}]: {r['tokens_identical_prefix']}/{r['tokens_compared']}"
            for r in out["rows"]
            if r.get("status") == "ok"
            and r.get("tokens_compared")
            and r["tokens_identical_prefix"] != r["tokens_compared"]
        ]
        compared = sum(1 for r in out["rows"] if r.get("status") == "ok" and r.get("tokens_compared"))
        print(f"identical tokens eager vs static: {compared - len(differ)}/{compared} rows", flush=True)
        if differ or not compared:
            raise SystemExit("tokens differ: " + "; ".join(differ) if differ else "no row compared tokens")


def static_row(
    args: argparse.Namespace,
    model,
    tok,
    ids: torch.Tensor,
    name: str,
    pool: RecordingPool,
    eager,
    weights: int,
    bw: float,
    kernel: str,
    out: dict,
) -> dict:
    """The static (graph) figures of one method and length with one pool (one attention kernel), against ``eager``."""
    dev, params = model.device, params_for(name, args.shape)
    # first static call: captures the graph for this capacity bucket (reported, not timed as decode)
    first = generate(
        model, tok, ids, name, max_new_tokens=args.tokens, decode="static", decoders=pool, allow_long=True, **params
    )
    free_memory(dev)
    graph = generate(
        model, tok, ids, name, max_new_tokens=args.tokens, decode="static", decoders=pool, allow_long=True, **params
    )
    path = pool.last.kernel if pool.last is not None else None
    kept = graph.kv_tokens_prefill[0]
    steps_g, steps_e = graph.step_times_s, (eager.step_times_s if eager else [float("nan")])
    med_g, med_e = median(steps_g), median(steps_e)
    # one prompt position's keys and values over all layers, from the cache itself
    out["kv_bytes_per_entry"] = graph.kv_bytes_prefill // kept
    per_step = (graph.kv_bytes_final - graph.kv_bytes_prefill) / len(steps_g)
    floor = roofline_step_s(decode_step_bytes(weights, graph.kv_bytes_prefill, per_step, len(steps_g)), bw)
    pairs = list(zip(eager.token_ids, graph.token_ids)) if eager else []
    same = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))  # identical prefix
    free_memory(dev)
    skip = args.no_accuracy or name == "lazyllm"  # (LazyLLM has its own decoder: compared by tokens)
    err, top1 = (float("nan"), None) if skip else first_step_error(model, ids, name, params, kernel)
    row = {
        "status": "ok",
        "decode_path": graph.details["decode_path"],
        "attention_path": path,
        "kept_entries": kept,
        "ttft_s": graph.ttft_s,
        "capture_s": first.details["capture_s"],
        "eager_step_median_s": med_e,
        "eager_step_p90_s": p90(steps_e),
        "graph_step_median_s": med_g,
        "graph_step_p90_s": p90(steps_g),
        "roofline_step_s": floor,
        "roofline_fraction": floor / med_g,
        "eager_roofline_fraction": floor / med_e,
        "e2e_s": graph.ttft_s + sum(steps_g),
        "e2e_eager_estimate_s": eager.ttft_s + med_e * (args.tokens - 1) if eager else None,
        "tokens_identical_prefix": same,
        "tokens_compared": len(pairs),
        "first_step_logits_rel_error": err,
        "first_step_top1_agrees": top1,
        "peak_memory_bytes": graph.peak_memory_bytes,
        "details": {k: graph.details[k] for k in LAZY_DETAILS if k in graph.details},
    }
    print(
        f"{name:>10} {ids.shape[1]:>7} [{kernel}->{path}]: ttft {graph.ttft_s:.3f}s  eager {med_e * 1e3:.1f} ms  "
        f"graph {med_g * 1e3:.2f} ms (p90 {p90(steps_g) * 1e3:.2f}, roofline {floor * 1e3:.2f} ms = {floor / med_g:.2f})  "
        f"e2e {row['e2e_s']:.2f}s  capture {row['capture_s']:.2f}s  same prefix {same}/{len(pairs)}  "
        f"step-1 logits rel err {err:.1e} top1 {top1}",
        flush=True,
    )
    return row


def batch_main(args: argparse.Namespace, dev: torch.device) -> None:
    from tokensieve.bench.timing import run_batch_bench
    from tokensieve.commands.bench import format_batch_table

    methods = {name: {"method": name, **params_for(name, args.shape)} for name in args.methods.split(",")}
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    res = run_batch_bench(
        args.shape,
        [int(x) for x in args.lengths.split(",")],
        [int(x) for x in args.batches.split(",")],
        methods,
        dtype=dtype,
        device=str(dev),
        decode_tokens=args.tokens,
        on_row=lambda rows: print(
            f"  {rows[-1]['label']} {rows[-1]['length']} x{rows[-1]['batch']}: "
            f"{rows[-1]['status']} {rows[-1]['decode_tokens_per_s']}",
            flush=True,
        ),
    )
    print(format_batch_table(res))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
