"""Print the GPU tables of docs/results.md (markdown) from the committed JSON results in benchmarks/results/gpu/.

python3 benchmarks/gpu_table.py
"""

import json
from pathlib import Path

R = Path(__file__).parent / "results" / "gpu"


def rows(name):
    p = R / name
    data = json.loads(p.read_text())
    return (data["rows"] if isinstance(data, dict) else data), (
        data.get("environment", {}) if isinstance(data, dict) else {}
    )


def table(files) -> str:
    """One markdown row per (file, method, length) of ``tokensieve bench`` JSON files in results/gpu/."""
    out = []
    out.append(
        "| run | method | length | TTFT s | speedup vs full (same run) | peak GiB | KV after prefill GiB | decode tok/s (median step) |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for f in files:
        rs, env = rows(f)
        full = {r["length"]: r["ttft_s"] for r in rs if r["label"] == "full" and r["status"] == "ok"}
        for r in rs:
            if r["status"] != "ok":
                out.append(f"| {f} | {r['label']} | {r['length']} | {r['status']} | | | | |")
                continue
            sp = f"{full[r['length']] / r['ttft_s']:.2f}x" if r["length"] in full else "-"
            dec = f"{r['decode_tokens_per_s']:.1f}" if r.get("decode_tokens_per_s") else "-"
            out.append(
                f"| {f.split('.')[0].removeprefix('bench_')} | {r['label']} | {r['length']:,} | {r['ttft_s']:.3f} | {sp} | "
                f"{r['peak_memory_bytes'] / 2**30:.2f} | {(r['kv_bytes_prefill'] or 0) / 2**30:.3f} | {dec} |"
            )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(
        table(
            [
                "bench_main_a.json",
                "bench_main_b.json",
                "bench_main_c.partial.json",
                "bench_long_256k-1m.json",
                "bench_long_256k-512k.json",
                "bench_long_1m.json",
            ]
        ),
        end="",
    )  # the last two: before the chunked key scoring
