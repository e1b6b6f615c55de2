"""`tokensieve train`: post-train a model (or train one from scratch) under SepLLM's attention rule."""

from __future__ import annotations

import argparse
import sys

from tokensieve.commands.common import (
    add_dtype_device_args,
    add_text_args,
    non_negative_int,
    parse_size,
    positive_int,
    print_json,
)

# The trainer's choices, here so that building the parser imports no torch (a test keeps them equal).
MASK_CHOICES = ("sepllm", "full")
KERNEL_CHOICES = ("flex", "flex-mask", "sdpa")
LORA_TARGET_CHOICES = ("attn", "attn+mlp")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        description=(
            "Train a causal LM under SepLLM's attention rule (every token sees the first --n-initial tokens, the "
            "separators before it and its --n-recent neighbours; separators from the tokenizer, as the sepllm "
            "method uses at inference), or under full attention (--mask full) as the control. Post-trains --model "
            "(full fine-tune, or a low-rank adapter with --lora-rank, merged into the saved model) or, with --from-scratch, a new Llama-style model of --layers x --hidden with "
            "--model's tokenizer. Text files are tokenized and packed into rows of --seq-len tokens. Writes OUT/ "
            "(the model, loadable with --model OUT by every command), OUT/checkpoint/ (resume with --resume OUT; "
            "also written on Ctrl-C) and OUT/log.jsonl (loss, tokens/s, held-out loss under the mask and under "
            "full attention)."
        ),
    )
    p.add_argument(
        "--model",
        default="smollm2",
        help="embedded name or model folder to post-train; with --from-scratch, "
        "the tokenizer's source (default: smollm2)",
    )
    p.add_argument(
        "--data", nargs="+", default=None, metavar="PATH", help="training text files or folders of .txt files"
    )
    p.add_argument(
        "--eval-data",
        nargs="+",
        default=[],
        metavar="PATH",
        help="held-out text files or folders (default: no evaluation)",
    )
    p.add_argument("--out", default=None, help="output folder (required unless --resume)")
    p.add_argument(
        "--resume",
        default=None,
        metavar="OUT",
        help="continue the run in OUT from its checkpoint, with its saved settings (only --steps may change)",
    )
    g = p.add_argument_group("from scratch")
    g.add_argument("--from-scratch", action="store_true", help="train a new model instead of post-training --model")
    g.add_argument("--layers", type=positive_int, default=4, help="layers (default 4, at most 128)")
    g.add_argument("--hidden", type=positive_int, default=256, help="hidden size (default 256, at most 16384)")
    g.add_argument("--heads", type=positive_int, default=4, help="attention heads (default 4)")
    g.add_argument("--kv-heads", type=positive_int, default=None, help="key/value heads (default: --heads)")
    g.add_argument("--intermediate", type=non_negative_int, default=0, help="MLP width (default 0: 4 x hidden)")
    t = p.add_argument_group("optimisation")
    t.add_argument(
        "--seq-len", type=parse_size, default=1024, help="tokens per packed row (default 1024, at most 128k)"
    )
    t.add_argument("--batch-size", type=positive_int, default=1, help="rows per micro-batch (default 1, at most 1024)")
    t.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step (default 1)")
    t.add_argument(
        "--steps", type=positive_int, default=None, help="optimizer steps (default 100; with --resume: a new total)"
    )
    t.add_argument("--lr", type=_float, default=1e-4, help="peak learning rate, in (0, 1] (default 1e-4)")
    t.add_argument(
        "--warmup", type=non_negative_int, default=10, help="linear warmup steps, then cosine to lr/10 (default 10)"
    )
    t.add_argument("--weight-decay", type=_float, default=0.0, help="AdamW weight decay, in [0, 1] (default 0)")
    t.add_argument("--max-grad-norm", type=_float, default=1.0, help="gradient clipping norm (default 1.0; 0: none)")
    t.add_argument("--seed", type=non_negative_int, default=0, help="data order and from-scratch weights (default 0)")
    t.add_argument(
        "--max-tokens", type=parse_size, default=50_000_000, help="read at most this many training tokens (default 50M)"
    )
    s = p.add_argument_group("attention")
    s.add_argument("--mask", choices=MASK_CHOICES, default="sepllm", help="sepllm (default) or full (plain causal)")
    s.add_argument(
        "--n-initial", type=non_negative_int, default=4, help="SepLLM: initial tokens every token sees (default 4)"
    )
    s.add_argument(
        "--n-recent",
        type=non_negative_int,
        default=256,
        help="SepLLM: preceding neighbours every token sees (default 256)",
    )
    s.add_argument("--include-space", action="store_true", help="SepLLM: count a lone space token as a separator")
    s.add_argument(
        "--kernel",
        choices=KERNEL_CHOICES,
        default=None,
        help="flex (FlexAttention over the gathered separators + the window band, GPU), flex-mask (FlexAttention, "
        "plain n x n block mask, GPU) or sdpa (dense boolean mask) (default: flex on CUDA for --seq-len >= 16384, "
        "else sdpa: the faster of the two where measured)",
    )
    a = p.add_argument_group("low-rank adapter (LoRA, post-training only)")
    a.add_argument(
        "--lora-rank",
        type=non_negative_int,
        default=0,
        help="train a rank-R adapter on frozen weights instead of every weight (default 0: full fine-tune; 1..1024)",
    )
    a.add_argument(
        "--lora-alpha", type=_float, default=16.0, help="adapter scale alpha / rank, alpha in (0, 65536] (default 16)"
    )
    a.add_argument(
        "--lora-targets",
        choices=LORA_TARGET_CHOICES,
        default="attn",
        help="attn: the q/k/v/o projections (default); attn+mlp: also gate/up/down",
    )
    e = p.add_argument_group("evaluation and checkpoints")
    e.add_argument(
        "--eval-every", type=positive_int, default=50, help="steps between held-out evaluations (default 50)"
    )
    e.add_argument(
        "--eval-batches", type=positive_int, default=4, help="held-out micro-batches per evaluation (default 4)"
    )
    e.add_argument("--save-every", type=positive_int, default=100, help="steps between checkpoints (default 100)")
    add_dtype_device_args(p, dtype_default="float32")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_text_args(p, "the text files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.commands.common import announce_loading
    from tokensieve.errors import InputError

    if args.resume is None and (args.out is None or not args.data):
        raise InputError("--out and --data are required (or --resume OUT to continue a run)")
    announce_loading(args, args.resume or args.model)
    from tokensieve.training import TrainConfig, resume, train

    if args.resume is not None:
        res = resume(args.resume, steps=args.steps, progress=not args.quiet)
    else:
        cfg = TrainConfig(
            model=args.model,
            out=args.out,
            data=list(args.data),
            eval_data=list(args.eval_data),
            from_scratch=args.from_scratch,
            layers=args.layers,
            hidden=args.hidden,
            heads=args.heads,
            kv_heads=args.kv_heads or args.heads,
            intermediate=args.intermediate,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            steps=args.steps or 100,
            lr=args.lr,
            warmup=min(args.warmup, args.steps or 100),
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm,
            mask=args.mask,
            n_initial=args.n_initial,
            n_recent=args.n_recent,
            include_space=args.include_space,
            kernel=args.kernel,
            device=args.device,
            dtype=args.dtype or "float32",
            eval_every=args.eval_every,
            eval_batches=args.eval_batches,
            save_every=args.save_every,
            seed=args.seed,
            max_tokens=args.max_tokens,
            encoding=args.encoding,
            encoding_errors=args.encoding_errors,
            lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_targets=args.lora_targets,
        )
        res = train(cfg, progress=not args.quiet)
    summary = {
        "out": str(res.out),
        "step": res.step,
        "interrupted": res.interrupted,
        "final_loss": res.losses[-1] if res.losses else None,
        "tokens_per_s": res.tokens_per_s,
        "trainable_parameters": res.trainable_parameters,
        "evals": res.evals,
    }
    if args.json:
        print_json(summary)
    elif res.interrupted:
        print(
            f"interrupted at step {res.step}; checkpoint saved: continue with tokensieve train --resume {res.out}",
            file=sys.stderr,
        )
    else:
        last = res.evals[-1] if res.evals else None
        ev = f", held-out ppl {last['ppl_mask']:.2f} (mask) {last['ppl_full']:.2f} (full)" if last else ""
        print(f"trained {res.step} steps: loss {summary['final_loss']:.4f}{ev}; model in {res.out}")
    return 130 if res.interrupted else 0
