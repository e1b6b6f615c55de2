"""From scratch: the same small Llama trained with SepLLM's mask and with full attention, same tokens; loss curves.

Both runs use ``tokensieve.training.train`` with the same seed (same initial weights, same batches) and differ
only in ``mask``. Each is evaluated on the held-out books under SepLLM's rule and under full attention every
``--eval-every`` steps. Writes ``<out>.json`` (the two runs' losses and evaluations) and ``<out>.png``.

CPU (the committed result; a few minutes):

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/sepllm_scratch.py \\
        --train-books $PG19/{10146,15562,2544,25646,3129}.txt --eval-books $PG19/{40700,54537,860}.txt \\
        --tokenizer bytes --seq-len 512 --n-recent 64 --steps 120 --eval-every 30 --work /tmp/scratch \
        --out benchmarks/results/training/scratch_cpu_bytes

GPU (~3 minutes; writes $OUT/scratch_gpu.json and .png):

    PYTHONPATH=src python benchmarks/sepllm_scratch.py --train-books ... --eval-books ... --device cuda \\
        --dtype bfloat16 --layers 8 --hidden 512 --heads 8 --seq-len 2048 --n-recent 256 --batch-size 8 \\
        --steps 800 --lr 1e-3 --work /tmp/scratch --out $OUT/scratch_gpu
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--tokenizer",
        default="smollm2",
        help="embedded model or folder whose tokenizer is used; 'bytes': one token per byte",
    )
    ap.add_argument("--train-books", nargs="+", required=True)
    ap.add_argument("--eval-books", nargs="+", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--n-initial", type=int, default=4)
    ap.add_argument("--n-recent", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kernel", default=None)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True, help="path without suffix: <out>.json and <out>.png")
    args = ap.parse_args()

    from tokensieve.training import TrainConfig, train

    if args.tokenizer == "bytes":  # one token per byte: a small vocabulary, fast on a CPU
        from tokensieve.testing import byte_tokenizer

        folder = Path(args.work) / "byte_tokenizer"
        folder.mkdir(parents=True, exist_ok=True)
        byte_tokenizer().save_pretrained(str(folder))
        (folder / "config.json").write_text("{}")  # a model folder's marker; only the tokenizer is read
        args.tokenizer = str(folder)
    runs = {}
    for mask in ("sepllm", "full"):
        cfg = TrainConfig(
            model=args.tokenizer,
            out=str(Path(args.work) / mask),
            data=args.train_books,
            eval_data=args.eval_books,
            from_scratch=True,
            layers=args.layers,
            hidden=args.hidden,
            heads=args.heads,
            kv_heads=args.heads,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            steps=args.steps,
            lr=args.lr,
            warmup=max(1, args.steps // 10),
            mask=mask,
            n_initial=args.n_initial,
            n_recent=args.n_recent,
            kernel=args.kernel,
            device=args.device,
            dtype=args.dtype,
            eval_every=args.eval_every,
            eval_batches=args.eval_batches,
            save_every=args.steps,
            seed=0,
        )
        t0 = time.perf_counter()
        res = train(cfg, progress=True)
        runs[mask] = {
            "losses": res.losses,
            "evals": res.evals,
            "tokens_per_s": res.tokens_per_s,
            "seconds": time.perf_counter() - t0,
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "argv": sys.argv[1:],
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "machine": torch.cuda.get_device_name()
        if torch.cuda.is_available() and (args.device or "").startswith("cuda")
        else platform.platform(),
        "tokens_per_run": args.steps * args.batch_size * args.seq_len,
        "runs": runs,
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for mask, style in (("sepllm", "C0"), ("full", "C1")):
        r = runs[mask]
        a.plot(range(1, len(r["losses"]) + 1), r["losses"], style, alpha=0.8, label=f"trained with {mask}")
        steps = [e["step"] for e in r["evals"]]
        b.plot(steps, [e["loss_mask"] for e in r["evals"]], style, marker="o", label=f"{mask}-trained, SepLLM rule")
        b.plot(steps, [e["loss_full"] for e in r["evals"]], style, marker="x", ls="--", label=f"{mask}-trained, full")
    a.set(xlabel="step", ylabel="training loss", title="training loss (own mask)")
    b.set(xlabel="step", ylabel="held-out loss", title="held-out loss under each rule")
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"from scratch: {args.layers} layers x {args.hidden}, seq {args.seq_len}, "
        f"SepLLM n_initial={args.n_initial} n_recent={args.n_recent}"
    )
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    for mask in runs:
        e = runs[mask]["evals"][-1]
        print(
            f"{mask}-trained: held-out loss {e['loss_mask']:.4f} (SepLLM rule), {e['loss_full']:.4f} (full)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
