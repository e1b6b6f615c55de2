"""The accuracy map of docs/results.md: per model x task x length x method, accuracy with its Wilson interval, the paired
difference to full attention with its bootstrap interval, the TTFT ratio to full attention (median of per-prompt ratios on the same prompts),
the KV kept, and for the selecting methods where they fail (the whole answer kept or not).

    PYTHONPATH=src python3 benchmarks/accuracy_map_table.py benchmarks/results/accuracy_map/smollm2_cpu [--all-lengths]

Every statistic comes from ``tokensieve.evaluation.report`` (one copy of each rule). Accuracy is over the prompts
each method scored; every difference is paired (the prompts both methods scored): to full attention, and for a
method run with the span rule (``dilation`` > 1) to the same method with the paper's isolated top-k
(``dilation=1``), the "vs paper's rule" column. ``--paired-all`` keeps only the prompts every method scored.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from tokensieve.evaluation.harness import method_labels
from tokensieve.evaluation.report import (
    MIN_SAMPLES_FOR_INTERVAL,
    bootstrap_interval,
    load_results,
    paired_rows,
    summarize,
)


def fmt_iv(iv) -> str:
    return "n too small" if iv is None else f"[{iv[0]:+.0f}, {iv[1]:+.0f}]"


def render(folders, all_lengths: bool = False, paired_all: bool = False, tasks=None) -> str:
    """The table (markdown) for the result files in ``folders``; ``tasks`` keeps only those tasks."""
    out: list[str] = []
    rows = load_results(folders)
    if tasks is not None:
        rows = [r for r in rows if r["task"] in tasks]
    rows = paired_rows(rows) if paired_all else rows
    if all_lengths:
        rows = rows + [dict(r, length=0) for r in rows]
    labels = method_labels(rows)
    # TTFT per (model, task, length, label, key), and the answer-kept figures of the selecting methods
    ttft: dict[tuple, dict[str, float]] = defaultdict(dict)
    kept: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    scores: dict[tuple, dict[str, float]] = defaultdict(dict)  # (model, task, length, method, params but dilation)
    for r in rows:
        if not r.get("error") and r.get("score") is not None:
            p = {k: v for k, v in (r.get("params") or {}).items() if k != "dilation"}
            scores[
                (
                    r["model"],
                    r["task"],
                    r.get("length", 0),
                    r["method"],
                    repr(sorted(p.items())),
                    (r.get("params") or {}).get("dilation"),
                )
            ][r["key"]] = r["score"]
        g = (r["model"], r["task"], r.get("length", 0), labels[id(r)])
        if r.get("ttft_s") is not None:
            ttft[g][r["key"]] = r["ttft_s"]
        if r.get("answer_recall") is not None:
            kept[g].append((r["answer_recall"], r["score"]))
    out.append(
        "| model | task | length | method | n | accuracy % [95%] | vs full, points [95%] | TTFT / full | KV kept | "
        "whole answer kept | accuracy when kept / not | vs paper's rule, points [95%] |"
    )
    out.append("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    span_vs_paper: dict[tuple, str] = {}
    for key, mine in scores.items():
        if key[-1] and key[-1] > 1 and (paper := scores.get(key[:-1] + (1,))):
            d = [100 * (mine[k] - paper[k]) for k in mine if k in paper]
            iv = bootstrap_interval(d) if len(d) >= MIN_SAMPLES_FOR_INTERVAL else None
            span_vs_paper[key[:4] + (key[-1],)] = f"{sum(d) / len(d):+.1f} {fmt_iv(iv)} (n={len(d)})" if d else ""
    for s in summarize(rows):
        g = (s["model"], s["task"], s["length"], s["method"])
        full = ttft.get((s["model"], s["task"], s["length"], "full"), {})
        mine = ttft.get(g, {})
        common = [k for k in mine if k in full]
        # the median of the per-prompt ratios: one prompt timed across a pause of the machine does not move it
        ratio = statistics.median(mine[k] / full[k] for k in common) if common else None
        iv = s["accuracy_interval"]
        acc = (
            "-"
            if s["accuracy"] is None
            else f"{s['accuracy']:.0f} " + ("(n too small)" if iv is None else f"[{iv[0]:.0f}, {iv[1]:.0f}]")
        )
        diff = (
            ""
            if s["method"] == "full" or s["vs_full"] is None
            else f"{s['vs_full']:+.1f} {fmt_iv(s['vs_full_interval'])}"
        )
        k = kept.get(g, [])
        whole = [sc for rec, sc in k if rec == 1.0]
        part = [sc for rec, sc in k if rec < 1.0]
        whole_s = f"{len(whole) / len(k):.2f}" if k else ""
        split = (
            (f"{100 * sum(whole) / len(whole):.0f} / " if whole else "- / ")
            + (f"{100 * sum(part) / len(part):.0f}" if part else "-")
            if k
            else ""
        )
        kv = "" if s.get("kv_kept") is None else f"{100 * s['kv_kept']:.0f}%"
        length = "all" if s["length"] == 0 else f"{s['length'] // 1024}k"
        name = s["method"].split("(")[0]
        dil = next(
            (r.get("params", {}).get("dilation") for r in rows if labels[id(r)] == s["method"] and r["method"] == name),
            None,
        )
        vs_paper = span_vs_paper.get((s["model"], s["task"], s["length"], name, dil), "")
        out.append(
            f"| {s['model']} | {s['task']} | {length} | {s['method']} | {s['samples']} | {acc} | {diff} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} | {kv} | {whole_s} | {split} | {vs_paper} |"
        )
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--all-lengths", action="store_true", help="also one row per method over all lengths")
    ap.add_argument("--paired-all", action="store_true", help="only the prompts every method scored")
    args = ap.parse_args()
    print(render(args.folders, args.all_lengths, args.paired_all), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
