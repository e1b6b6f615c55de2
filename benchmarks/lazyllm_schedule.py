"""Choose LazyLLM's default pruning schedule on SmolLM2 by measurement.

Command (CPU, about 10 minutes on one thread of a shared machine):

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/lazyllm_schedule.py

For every prompt, full attention and each candidate schedule run one after
the other (so machine noise hits them alike). Two tasks at ~2k tokens:

* needle: the GemFilter paper's needle ("... eat a sandwich and sit in Dolores
  Park ...") in PG-19 text at several depths, scored by ``score_answer`` (1 = all
  expected phrases found);
* magic number (RULER ``niah_single``-style): "One of the special magic numbers
  for <word> is: <7 digits>." in PG-19 text, question asks for the number of
  <word>; correct when the digits appear in the answer.

Per schedule: accuracy on each task, % of prompt tokens computed
(sum over layers of tokens computed / (L x n)) at the first token and over the
whole answer, tokens revived from the aux cache, and TTFT relative to full
attention on the same prompt (median). Writes a JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tokensieve.data import read_text
from tokensieve.engine.runner import encode_prompt, generate
from tokensieve.evaluation.needle import build_needle_prompt, make_messages, score_answer

COMMAND = "OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/lazyllm_schedule.py"

# (prune_layers, keep_fractions): SmolLM2 has 30 layers. Cumulative fractions kept are the products.
SCHEDULES: list[tuple[tuple[int, ...], tuple[float, ...]]] = [
    ((8, 14, 20), (0.8, 0.8, 0.8)),
    ((8, 14, 20), (0.7, 0.7, 0.7)),
    ((6, 12, 18, 24), (0.7, 0.7, 0.7, 0.7)),
    ((4, 10, 16, 22), (0.5, 0.5, 0.5, 0.5)),
    ((15,), (0.3,)),
]

WORDS = ["apple", "river", "candle", "falcon", "marble", "harbor", "violet", "copper", "meadow", "lantern"]


def magic_number_prompt(
    tokenizer, haystack: str, length: int, depth: float, rng: random.Random
) -> tuple[list[dict], str]:
    """RULER niah_single-style prompt of about ``length`` tokens; returns (messages, expected number)."""
    word, number = rng.choice(WORDS), str(rng.randint(1_000_000, 9_999_999))
    needle = f"One of the special magic numbers for {word} is: {number}."
    question = f"What is the special magic number for {word} mentioned in the provided text?"
    overhead = encode_prompt(tokenizer, make_messages(needle, question)).shape[1]
    hay_ids = tokenizer(haystack[: length * 8], add_special_tokens=False)["input_ids"][: length - overhead]
    context = tokenizer.decode(hay_ids)
    cut = int(depth * len(context))
    m = re.search(r"[.!?]\s", context[cut:])
    cut = cut + m.end() if m else len(context)
    return make_messages(f"{context[:cut].rstrip()} {needle} {context[cut:].lstrip()}", question), number


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--depths", default="0.15,0.5,0.85", help="needle / magic-number depths")
    ap.add_argument("--out", default="benchmarks/results/lazyllm_schedule.json")
    ap.add_argument("--plot", default="benchmarks/results/lazyllm_schedule.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from tokensieve.core.models import load_model

    model, tok = load_model("smollm2", device="cpu")
    n_layers = model.config.num_hidden_layers
    depths = [float(d) for d in args.depths.split(",")]
    haystack = read_text(min_chars=args.length * 10)
    rng = random.Random(0)  # magic numbers and their keys
    prompts = []
    for d in depths:
        p = build_needle_prompt(tok, haystack, args.length, d)
        prompts.append(("needle", d, p.messages, None))
    # A different stretch of text for the magic numbers, so the two tasks do not share a haystack.
    other = haystack[len(haystack) // 2 :]
    for d in depths:
        msgs, number = magic_number_prompt(tok, other, args.length, d, rng)
        prompts.append(("magic_number", d, msgs, number))

    configs = [("full", {})] + [("lazyllm", {"prune_layers": l, "keep_fractions": f}) for l, f in SCHEDULES]
    generate(model, tok, prompts[0][2], method="full", max_new_tokens=1)  # warm-up
    rows = []
    t_start = time.time()
    with tqdm(total=len(prompts) * len(configs), desc="lazyllm sweep", file=sys.stderr) as bar:
        for task, depth, msgs, number in prompts:
            full_ttft = None
            for name, params in configs:
                r = generate(model, tok, msgs, method=name, max_new_tokens=24 if task == "needle" else 32, **params)
                correct = score_answer(r.text) == 1.0 if task == "needle" else number in r.text.replace(",", "")
                if name == "full":
                    full_ttft = r.ttft_s
                rows.append(
                    dict(
                        task=task,
                        depth=depth,
                        config=config_label(name, params),
                        answer=r.text,
                        correct=bool(correct),
                        score=score_answer(r.text) if task == "needle" else float(correct),
                        prompt_tokens=r.prompt_tokens,
                        ttft_s=r.ttft_s,
                        ttft_rel=r.ttft_s / full_ttft,
                        pct_first=r.details.get("prompt_computed_pct_first_token", 100.0),
                        pct_total=r.details.get("prompt_computed_pct_total", 100.0),
                        revived=r.details.get("revived_tokens", 0),
                    )
                )
                bar.update()
    summary = []
    for name, params in configs:
        label = config_label(name, params)
        rs = [r for r in rows if r["config"] == label]
        summary.append(
            dict(
                config=label,
                params={k: list(v) for k, v in params.items()},
                needle_acc=mean([r["correct"] for r in rs if r["task"] == "needle"]),
                needle_score=mean([r["score"] for r in rs if r["task"] == "needle"]),
                magic_number_acc=mean([r["correct"] for r in rs if r["task"] == "magic_number"]),
                pct_first=mean([r["pct_first"] for r in rs]),
                pct_total=mean([r["pct_total"] for r in rs]),
                revived=mean([r["revived"] for r in rs]),
                ttft_s=statistics.median(r["ttft_s"] for r in rs),
                ttft_rel_median=statistics.median(r["ttft_rel"] for r in rs),
            )
        )
    out = dict(
        command=COMMAND,
        model="smollm2 (SmolLM2-135M-Instruct, 30 layers)",
        device="cpu, 1 thread (shared machine)",
        length=args.length,
        depths=depths,
        layers=n_layers,
        wall_s=time.time() - t_start,
        summary=summary,
        rows=rows,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    plot(summary, args.plot, args.length)
    for s in summary:
        print(
            f"{s['config']:<40} needle {s['needle_acc']:.2f}  magic {s['magic_number_acc']:.2f}  "
            f"computed {s['pct_first']:5.1f}% (first) {s['pct_total']:5.1f}% (all)  revived {s['revived']:6.0f}  "
            f"TTFT x{s['ttft_rel_median']:.2f} ({s['ttft_s']:.2f} s)"
        )
    return 0


def config_label(name: str, params: dict) -> str:
    if name == "full":
        return "full"
    return f"L{'/'.join(map(str, params['prune_layers']))} f{'/'.join(map(str, params['keep_fractions']))}"


def mean(xs: list) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def plot(summary: list[dict], path: str, length: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in summary:
        x = s["pct_first"]
        axes[0].scatter(x, s["needle_acc"], marker="o", color="C0")
        axes[0].scatter(x, s["magic_number_acc"], marker="s", color="C1")
        axes[0].annotate(s["config"], (x, s["needle_acc"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        axes[1].scatter(x, s["ttft_rel_median"], color="C2")
        axes[1].annotate(s["config"], (x, s["ttft_rel_median"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    axes[0].scatter([], [], marker="o", color="C0", label="needle")
    axes[0].scatter([], [], marker="s", color="C1", label="magic number (RULER-style)")
    axes[0].legend(fontsize=8)
    axes[0].set_xlabel("% prompt tokens computed (first token)")
    axes[0].set_ylabel("accuracy")
    axes[0].set_ylim(-0.05, 1.05)
    axes[1].set_xlabel("% prompt tokens computed (first token)")
    axes[1].set_ylabel("TTFT / full-attention TTFT (median)")
    fig.suptitle(f"LazyLLM schedules on SmolLM2-135M-Instruct, {length}-token prompts, CPU", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
