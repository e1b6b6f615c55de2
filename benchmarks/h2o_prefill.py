"""H2O's prefill with the fused Triton scoring kernels vs the chunked torch path vs full attention (GPU).

Cells (label x length), token-id prompts on a random-weight model of a real shape:

* ``full``: full-attention prefill.
* ``h2o_kernel``: H2O (``--budget``), scores by ``scoring_kernel``'s fused kernels (``score_kernel="triton"``;
  the prompt's attention by SDPA's flash kernel, whose row log-sum-exp the kernels reuse).
* ``h2o_torch``: the same H2O, scores by the chunked torch path (``score_kernel="torch"``, the former prefill),
  up to ``--torch-max`` tokens (it takes ~49 s at 64k on an H100).

TTFT = prefill including the first token's logits, device-synchronised, median of ``--repeats`` after one
warm-up call per label at ``--warmup-length`` (``gemfilter_local.run_cell``); ``vs_full`` = the cell's TTFT
over full attention's at the same length. Each cell catches its own out-of-memory (status ``oom``) or
error (status ``error`` with the message) and the JSON is rewritten after every cell (an existing file is
extended; cells re-run replace their old row).

Correctness (``check``, at ``--check-length``): (1) the model's prompt scores per layer and KV head, H2O
with a budget above the prompt (nothing evicted, every entry's score kept) by the kernel vs the torch path:
max relative error (``max|kernel - torch| / max|torch|``, and entrywise over entries above 1e-3 of the
row's largest), and how many of the ``--budget`` entries kept per layer and head agree; (2) one layer's
random query and keys of the shape (bfloat16) scored by the kernel and by the torch path, each against the
torch path in float64 (the kernels' own log-sum-exp pass).

One layer's passes (``layers``, unless ``--no-layer-timing``), on random query and keys of the shape at each
length, median of 3 after a warm-up: ``attention`` (SDPA, causal, what full attention runs per layer; its
keys repeated for GQA), ``attention_lse`` (H2O's prompt attention: the flash kernel, keeping the rows'
log-sum-exp), ``scores_kernel`` (both kernels), ``columns_kernel`` (the column-sum kernel alone,
the log-sum-exp given, as in H2O's prefill), ``scores_torch`` (the chunked path, up to ``--torch-max``):
where the time goes, per layer (x 32 layers for the 8B shape).

GPU commands (Llama-3.1-8B shape, bf16, budget 1024):
    python benchmarks/h2o_prefill.py --out $OUT/h2o_prefill.json                      # 8k-128k, all labels
    python benchmarks/h2o_prefill.py --out $OUT/h2o_prefill.json --quick              # 8k and 32k, no 128k torch cell
    python benchmarks/h2o_prefill.py --out $OUT/h2o_prefill.json --lengths 128k --labels h2o_torch   # the slow one alone
(The 128k h2o_torch cell alone should take minutes: 49 s at 64k, quadratic; ``--torch-max 65536`` skips it.)
CPU check (kernels under Triton's interpreter):
    TRITON_INTERPRET=1 python benchmarks/h2o_prefill.py --device cpu --dtype float32 --shape tiny \
        --lengths 256 --check-length 128 --budget 64 --warmup-length 128 --out /tmp/h2o_prefill.json
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
from gemfilter_local import DTYPES, run_cell, sync

from tokensieve.bench.timing import build_model
from tokensieve.commands.common import parse_sizes
from tokensieve.core.scoring import attention_scores, topk_with_recent
from tokensieve.errors import InputError
from tokensieve.methods import H2O, FullAttention

LABELS = ("full", "h2o_kernel", "h2o_torch")
QUICK = dict(lengths=[8192, 32768], torch_max=32768, check_length=4096, warmup_length=2048)


def causal_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention (queries = keys) by SDPA's flash kernel, returning each query row's log-sum-exp too.

    query [b, q_heads, n, d], key/value [b, kv_heads, n, d]. Returns the output as transformers' SDPA
    forward does, [b, n, q_heads, d], and the log-sum-exp of the scaled logits (natural log) [b, q_heads, n],
    float32: the normaliser the score kernels would otherwise compute in a pass of their own. On the CPU
    (the interpreter tests) the flash kernel's CPU twin.
    """
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)  # head h reads KV head h // g
    if query.is_cuda:
        res = torch.ops.aten._scaled_dot_product_flash_attention(query, k, v, 0.0, True, False, scale=scaling)
        out, lse = res[0], res[1]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, k, v, 0.0, True, scale=scaling)
    return out.transpose(1, 2).contiguous(), lse[..., : query.shape[2]].float()


