"""Plots of the SepLLM training evidence (issue: SepLLM, the rest of the paper), from the committed JSON:

    PYTHONPATH=src python3 benchmarks/training_plots.py benchmarks/results/gpu/training_h100

writes ``posttrain_curves.png`` (held-out perplexity under full attention and under SepLLM's rule during
post-training) and ``kernel_speed.png`` (forward + backward time of the training kernels per length) beside the
JSON files ``posttrain_smollm2_gpu.json`` and ``sepllm_train_bench.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="folder with posttrain_smollm2_gpu.json and sepllm_train_bench.json")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    post = json.loads((args.folder / "posttrain_smollm2_gpu.json").read_text())
    evals = post["training"]["evals"]
    steps = [e["step"] for e in evals]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [e["ppl_full"] for e in evals], "o-", label="evaluated under full attention")
    ax.plot(steps, [e["ppl_mask"] for e in evals], "s-", label="evaluated under SepLLM's rule")
    ax.set_xlabel("post-training step (batch 4 x 2048 tokens, trained under SepLLM's rule)")
    ax.set_ylabel("held-out perplexity (PG-19, 3 books)")
    ax.set_title(f"SmolLM2-135M post-training ({post['machine']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.folder / "posttrain_curves.png", dpi=120)

    bench = json.loads((args.folder / "sepllm_train_bench.json").read_text())
    rows = [r for r in bench["rows"] if r["level"] == "attention"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kernel, mark in (("causal", "k--"), ("sdpa", "o-"), ("flex-mask", "^-"), ("flex", "s-")):
        pts = sorted((r["length"], r["fwd_bwd_ms"]) for r in rows if r["kernel"] == kernel)
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                mark,
                label=kernel + (" (no mask)" if kernel == "causal" else ""),
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("attention forward + backward (ms)")
    ax.set_title(f"SepLLM training mask, one layer of SmolLM2's shape ({bench['device']})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.folder / "kernel_speed.png", dpi=120)
    print(f"wrote {args.folder / 'posttrain_curves.png'} and {args.folder / 'kernel_speed.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
