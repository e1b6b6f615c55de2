"""Training speed under SepLLM's mask: forward + backward of each attention kernel at 2k..64k tokens.

Kernels (``tokensieve.training.mask``): ``causal`` (plain causal SDPA, flash: what full-attention training costs),
``sdpa`` (SDPA with the dense n x n boolean SepLLM mask: the reference), ``flex-mask`` (FlexAttention with the
plain n x n block mask) and ``flex`` (FlexAttention over [separators gathered | all keys]: a triangle over the
separators plus the window band). Two levels:

* ``attention``: one attention call of SmolLM2-135M's shape (9 query heads, 3 key/value heads, head dim 64,
  batch 1), random bf16 inputs; the mask is built once (it is shared by every layer of a step) and timed apart.
* ``model``: a whole training step (forward, loss, backward) of a random-weight SmolLM2-135M-shaped Llama (30
  layers) in bf16 under each kernel; tokens/s.

Separators are drawn at random positions at ``--separator-rate`` (0.17: the share of SmolLM2 tokens that are
separators in the PG-19 training books, 0.15-0.25 per book). GPU command (from the repo root, ~3 minutes on one
H100/H200; writes ``$OUT/sepllm_train_bench.json``):

    PYTHONPATH=src python benchmarks/sepllm_train_bench.py --device cuda --out $OUT/sepllm_train_bench.json

CPU (forward only exists for FlexAttention on CPU, so only ``causal`` and ``sdpa`` run; a smoke test):

    PYTHONPATH=src python benchmarks/sepllm_train_bench.py --device cpu --lengths 1k,2k --model-lengths 1k \\
        --kernels causal,sdpa --layers 2 --out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tokensieve.commands.common import parse_sizes
from tokensieve.core.attention import HOOK_KWARG, use_tokensieve_attention
from tokensieve.training.mask import TrainingMask

ALL = ("causal", "sdpa", "flex-mask", "flex")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def is_separator(n: int, rate: float, n_initial: int, seed: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, n, generator=g) < rate).to(device)


class _Module(torch.nn.Module):  # what transformers' attention functions read from the layer
    is_causal = True

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


def attention_row(n: int, kernel: str, args, device: str) -> dict:
    heads, kv_heads, d = 9, 3, 64
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, n, d, device=device, dtype=dtype, generator=g).requires_grad_(True)
    k = torch.randn(1, kv_heads, n, d, device=device, dtype=dtype, generator=g).requires_grad_(True)
    v = torch.randn(1, kv_heads, n, d, device=device, dtype=dtype, generator=g).requires_grad_(True)
    module = _Module(heads // kv_heads)
    sep = is_separator(n, args.separator_rate, args.n_initial, 0, device)
    row = {"level": "attention", "length": n, "kernel": kernel}
    if kernel == "causal":
        from tokensieve.core.attention import sdpa

        def step():
            out, _ = sdpa(module, q, k, v, None, scaling=d**-0.5, dropout=0.0)
            out.sum().backward()
    else:
        ids = torch.zeros(1, n, dtype=torch.long, device=device)
        hook = TrainingMask(ids, torch.tensor([1]), args.n_initial, args.n_recent, kernel)
        hook.is_separator = sep

        def build():
            hook._mask = None
            hook.mask()

        row["mask_ms"] = timed(build, device, 1, 3)

        def step():
            out, _ = hook(module, q, k, v, None, scaling=d**-0.5, dropout=0.0)
            out.sum().backward()

        if kernel == "flex":
            m = hook.mask()
            row["specials_padded"] = m.spec_pos.shape[1]
            row["specials"] = int((m.spec_pos >= 0).sum())
    row["fwd_bwd_ms"] = timed(step, device, args.warmup, args.repeats)
    return row


def model_row(n: int, kernel: str, args, device: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=args.layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=max(8192, n),
        tie_word_embeddings=True,
        rope_theta=100000.0,
    )
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    use_tokensieve_attention(model)
    model.train()
    ids = torch.randint(0, 49152, (1, n), device=device)
    sep_ids = torch.tensor([7], device=device)
    ids[is_separator(n, args.separator_rate, args.n_initial, 0, device)] = 7

    def step():
        extra = {}
        if kernel != "causal":
            extra[HOOK_KWARG] = TrainingMask(ids, sep_ids, args.n_initial, args.n_recent, kernel)
        model(input_ids=ids, labels=ids, use_cache=False, **extra).loss.backward()
        model.zero_grad(set_to_none=True)

    ms = timed(step, device, args.warmup, max(1, args.repeats // 2))
    model = None  # freed before the next cell (step() is not called again)
    return {
        "level": "model",
        "length": n,
        "kernel": kernel,
        "layers": args.layers,
        "step_ms": ms,
        "tokens_per_s": n / (ms / 1000),
    }


def gradient_check(device: str) -> list[dict]:
    """Max |difference| of the logits and of every parameter's gradient between each FlexAttention kernel and the
    dense masked SDPA reference, on tiny float32 models of four families (what tests/training/test_training.py asserts)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    families = {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**common)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**common, sliding_window=None)),
        "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16)),
    }
    ids = torch.randint(3, 96, (2, 300), generator=torch.Generator().manual_seed(0)).to(device)
    seps = torch.tensor([5, 9, 17, 40, 41, 77], device=device)
    rows = []
    for family, build in families.items():
        torch.manual_seed(0)
        model = build().to(device)
        use_tokensieve_attention(model)
        got = {}
        for kernel in ("sdpa", "flex-mask", "flex"):
            model.zero_grad()
            logits = model(input_ids=ids, use_cache=False, **{HOOK_KWARG: TrainingMask(ids, seps, 2, 6, kernel)}).logits
            logits.float().logsumexp(-1).mean().backward()
            got[kernel] = (logits.detach(), [q.grad.clone() for q in model.parameters()])
        for kernel in ("flex-mask", "flex"):
            rows.append(
                {
                    "family": family,
                    "kernel": kernel,
                    "logits_max_abs_diff": float((got[kernel][0] - got["sdpa"][0]).abs().max()),
                    "grad_max_abs_diff": max(
                        float((a - b).abs().max()) for a, b in zip(got[kernel][1], got["sdpa"][1])
                    ),
                    "grad_max_abs": max(float(b.abs().max()) for b in got["sdpa"][1]),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def run(fn, *a) -> dict:
    try:
        return fn(*a)
    except torch.OutOfMemoryError:
        return {"level": fn.__name__.split("_")[0], "length": a[0], "kernel": a[1], "error": "out of memory"}
    except Exception as exc:  # a kernel a device cannot run is recorded, not fatal
        return {
            "level": fn.__name__.split("_")[0],
            "length": a[0],
            "kernel": a[1],
            "error": f"{type(exc).__name__}: {exc}"[:300],
        }
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", type=parse_sizes, default=parse_sizes("2k,4k,8k,16k,32k,64k"))
    ap.add_argument("--model-lengths", type=parse_sizes, default=parse_sizes("2k,4k,8k,16k"))
    ap.add_argument("--kernels", default=",".join(ALL), help=f"comma-separated, any of {', '.join(ALL)}")
    ap.add_argument("--layers", type=int, default=30, help="model level: layers (SmolLM2-135M: 30)")
    ap.add_argument("--n-initial", type=int, default=4)
    ap.add_argument("--n-recent", type=int, default=256)
    ap.add_argument("--separator-rate", type=float, default=0.17)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    kernels = [k for k in args.kernels.split(",") if k]
    bad = [k for k in kernels if k not in ALL]
    if bad or not 0 < args.separator_rate < 1:
        ap.error(f"bad --kernels {bad} or --separator-rate {args.separator_rate}")
    checks = gradient_check(args.device) if args.device.startswith("cuda") else None
    rows = []
    for n in args.lengths:
        for kernel in kernels:
            rows.append(run(attention_row, n, kernel, args, args.device))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for n in args.model_lengths:
        for kernel in kernels:
            rows.append(run(model_row, n, kernel, args, args.device))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "argv": sys.argv[1:],
        "shape": {"heads": 9, "kv_heads": 3, "head_dim": 64, "hidden": 576, "layers": args.layers},
        "n_initial": args.n_initial,
        "n_recent": args.n_recent,
        "separator_rate": args.separator_rate,
        "gradient_check": checks,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
