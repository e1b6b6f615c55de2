"""SepLLM post-training on PG-19: before/after held-out perplexity (full and SepLLM's rule), needle accuracy, KV kept.

Post-trains a model (default SmolLM2-135M-Instruct) under SepLLM's attention mask (``tokensieve.training``) on
the training books and measures, before and after, on the held-out books:

* perplexity under full attention and under SepLLM's rule (the mean next-token loss over ``--eval-windows``
  packed rows of ``--seq-len`` tokens, each computed in one teacher-forced pass: the mask SepLLM's prefill uses);
* the needle-in-a-haystack accuracy of ``full`` and ``sepllm`` at ``--needle-lengths`` x ``--needle-depths``
  (the harness as ``tokensieve eval needle`` runs it; the haystack is the held-out books), and the KV entries
  SepLLM keeps after prefill (mean over layers and prompts, as a share of the prompt).

Books: plain-text files (PG-19: train 10146 15562 2544 25646 3129, held out 40700 54537 860).

CPU smoke run (minutes):

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/sepllm_posttrain.py \\
        --train-books $PG19/{10146,15562,2544,25646,3129}.txt --eval-books $PG19/{40700,54537,860}.txt \\
        --steps 5 --seq-len 512 --eval-windows 4 --needle-lengths 1k --needle-depths 0.5 \\
        --work /tmp/posttrain --out benchmarks/results/training/posttrain_cpu_smoke.json

GPU run (~5 minutes on one H100/H200; the model must be on that machine: --model FOLDER):

    PYTHONPATH=src python benchmarks/sepllm_posttrain.py --model FOLDER --device cuda --dtype bfloat16 \\
        --train-books ... --eval-books ... --steps 600 --seq-len 2048 --batch-size 8 --lr 1e-4 \\
        --work /tmp/posttrain --out $OUT/sepllm_posttrain.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from tokensieve.commands.common import parse_fractions, parse_sizes


def perplexities(model_path: str, args, eval_rows, tag: str) -> dict:
    """Held-out loss/perplexity under SepLLM's rule and under full attention (``trainer.evaluate``)."""
    from tokensieve.core.models import load_model
    from tokensieve.core.separators import separator_token_ids
    from tokensieve.training import TrainConfig, evaluate

    model, tok = load_model(model_path, dtype="float32", device=args.device)
    cfg = TrainConfig(
        model=model_path,
        data=["-"],
        seq_len=args.seq_len,
        batch_size=1,
        mask="sepllm",
        n_initial=args.n_initial,
        n_recent=args.n_recent,
        eval_batches=args.eval_windows,
        dtype=args.dtype or "float32",
    )
    seps = separator_token_ids(tok).to(model.device)
    kernel = "sdpa"
    t0 = time.perf_counter()
    out = evaluate(model, eval_rows, cfg, kernel, seps, str(model.device))
    out["seconds"] = time.perf_counter() - t0
    print(
        f"[{tag}] held-out ppl: full {out['ppl_full']:.3f}, sepllm {out['ppl_mask']:.3f} "
        f"(gap {100 * (out['ppl_mask'] / out['ppl_full'] - 1):+.1f}%)",
        file=sys.stderr,
        flush=True,
    )
    return out


