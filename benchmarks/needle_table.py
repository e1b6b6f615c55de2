"""Print a CPU needle table of docs/results.md from a needle.jsonl (default: results/needle_smollm2/needle.jsonl).

Per method and length: mean score (fraction of expected phrases in the answer), answers fully right out
of the depths, and the TTFT speedup over full attention: the median over depths of full/method for the same
prompt, all cells from one run.   python3 benchmarks/needle_table.py [PATH]
"""

import json
import statistics
import sys
from pathlib import Path

DEFAULT = Path(__file__).parent / "results/needle_smollm2/needle.jsonl"


def render(path=DEFAULT) -> str:
    """The table (markdown) for one needle.jsonl whose methods all ran on the same prompts as full attention."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    lengths = sorted({r["length"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["length"], r["key"]): r for r in rows}
    out = [
        "| method | "
        + " | ".join(f"{n // 1024}k: score / right / TTFT speedup" for n in lengths)
        + f" | KV after prefill at {lengths[-1] // 1024}k |"
    ]
    out.append("|---|" + "---|" * len(lengths) + "---:|")
    for m in methods:
        parts = []
        for n in lengths:
            rs = [r for r in rows if r["method"] == m and r["length"] == n]
            score = statistics.mean(r["score"] for r in rs)
            right = sum(r["score"] == 1.0 for r in rs)
            sp = statistics.median(cell[("full", n, r["key"])]["ttft_s"] / r["ttft_s"] for r in rs)
            parts.append(f"{score:.2f} / {right}/{len(rs)} / {sp:.2f}x")
        kv = statistics.mean(r["kv_bytes_prefill"] for r in rows if r["method"] == m and r["length"] == lengths[-1])
        out.append(f"| {m} | " + " | ".join(parts) + f" | {kv / 2**20:.0f} MiB |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(*sys.argv[1:2]), end="")
