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
            span_vs_paper[key[:5] + (key[-1],)] = f"{sum(d) / len(d):+.1f} {fmt_iv(iv)} (n={len(d)})" if d else ""
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
        r0 = next((r for r in rows if labels[id(r)] == s["method"] and r["method"] == name), {})
        p0 = r0.get("params") or {}
        rest = repr(sorted((k, v) for k, v in p0.items() if k != "dilation"))
        vs_paper = span_vs_paper.get((s["model"], s["task"], s["length"], name, rest, p0.get("dilation")), "")
        out.append(
            f"| {s['model']} | {s['task']} | {length} | {s['method']} | {s['samples']} | {acc} | {diff} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} | {kv} | {whole_s} | {split} | {vs_paper} |"
        )
    return "\n".join(out) + "\n"


def headline(sources: list[tuple[str, list, str]], task: str, methods: tuple[str, ...]) -> str:
    """One compact table over several result folders: per (model, length) the ``methods`` at their defaults on
    ``task`` (accuracy, paired difference to full attention, KV kept), over the prompts every shown method scored
    (so ``n`` holds for each cell). ``sources``: (label of the machine, folders, the ``dilation`` of the default
    rule); rows of other parameter variants are left out."""
    out = [
        "| model | machine | length | n | full % | "
        + " | ".join(f"{m} % (vs full [95%], KV kept)" for m in methods if m != "full")
        + " |",
        "|---|---|---:|---:|---:|" + "---:|" * (len(methods) - 1),
    ]
    for machine, folders, dilation in sources:

        def at_defaults(p: dict) -> bool:
            return (
                p.get("dilation", dilation) == dilation
                and not p.get("filter_model")
                and p.get("filter_attention", "dense") == "dense"
                and p.get("topk", 1024) == 1024
                and p.get("budget", 1024) == 1024
            )

        rows = paired_rows(
            [
                r
                for r in load_results(folders)
                if r["task"] == task and r["method"] in methods and at_defaults(r.get("params") or {})
            ]
        )
        by = {(s["model"], s["length"], s["method"]): s for s in summarize(rows)}
        for model, length in sorted({(m, n) for m, n, _ in by}):
            full = by.get((model, length, "full"))
            if full is None:
                continue
            cells = []
            for m in methods:
                if m == "full":
                    continue
                g = by.get((model, length, m))
                cells.append(
                    "-"
                    if g is None or g["accuracy"] is None
                    else f"{g['accuracy']:.0f} ({g['vs_full']:+.1f} {fmt_iv(g['vs_full_interval'])}, "
                    f"{100 * g['kv_kept']:.0f}%)"
                )
            out.append(
                f"| {model} | {machine} | {length // 1024}k | {full['samples']} | {full['accuracy']:.0f} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(out) + "\n"


def pct(xs: list[float]) -> str:
    """Mean of 0..1 scores as a percentage, "-" for none."""
    return f"{100 * sum(xs) / len(xs):.1f}" if xs else "-"


def paired_to(
    folders, method: str, variant: dict, baseline: dict, names: tuple[str, str] = ("baseline", "variant")
) -> str:
    """Per model x task x length: ``method`` run with the ``variant`` parameters against the same method with the
    ``baseline`` parameters (e.g. GemFilter with a draft model against its self-filter), paired on the prompts both
    scored, with the bootstrap interval of the difference; full attention's accuracy beside them."""
    rows = [r for r in load_results(folders) if not r.get("error") and r.get("score") is not None]

    def has(r: dict, want: dict) -> bool:
        return r["method"] == method and all((r.get("params") or {}).get(k) == v for k, v in want.items())

    groups: dict[tuple, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        side = (
            "variant"
            if has(r, variant)
            else "baseline"
            if has(r, baseline)
            else "full"
            if r["method"] == "full"
            else None
        )
        if side:
            groups[(r["model"], r["task"], r.get("length", 0))][side][r["key"]] = r["score"]
    out = [
        f"| model | task | length | n | full % | {names[0]} % | {names[1]} % | {names[1]} - {names[0]}, points [95%] |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (model, task, length), g in sorted(groups.items()):
        keys = [k for k in g["variant"] if k in g["baseline"]]
        if not keys:
            continue
        d = [100 * (g["variant"][k] - g["baseline"][k]) for k in keys]
        iv = bootstrap_interval(d) if len(d) >= MIN_SAMPLES_FOR_INTERVAL else None
        full = [g["full"][k] for k in keys if k in g["full"]]
        out.append(
            f"| {model} | {task} | {length // 1024}k | {len(keys)} | {pct(full)} | "
            f"{pct([g['baseline'][k] for k in keys])} | {pct([g['variant'][k] for k in keys])} | "
            f"{sum(d) / len(d):+.1f} {fmt_iv(iv)} |"
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
