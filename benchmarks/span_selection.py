"""Which selection rule keeps an answer's whole span? GemFilter's kept set under several pooling/span rules.

For each prompt (needle sentences and RULER needles, chat template), one filter pass gives the
layer-``r`` scores; every rule then picks ``topk`` tokens from those same scores
(``scoring.span_topk``) and is measured by

* ``answer_recall``: the share of the *answer's* tokens kept (the value asked for, not the whole
  needle sentence: a needle whose value is cut cannot be answered),
* ``answer_whole``: whether every answer token was kept,
* with ``--answers``: the answer itself, from the full model run on the kept ids (exactly GemFilter's
  second pass), scored like the tasks score it; full attention's answer on the whole prompt beside it.

Two disjoint prompt sets: ``--set tune`` (choose the rule) and ``--set confirm`` (other books, other
needle sentences and question wordings, another RULER seed). Results go to one JSON file, written
after every prompt (an interrupted run keeps what it measured; the same command resumes).

    PYTHONPATH=src python benchmarks/span_selection.py --model smollm2 --set tune --lengths 2048,4096,7000 \\
        --out benchmarks/results/span_selection/smollm2_tune.json --answers
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tokensieve.commands.common import parse_literal
from tokensieve.core.models import load_model
from tokensieve.core.scoring import span_topk
from tokensieve.data import pg19_books
from tokensieve.engine.runner import encode_prompt, generate
from tokensieve.evaluation.needle import build_needle_prompt, find_span, score_answer
from tokensieve.evaluation.ruler import RulerTask
from tokensieve.methods.gemfilter import GemFilter

# (needle, question, expected phrases): the tuning set and a disjoint confirmation set.
NEEDLES = {
    "tune": [
        (
            "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
            "What is the best thing to do in San Francisco?",
            ["sandwich", "Dolores Park"],
        ),
        (
            "The secret password for the blue cabinet is copper-lantern-42.",
            "What is the secret password for the blue cabinet?",
            ["copper-lantern-42"],
        ),
        (
            "Margaret told everyone at the fair that her favourite fruit is the golden kiwi from Nelson.",
            "What is Margaret's favourite fruit?",
            ["golden kiwi"],
        ),
    ],
    "confirm": [
        (
            "The lighthouse keeper buried the spare key under the third red stone by the gate.",
            "Where did the lighthouse keeper bury the spare key?",
            ["third red stone"],
        ),
        (
            "The flight of Professor Alvarez to Lisbon departs at 6:45 from gate B17.",
            "From which gate does the flight of Professor Alvarez leave?",
            ["B17"],
        ),
        (
            "The old recipe calls for exactly 370 grams of dark rye flour.",
            "How many grams of rye flour does the old recipe need?",
            ["370"],
        ),
    ],
}
DEPTHS = {"tune": [0.1, 0.3, 0.5, 0.7, 0.9], "confirm": [0.05, 0.25, 0.45, 0.65, 0.85]}
RULER_SEED = {"tune": 101, "confirm": 202}
# Rules: (label, kernel, pooling, dilation).
RULES = [
    ("avg5", 5, "avg", 1),
    ("avg15", 15, "avg", 1),
    ("avg31", 31, "avg", 1),
    ("max5", 5, "max", 1),
    ("max15", 15, "max", 1),
    ("max31", 31, "max", 1),
    ("avg5_d15", 5, "avg", 15),
    ("avg5_d31", 5, "avg", 31),
    ("avg5_d63", 5, "avg", 63),
    ("avg15_d31", 15, "avg", 31),
]


def books_for(which: str) -> str:
    """The tuning set reads the first half of the PG-19 books (sorted by name), the confirmation set the rest."""
    books = sorted(pg19_books())
    half = len(books) // 2
    chosen = books[:half] if which == "tune" else books[half:]
    return "\n\n".join(b.read_text(encoding="utf-8", errors="replace") for b in chosen)


def prompts(tok, which: str, lengths: list[int], ruler_samples: int):
    """(key, input_ids [1, n], expected phrases, answer token indices) for the set."""
    text = books_for(which)
    for n in lengths:
        for i, (needle, question, expected) in enumerate(NEEDLES[which]):
            for d in DEPTHS[which]:
                p = build_needle_prompt(tok, text, n, d, needle, question)
                ids = encode_prompt(tok, p.messages)
                answer = sorted({j for e in expected for j in find_span(tok, ids[0].tolist(), e)})
                yield f"needle{i}/{n}/{d:g}", ids, expected, answer
        task = RulerTask(
            [n],
            samples=ruler_samples,
            seed=RULER_SEED[which],
            tasks=["niah_single", "niah_multikey"],
            haystack=text,
            value_type="number",
        )
        for s in task.samples(tok):
            answer = sorted({j for e in s.expected for j in find_span(tok, s.input_ids, e)})
            yield f"ruler/{s.key}", torch.tensor([s.input_ids]), s.expected, answer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--set", choices=("tune", "confirm"), default="tune")
    ap.add_argument("--lengths", default="2048,4096,7000")
    ap.add_argument("--ruler-samples", type=int, default=5)
    ap.add_argument("--topk", default="1024,256", help="budgets, comma-separated")
    ap.add_argument("--rules", default=",".join(r[0] for r in RULES), help="rule labels for the recall table")
    ap.add_argument("--answer-rules", default="avg5,avg15,avg31,avg5_d31", help="rules whose answers are generated")
    ap.add_argument("--answers", action="store_true", help="generate and score answers (full attention too)")
    ap.add_argument(
        "--skip-full",
        action="store_true",
        help="with --answers, leave out full attention's answers (another file of the same prompts has them)",
    )
    ap.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a GemFilter parameter of the filter pass, e.g. filter_attention=local (repeatable)",
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rules = {r[0]: r[1:] for r in RULES if r[0] in args.rules.split(",")}
    answer_rules = [r for r in args.answer_rules.split(",") if r in rules]
    budgets = [int(k) for k in args.topk.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = json.loads(out.read_text()) if out.exists() else {"rows": []}
    seen = {r["key"] for r in done["rows"]}
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    dev = next(model.parameters()).device
    params = {k: parse_literal(v) for k, _, v in (item.partition("=") for item in args.param)}  # as the CLI's --param
    gem = GemFilter(**params)
    done.update(
        model=args.model,
        set=args.set,
        filter_layer=gem.resolved_layer(model),
        scoring=gem.scoring,
        window_size=gem.window_size,
        device=str(dev),
        params=params,
    )
    for key, ids, expected, answer in prompts(
        tok, args.set, [int(x) for x in args.lengths.split(",")], args.ruler_samples
    ):
        if key in seen:
            continue
        ids = ids.to(dev)
        t0 = time.perf_counter()
        scores = gem.scores(model, ids).float()
        row = {
            "key": key,
            "n": ids.shape[1],
            "answer_tokens": len(answer),
            "expected": expected,
            "filter_s": round(time.perf_counter() - t0, 4),
            "rules": {},
        }
        a = torch.tensor(answer, device=dev)
        for k in budgets:
            for label, (kernel, pooling, dilation) in rules.items():
                kept = span_topk(scores, k, kernel, pooling, dilation)
                hit = torch.isin(a, kept).float()
                cell = {"answer_recall": round(hit.mean().item(), 4), "answer_whole": bool(hit.all())}
                if args.answers and label in answer_rules and k == budgets[0]:
                    res = generate(model, tok, ids[:, kept], method="full", max_new_tokens=32)
                    cell.update(answer=res.text, score=score_answer(res.text, expected))
                row["rules"][f"{label}@{k}"] = cell
        if args.answers and not args.skip_full:
            res = generate(model, tok, ids, method="full", max_new_tokens=32)
            row["full"] = {"answer": res.text, "score": score_answer(res.text, expected), "ttft_s": res.ttft_s}
        done["rows"].append(row)
        out.write_text(json.dumps(done, indent=1))
        print(
            key,
            row["n"],
            {r: c.get("score", c["answer_whole"]) for r, c in row["rules"].items() if "@" + str(budgets[0]) in r},
            row.get("full", {}).get("score"),
            flush=True,
        )
    summary = {}
    for rk in sorted({r for row in done["rows"] for r in row["rules"]}):
        cells = [row["rules"][rk] for row in done["rows"] if rk in row["rules"]]
        s = {
            "n": len(cells),
            "answer_recall": sum(c["answer_recall"] for c in cells) / len(cells),
            "answer_whole": sum(c["answer_whole"] for c in cells) / len(cells),
        }
        scored = [c["score"] for c in cells if "score" in c]
        if scored:
            s["accuracy"] = sum(scored) / len(scored)
        summary[rk] = s
    fulls = [row["full"]["score"] for row in done["rows"] if "full" in row]
    if fulls:
        summary["full"] = {"n": len(fulls), "accuracy": sum(fulls) / len(fulls)}
    done["summary"] = summary
    out.write_text(json.dumps(done, indent=1))
    for rk, s in summary.items():
        print(f"{rk:>18} " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
