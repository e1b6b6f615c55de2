"""The README's accuracy map: per model x task x length x method, accuracy with its Wilson interval, the paired
difference to full attention with its bootstrap interval, the TTFT ratio to full attention on the same prompts,
the KV kept, and for the selecting methods where they fail (the whole answer kept or not).

    PYTHONPATH=src python3 benchmarks/accuracy_map_table.py benchmarks/results/accuracy_map/smollm2_cpu [--all-lengths]

Every statistic comes from ``tokensieve.evaluation.report`` (one copy of each rule). Rows are restricted to the
prompts every method of their (model, task, length) scored (``paired_rows``), so all figures are paired.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from tokensieve.evaluation.harness import method_labels
from tokensieve.evaluation.report import load_results, paired_rows, summarize


def fmt_iv(iv) -> str:
    return "n too small" if iv is None else f"[{iv[0]:+.0f}, {iv[1]:+.0f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--all-lengths", action="store_true", help="also one row per method over all lengths")
    args = ap.parse_args()
    rows = paired_rows(load_results(args.folders))
    if args.all_lengths:
        rows = rows + [dict(r, length=0) for r in rows]
    labels = method_labels(rows)
    # TTFT per (model, task, length, label, key), and the answer-kept figures of the selecting methods
    ttft: dict[tuple, dict[str, float]] = defaultdict(dict)
    kept: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        g = (r["model"], r["task"], r.get("length", 0), labels[id(r)])
        if r.get("ttft_s") is not None:
            ttft[g][r["key"]] = r["ttft_s"]
        if r.get("answer_recall") is not None:
            kept[g].append((r["answer_recall"], r["score"]))
    print("| model | task | length | method | n | accuracy % [95%] | vs full, points [95%] | TTFT / full | KV kept | "
          "whole answer kept | accuracy when kept / not |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in summarize(rows):
        g = (s["model"], s["task"], s["length"], s["method"])
        full = ttft.get((s["model"], s["task"], s["length"], "full"), {})
        mine = ttft.get(g, {})
        common = [k for k in mine if k in full]
        ratio = sum(mine[k] for k in common) / sum(full[k] for k in common) if common else None
        acc = "-" if s["accuracy"] is None else f"{s['accuracy']:.0f} [{s['accuracy_interval'][0]:.0f}, {s['accuracy_interval'][1]:.0f}]"
        diff = "" if s["method"] == "full" or s["vs_full"] is None else f"{s['vs_full']:+.1f} {fmt_iv(s['vs_full_interval'])}"
        k = kept.get(g, [])
        whole = [sc for rec, sc in k if rec == 1.0]
        part = [sc for rec, sc in k if rec < 1.0]
        whole_s = f"{len(whole) / len(k):.2f}" if k else ""
        split = (f"{100 * sum(whole) / len(whole):.0f} / " if whole else "- / ") + (f"{100 * sum(part) / len(part):.0f}" if part else "-") if k else ""
        kv = "" if s.get("kv_kept") is None else f"{100 * s['kv_kept']:.0f}%"
        length = "all" if s["length"] == 0 else f"{s['length'] // 1024}k"
        print(f"| {s['model']} | {s['task']} | {length} | {s['method']} | {s['samples']} | {acc} | {diff} | "
              f"{'' if ratio is None else f'{ratio:.2f}'} | {kv} | {whole_s} | {split} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