def needle(model_path: str, args, haystack: str, results: Path, tag: str) -> dict:
    from tokensieve.core.models import load_model
    from tokensieve.evaluation.harness import read_results, run_eval
    from tokensieve.evaluation.needle import NeedleTask
    from tokensieve.methods import make_method

    model, tok = load_model(model_path, dtype=args.dtype, device=args.device)
    task = NeedleTask(haystack, args.needle_lengths, args.needle_depths, haystack_name="pg19-heldout")
    methods = [make_method("full"), make_method("sepllm", n_initial=args.n_initial, n_recent=args.n_recent)]
    path = run_eval(model, tok, task, methods, results, model_name=tag, progress=True)
    rows = [r for r in read_results(path) if "error" not in r]
    out: dict = {}
    for name in ("full", "sepllm"):
        mine = [r for r in rows if r["method"] == name]
        if not mine:
            continue
        acc = sum(r["score"] == 1.0 for r in mine) / len(mine)
        kept = [r["kv_tokens_prefill"] / r["prompt_tokens"] for r in mine if r.get("kv_tokens_prefill")]
        out[name] = {
            "accuracy": acc,
            "mean_score": sum(r["score"] for r in mine) / len(mine),
            "prompts": len(mine),
            "kv_kept": sum(kept) / len(kept) if kept else None,
            "answers": [r["answer"] for r in mine],
        }
        print(
            f"[{tag}] needle {name}: accuracy {acc:.2f} over {len(mine)} prompts, KV kept {out[name]['kv_kept']}",
            file=sys.stderr,
            flush=True,
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--train-books", nargs="+", required=True)
    ap.add_argument("--eval-books", nargs="+", required=True)
    ap.add_argument("--steps", type=int, default=5, help="0: measure the model as it is (the training-free gap)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--warmup", type=int, default=None, help="default: steps // 10")
    ap.add_argument("--n-initial", type=int, default=4)
    ap.add_argument("--n-recent", type=int, default=256)
    ap.add_argument("--kernel", default=None, choices=["sdpa", "flex", "flex-mask"])
    ap.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tune; R: a rank-R adapter, merged")
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--lora-targets", default="attn", choices=["attn", "attn+mlp"])
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=None, help="default: steps // 4")
    ap.add_argument("--needle-lengths", type=parse_sizes, default=parse_sizes("1k,2k"))
    ap.add_argument("--needle-depths", type=parse_fractions, default=parse_fractions("0.1,0.3,0.5,0.7,0.9"))
    ap.add_argument("--no-needle", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="training autocast and needle dtype (default float32)")
    ap.add_argument("--work", required=True, help="folder for the trained model and the needle results")
    ap.add_argument("--out", required=True, help="JSON file")
    args = ap.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    from tokensieve.core.models import load_model
    from tokensieve.data import read_document
    from tokensieve.training import TrainConfig, train
    from tokensieve.training.data import pack, text_files, tokenize_files

    work = Path(args.work)
    _, tok = load_model(args.model, device="cpu")
    eval_ids = tokenize_files(text_files(args.eval_books, "--eval-books"), tok, 10**9)
    eval_rows = pack(eval_ids, args.seq_len, "--eval-books")
    # spread the evaluation windows over the held-out books
    pick = torch.linspace(0, eval_rows.shape[0] - 1, min(args.eval_windows, eval_rows.shape[0])).long()
    eval_rows = eval_rows[pick]
    haystack = "\n\n".join(" ".join(read_document(b).split()) for b in args.eval_books)

    result: dict = {
        "argv": sys.argv[1:],
        "model": args.model,
        "device": args.device,
        "machine": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.platform(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "train_books": [Path(b).name for b in args.train_books],
        "eval_books": [Path(b).name for b in args.eval_books],
        "sepllm": {"n_initial": args.n_initial, "n_recent": args.n_recent},
    }
    result["before"] = {"perplexity": perplexities(args.model, args, eval_rows, "before")}
    if not args.no_needle:
        result["before"]["needle"] = needle(args.model, args, haystack, work / "needle_before", "before")

    if args.steps == 0:  # the training-free gap only
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        b = result["before"]["perplexity"]
        result["summary"] = {"ppl_gap_before": b["ppl_mask"] / b["ppl_full"] - 1}
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps(result["summary"]), file=sys.stderr)
        return 0
    cfg = TrainConfig(
        model=args.model,
        out=str(work / "model"),
        data=list(args.train_books),
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        steps=args.steps,
        lr=args.lr,
        warmup=args.steps // 10 if args.warmup is None else args.warmup,
        mask="sepllm",
        n_initial=args.n_initial,
        n_recent=args.n_recent,
        kernel=args.kernel,
        device=args.device,
        dtype=args.dtype or "float32",
        eval_data=list(args.eval_books),
        eval_every=args.eval_every or max(1, args.steps // 4),
        eval_batches=args.eval_windows,
        save_every=max(1, args.steps),
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=args.lora_targets,
    )
    res = train(cfg, progress=True)
    result["training"] = {
        "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": args.lora_targets}
        if args.lora_rank
        else None,
        "trainable_parameters": res.trainable_parameters,
        "steps": res.step,
        "tokens": res.step * args.seq_len * args.batch_size * args.grad_accum,
        "tokens_per_s": res.tokens_per_s,
        "losses": res.losses,
        "evals": res.evals,
    }
    trained = str(work / "model")
    result["after"] = {"perplexity": perplexities(trained, args, eval_rows, "after")}
    if not args.no_needle:
        result["after"]["needle"] = needle(trained, args, haystack, work / "needle_after", "after")
    b, a = result["before"]["perplexity"], result["after"]["perplexity"]
    result["summary"] = {
        "ppl_gap_before": b["ppl_mask"] / b["ppl_full"] - 1,
        "ppl_gap_after": a["ppl_mask"] / a["ppl_full"] - 1,
        "full_ppl_change": a["ppl_full"] / b["ppl_full"] - 1,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
