"""Print the SmolLM2 accuracy table of docs/results.md from the committed H100 evaluation results.

    PYTHONPATH=src python3 benchmarks/accuracy_table.py

Per method: mean score (%) per length for the needle and RULER-style tasks, and over all
lengths the paired difference to full attention with its 95% interval (same prompts).
"""

from pathlib import Path

from tokensieve.evaluation.report import load_results, paired_rows, summarize

R = Path(__file__).parent / "results"
ORDER = ["full", "gemfilter", "snapkv", "h2o", "streamingllm", "sepllm", "lazyllm"]


def render() -> str:
    """The table (markdown), preceded by one line per task with its number of paired samples."""
    out: list[str] = []
    cols, cells = [], {}
    for task in ("needle", "ruler"):
        rows = paired_rows(load_results([R / f"{task}_smollm2_h100"]))
        for g in summarize(rows):
            cells[(task, g["method"], g["length"])] = f"{g['accuracy']:.0f}"
        for g in summarize([dict(r, length="all") for r in rows]):
            samples = g["samples"]
            cells[(task, g["method"], "all")] = (
                "-" if g["method"] == "full" else f"{g['vs_full']:+.0f} ± {g['vs_full_ci']:.0f}"
            )
        lengths = sorted({r["length"] for r in rows})
        cols += [(task, n) for n in lengths] + [(task, "all")]
        out.append(f"{task}: {samples} paired samples per method over all lengths.")
    head = [f"{t} {n // 1024}k" if n != "all" else f"{t}: vs full, all lengths" for t, n in cols]
    out.append("")
    out.append("| method | " + " | ".join(head) + " |")
    out.append("|---|" + "---:|" * len(cols))
    for m in ORDER:
        out.append(f"| {m} | " + " | ".join(cells.get((t, m, n), "") for t, n in cols) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    print(render(), end="")


if __name__ == "__main__":
    main()
