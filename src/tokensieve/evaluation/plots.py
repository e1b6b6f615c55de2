"""Plots people would rather look at than read (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokensieve.errors import require_extra

require_extra("plots", "plotting")  # one line naming the extra instead of a ModuleNotFoundError
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402

from tokensieve.evaluation.harness import method_labels  # noqa: E402

if TYPE_CHECKING:
    from tokensieve.evaluation.stream_ppl import StreamResult


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a figure; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


NEEDLE_CMAP = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"])


def needle_heatmap(
    grid: list[list[float]], lengths: list[int], depths: list[float], title: str, path: str | Path
) -> Path:
    """Heatmap of scores [depth][length] in [0, 1], like the GemFilter paper's figure."""
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.45 * len(depths)))
    im = ax.imshow(grid, cmap=NEEDLE_CMAP, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=9)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.2f}".rstrip("0").rstrip("."), ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.05)
    return save_figure(fig, path)


def needle_heatmaps(rows: list[dict[str, Any]], out: str | Path) -> list[Path]:
    """One heatmap (depth x length, mean score) per model and method label, from needle result lines."""
    rows = [r for r in rows if r.get("task") == "needle" and r.get("score") is not None]
    labels = method_labels(rows)
    paths = []
    for model in sorted({r["model"] for r in rows}):
        for label in sorted({labels[id(r)] for r in rows if r["model"] == model}):
            sel = [r for r in rows if r["model"] == model and labels[id(r)] == label]
            lengths = sorted({r["length"] for r in sel})
            depths = sorted({r["meta"]["depth"] for r in sel})
            grid = [
                [_mean([r["score"] for r in sel if r["length"] == n and r["meta"]["depth"] == d]) for n in lengths]
                for d in depths
            ]
            safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in f"{model}_{label}")
            paths.append(needle_heatmap(grid, lengths, depths, f"{label} on {model}", Path(out) / f"needle_{safe}.png"))
    return paths


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def bench_plot(
    result: dict, path: str | Path, anchors: dict[str, dict[int, tuple[float, float]]] | None = None
) -> Path:
    """TTFT and peak memory vs prompt length, one line per method label (from ``bench.run_bench``), and a third
    panel with the end-to-end latency of the ``answer_tokens`` answer where the result has it.

    ``anchors`` optionally maps a label to {length: (ttft_s, peak_GiB)} reference points, drawn as crosses.
    """
    with_e2e = any(r.get("e2e_s") is not None for r in result["rows"])
    fig, axes = plt.subplots(1, 3 if with_e2e else 2, figsize=(15 if with_e2e else 10, 4))
    a1, a2 = axes[0], axes[1]
    panels = [(a1, "time to first token (s)"), (a2, "peak memory (GiB)")]
    if with_e2e:
        panels.append((axes[2], f"end to end, {result.get('answer_tokens')}-token answer (s)"))
    labels = list(dict.fromkeys(r["label"] for r in result["rows"]))
    for label in labels:
        rows = sorted(
            (r for r in result["rows"] if r["label"] == label and r["status"] == "ok"), key=lambda r: r["length"]
        )
        if not rows:
            continue
        xs = [r["length"] for r in rows]
        a1.plot(xs, [r["ttft_s"] for r in rows], marker="o", label=label)
        a2.plot(xs, [r["peak_memory_bytes"] / 2**30 for r in rows], marker="o", label=label)
        if with_e2e:
            e2e = [(r["length"], r["e2e_s"]) for r in rows if r.get("e2e_s") is not None]
            axes[2].plot([x for x, _ in e2e], [y for _, y in e2e], marker="o", label=label)
    for label, pts in (anchors or {}).items():
        xs = sorted(pts)
        a1.scatter(xs, [pts[x][0] for x in xs], marker="x", color="k", zorder=5, label=label)
        a2.scatter(xs, [pts[x][1] for x in xs], marker="x", color="k", zorder=5, label=label)
    env = result.get("environment", {})
    where = env.get("gpu") or env.get("cpu", "")
    for ax, ylab in panels:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3)
    a1.set_yscale("log")
    if with_e2e:
        axes[2].set_yscale("log")
    a1.legend(fontsize=7)
    fig.suptitle(f"{result['shape']} ({result['dtype']}, random weights) on {where}", fontsize=9)
    return save_figure(fig, path)


def e2e_bars(results: list[dict], path: str | Path) -> Path:
    """End-to-end latency per method as stacked bars (TTFT, then the answer's decoding steps), one panel per prompt
    length, from ``bench.run_bench`` results (several runs' rows are merged; a method missing at a length is left
    out). Returns the path."""
    rows = [r for res in results for r in res["rows"] if r.get("status") == "ok" and r.get("e2e_s") is not None]
    if not rows:
        raise ValueError("no row with an end-to-end latency (e2e_s) to plot")
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        cells = [r for r in rows if r["length"] == n]
        names = [r["label"] for r in cells]
        ttft = [r["ttft_s"] for r in cells]
        decode = [r["e2e_s"] - r["ttft_s"] for r in cells]
        ax.bar(names, ttft, color="#4C72B0", label="time to first token")
        ax.bar(names, decode, bottom=ttft, color="#A1C9F4", label="decoding the rest of the answer")
        for i, r in enumerate(cells):
            ax.text(i, r["e2e_s"], f"{r['e2e_s']:.2f} s", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{n:,}-token prompt", fontsize=9)
        ax.set_ylabel("seconds")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    first = results[0]
    env = first.get("environment", {})
    fig.suptitle(
        f"end to end, a {first.get('answer_tokens')}-token answer: {first['shape']} ({first['dtype']}, random "
        f"weights) on {env.get('gpu') or env.get('cpu', '')}",
        fontsize=9,
    )
    return save_figure(fig, path)


def plot_stream(results: list[StreamResult], path: str | Path, title: str = "") -> Path:
    """Windowed perplexity and KV-cache size vs tokens seen, one line per result (PNG)."""
    colors = {"full": "#F0496E", "streamingllm": "#EBB839", "sepllm": "#0CD79F"}
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for r in results:
        xs = [p.tokens_seen for p in r.points]
        c = colors.get(r.method)
        ax1.plot(xs, [p.window_ppl for p in r.points], label=r.method, color=c, lw=1.2)
        ax2.plot(xs, [p.kv_bytes / 2**20 for p in r.points], label=r.method, color=c, lw=1.2)
        if r.model_max_positions and r.method == "full":
            for ax in (ax1, ax2):
                ax.axvline(r.model_max_positions, color="grey", ls=":", lw=1)
    ax1.set_yscale("log")
    ax1.set_ylabel("perplexity (per window)")
    ax1.legend(fontsize=8)
    ax2.set_ylabel("KV cache (MiB)")
    ax2.set_xlabel("tokens seen")
    ax1.set_title(title, fontsize=9)
    return save_figure(fig, path)