def make(label: str, budget: int) -> FullAttention | H2O:
    if label == "full":
        return FullAttention()
    return H2O(budget=budget, score_kernel="triton" if label == "h2o_kernel" else "torch")


def prompt_scores(model, n: int, kernel: str, device: torch.device) -> list[torch.Tensor]:
    """Every layer's prompt scores [1, kv_heads, n] (H2O with a budget above ``n``: nothing evicted)."""
    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        cache = H2O(budget=n + 1, score_kernel=kernel).prefill(model, ids).cache
    return [cache.scores[i].float() for i in sorted(cache.scores)]


def rel_errors(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """``max|got - ref| / max|ref|``, and the entrywise relative error over entries >= 1e-3 of their row's max."""
    got, ref = got.double(), ref.double()
    diff = (got - ref).abs()
    big = ref.abs() >= 1e-3 * ref.abs().amax(dim=-1, keepdim=True)
    return dict(
        max_rel_err=float(diff.max() / ref.abs().max()), max_entry_rel_err=float((diff[big] / ref.abs()[big]).max())
    )


def check(model, n: int, budget: int, device: torch.device) -> dict[str, Any]:
    """The kernel's scores against the torch path's (model) and against float64 (one random layer)."""
    t0 = time.perf_counter()
    kern, ref = prompt_scores(model, n, "triton", device), prompt_scores(model, n, "torch", device)
    worst: dict[str, float] = {}
    agree = total = 0
    for a, b in zip(kern, ref):
        for k, v in rel_errors(a, b).items():
            worst[k] = max(worst.get(k, 0.0), v)
        if n > budget:  # H2O's keep rule on either score: the same entries?
            ka = topk_with_recent(a, budget, budget // 2)
            kb = topk_with_recent(b, budget, budget // 2)
            agree += sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(ka.flatten(0, 1), kb.flatten(0, 1)))
            total += kb.numel()
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    g = torch.Generator(device=device).manual_seed(2)
    q = torch.randn(1, hq, n, d, generator=g, device=device).to(model.dtype)
    k = torch.randn(1, hkv, n, d, generator=g, device=device).to(model.dtype)
    exact = attention_scores(q.double(), k.double(), d**-0.5, kernel="torch")
    synthetic = {
        "kernel_vs_float64": rel_errors(attention_scores(q, k, d**-0.5, kernel="triton"), exact),
        "torch_vs_float64": rel_errors(attention_scores(q, k, d**-0.5, kernel="torch"), exact),
    }
    return dict(
        length=n,
        layers=len(kern),
        model_kernel_vs_torch=worst,
        kept_agreement=round(agree / total, 6) if total else None,
        budget=budget,
        synthetic_layer=dict(shape=[hq, hkv, n, d], dtype=str(model.dtype)) | synthetic,
        seconds=round(time.perf_counter() - t0, 1),
    )


def timed(fn, device: torch.device, repeats: int = 3) -> float:
    """Median seconds of ``fn()`` (device-synchronised) after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 5)


def layer_timing(model, n: int, device: torch.device, torch_max: int) -> dict[str, Any]:
    """Seconds of one layer's attention and of its score passes at length ``n`` (random q / k / v of the shape)."""
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    g = torch.Generator(device=device).manual_seed(3)
    q, k, v = (torch.randn(1, h, n, d, generator=g, device=device).to(model.dtype) for h in (hq, hkv, hkv))
    s, rep = d**-0.5, hq // hkv
    out: dict[str, Any] = dict(length=n)
    cells = {
        "attention_s": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True, scale=s
        ),
        "attention_lse_s": lambda: causal_attention_with_lse(q, k, v, s),  # H2O's prompt attention
        "scores_kernel_s": lambda: attention_scores(q, k, s, kernel="triton"),
        "columns_kernel_s": lambda: attention_scores(q, k, s, kernel="triton", row_lse=row_lse),
    }
    if n <= torch_max:
        cells["scores_torch_s"] = lambda: attention_scores(q, k, s, kernel="torch")
    row_lse = None
    for name, fn in cells.items():
        try:
            if name == "columns_kernel_s":
                row_lse = causal_attention_with_lse(q, k, v, s)[1]
            out[name] = timed(fn, device)
        except torch.OutOfMemoryError:
            out[name] = "oom"
        except Exception as e:  # noqa: BLE001 - recorded, the other passes still run
            out[name] = f"error: {type(e).__name__}: {e}"[:300]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--lengths", type=parse_sizes, default=None, help="default 8k,32k,64k,128k (--quick: 8k,32k)")
    ap.add_argument("--labels", default=",".join(LABELS))
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument(
        "--torch-max", type=int, default=None, help="longest prompt for h2o_torch (default 131072; --quick: 32768)"
    )
    ap.add_argument(
        "--check-length",
        type=int,
        default=None,
        help="prompt length of the correctness check (default 8192; --quick: 4096; 0 skips it)",
    )
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup-length", type=int, default=None, help="default 4096 (--quick: 2048)")
    ap.add_argument("--no-layer-timing", action="store_true", help="skip the one-layer pass timings")
    ap.add_argument("--quick", action="store_true", help="8k and 32k, a 4k check: a few minutes on an H100")
    ap.add_argument("--out", default="benchmarks/results/gpu/h2o_prefill_kernel.json")
    args = ap.parse_args(argv)
    defaults = (
        QUICK
        if args.quick
        else dict(lengths=[8192, 32768, 65536, 131072], torch_max=131072, check_length=8192, warmup_length=4096)
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    bad = [x for x in labels if x not in LABELS]
    if bad:
        raise InputError(f"unknown labels {bad}; expected some of {LABELS}")
    if args.budget < 1:
        raise InputError(f"--budget must be an integer >= 1, got {args.budget}")
    device = torch.device(args.device)

    t0 = time.perf_counter()
    model = build_model(args.shape, DTYPES[args.dtype], device)
    out = Path(args.out)
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"rows": []}
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("lengths", "labels", "out")}
    result["build_s"] = round(time.perf_counter() - t0, 1)
    if device.type == "cuda":
        result["device"] = torch.cuda.get_device_name(device)
    result["versions"] = {"torch": torch.__version__}
    try:
        import triton

        result["versions"]["triton"] = triton.__version__
    except ImportError:
        result["versions"]["triton"] = None
    rows: list[dict[str, Any]] = result["rows"]

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))

    def free() -> None:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.check_length:
        try:
            result["check"] = check(model, args.check_length, args.budget, device)
        except torch.OutOfMemoryError:
            result["check"] = dict(length=args.check_length, status="oom")
        except Exception as e:  # noqa: BLE001 - recorded, the timing cells still run
            result["check"] = dict(length=args.check_length, status="error", error=f"{type(e).__name__}: {e}")
        save()
        print(f"check: {json.dumps(result['check'])}", flush=True)
        free()

    if not args.no_layer_timing:
        layers = result.setdefault("layers", [])
        for n in args.lengths:
            row = layer_timing(model, n, device, args.torch_max)
            layers[:] = [r for r in layers if r.get("length") != n] + [row]
            save()
            print(f"layer: {json.dumps(row)}", flush=True)
            free()

    for label in labels:  # warm-up: kernels compiled, allocator
        try:
            run_cell(model, make(label, args.budget), max(args.warmup_length, args.budget + 1), device, 1)
        except Exception as e:  # noqa: BLE001 - the cells of this label will record it
            print(f"warm-up {label}: {type(e).__name__}: {e}", flush=True)
        free()
    for n in args.lengths:
        for label in labels:
            if label == "h2o_torch" and n > args.torch_max:
                continue
            key = dict(label=label, length=n, shape=args.shape, budget=None if label == "full" else args.budget)
            try:
                row = key | dict(status="ok") | run_cell(model, make(label, args.budget), n, device, args.repeats)
            except torch.OutOfMemoryError:
                row = key | dict(status="oom", ttft_s=None)
            except Exception as e:  # noqa: BLE001 - one broken cell must not lose the others
                row = key | dict(status="error", ttft_s=None, error=f"{type(e).__name__}: {e}"[:500])
            full = next(
                (
                    r
                    for r in rows
                    if r["label"] == "full"
                    and r["length"] == n
                    and r.get("shape") == args.shape
                    and r.get("status") == "ok"
                ),
                None,
            )
            if label != "full" and full and row.get("ttft_s"):
                row["vs_full"] = round(row["ttft_s"] / full["ttft_s"], 3)
            rows[:] = [r for r in rows if {k: r.get(k) for k in key} != key] + [row]
            save()
            print(
                f"{label:>11} {n:>7} {row['status']:>5} ttft {row.get('ttft_s')} s vs full {row.get('vs_full')} "
                f"peak {row.get('peak_gib')} GiB {row.get('error', '')}",
                flush=True,
            )
            free()
    print(f"\n{'label':>11} {'length':>7} {'TTFT s':>9} {'vs full':>8} {'peak GiB':>9}")
    for r in sorted(rows, key=lambda r: (r["length"], LABELS.index(r["label"]))):
        print(
            f"{r['label']:>11} {r['length']:>7} {str(r.get('ttft_s')):>9} {str(r.get('vs_full', '')):>8} "
            f"{str(r.get('peak_gib')):>9}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
