"""Comparison report from result files: markdown tables and an accuracy-vs-TTFT plot.

Groups result lines by (model, task, method with its parameters, length) and
gives, per group: samples, accuracy (mean score, in %), perplexity (for ``ppl``
lines: ``exp(sum nll / sum tokens)``), mean TTFT, mean peak memory, and the KV
cache kept after prefill as a share of the prompt (mean over layers and samples).
A second table breaks accuracy down by RULER subtask or LongBench dataset.
When a file holds the same cell twice (a retried error), the last successful
line counts. The eval command's summary and ``tokensieve report`` both read
results through :func:`load_results`, so they count the same rows.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

from tokensieve.errors import InputError
from tokensieve.evaluation.harness import is_backup, latest_rows, method_labels, read_results, results_files

MB = 1024 * 1024

__all__ = ["load_results", "method_labels", "paired_rows", "summarize", "markdown_table", "build_report"]


class ResultsWarning(UserWarning):
    """A results file or line that the report skipped."""


def _warn(message: str) -> None:
    warnings.warn(message, ResultsWarning, stacklevel=3)


def load_results(paths: Iterable[str | Path], warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Result lines from files and folders, one per cell (:func:`~tokensieve.evaluation.harness.latest_rows`).

    A folder contributes its live results files (every ``*.jsonl`` below it but the files
    ``--restart`` set aside, ``<task>.<time>.jsonl``); a file is read as given. A file that is
    not UTF-8 text is skipped and lines that are not result lines are counted, each with a
    message to ``warn`` (default: a :class:`ResultsWarning`). ``InputError`` when a path does
    not exist or no results file is found.
    """
    warn = warn or _warn
    paths = [Path(p) for p in paths]
    rows: list[dict[str, Any]] = []
    files: list[Path] = []
    for p in paths:
        if not p.exists():
            raise InputError(f"no results file or folder at {p}")
        files += results_files(p)
    if not files:
        aside = [f for p in paths if p.is_dir() for f in p.rglob("*.jsonl") if is_backup(f)]
        note = f" (only {len(aside)} file(s) set aside by --restart, e.g. {aside[0]})" if aside else ""
        raise InputError(f"no results files (*.jsonl) in {', '.join(map(str, paths))}{note}")
    for f in files:
        try:
            rows += read_results(f, on_problem=warn)
        except InputError as exc:
            warn(f"{exc}; skipped it")
    return latest_rows(rows)


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _ci95(xs: list[float]) -> float | None:
    """Half-width of the normal 95% interval of the mean of ``xs`` (None below 2 values)."""
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return 1.96 * math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def paired_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Only the samples that every method scored (no error) at their (model, task, length).

    Methods run with different sample counts (or a run stopped part-way) are then compared
    on the same prompts.
    """
    labels = method_labels(rows)
    keys: dict[tuple, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for r in rows:
        if not r.get("error"):
            keys[(r["model"], r["task"], r.get("length", 0))][labels[id(r)]].add(r.get("key"))
    common = {g: set.intersection(*by_label.values()) for g, by_label in keys.items()}
    return [r for r in rows if r.get("key") in common.get((r["model"], r["task"], r.get("length", 0)), set())]


def summarize(rows: list[dict[str, Any]], by_part: bool = False) -> list[dict[str, Any]]:
    """One summary dict per (model, task, method label, length[, subtask/dataset]), sorted.

    ``accuracy_ci`` is the 95% half-width of the mean score; ``vs_full`` (and ``vs_full_ci``)
    the mean paired difference to ``full`` on the samples both scored, in points.
    """
    labels = method_labels(rows)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        part = (r.get("meta") or {}).get("subtask") or (r.get("meta") or {}).get("dataset") or "" if by_part else ""
        groups[(r["model"], r["task"], labels[id(r)], r.get("length", 0), part)].append(r)
    out = []
    for (model, task, label, length, part), rs in groups.items():
        ok = [r for r in rs if not r.get("error")]
        scores = [r["score"] for r in ok if r.get("score") is not None]
        full = {r.get("key"): r["score"] for r in groups.get((model, task, "full", length, part), [])
                if not r.get("error") and r.get("score") is not None}
        diffs = [100 * (r["score"] - full[r.get("key")]) for r in ok if r.get("score") is not None and r.get("key") in full]
        nll, toks = sum(r.get("nll", 0.0) for r in ok if "nll" in r), sum(r.get("tokens", 0) for r in ok if "nll" in r)
        kv = [r["kv_tokens_prefill"] / r["prompt_tokens"] for r in ok if r.get("kv_tokens_prefill") is not None and r.get("prompt_tokens")]
        kept = [r["kept_tokens"] / r["prompt_tokens"] for r in ok if r.get("kept_tokens") is not None and r.get("prompt_tokens")]
        out.append({
            "model": model, "task": task, "method": label, "length": length, "part": part,
            "samples": len(ok), "errors": len(rs) - len(ok),
            "accuracy": 100 * sum(scores) / len(scores) if scores else None,
            "accuracy_ci": (100 * ci) if (ci := _ci95(scores)) is not None else None,
            "vs_full": _mean(diffs) if label != "full" else None,
            "vs_full_ci": _ci95(diffs) if label != "full" else None,
            "ppl": math.exp(nll / toks) if toks else None,
            "ttft_s": _mean([r.get("ttft_s") for r in ok]),
            "peak_memory_mb": (m / MB) if (m := _mean([r.get("peak_memory_bytes") for r in ok])) is not None else None,
            "kv_kept": _mean(kv), "tokens_kept": _mean(kept),
            "prompt_tokens": _mean([r.get("prompt_tokens") for r in ok]),
        })
    out.sort(key=lambda g: (g["model"], g["task"], g["part"], g["length"], g["method"]))
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(groups: list[dict[str, Any]], by_part: bool = False, timing: bool = True) -> str:
    has_ppl = any(g["ppl"] is not None for g in groups)
    has_acc = any(g["accuracy"] is not None for g in groups)
    cols = ["model", "task"] + (["subtask"] if by_part else []) + ["method", "length", "n"]
    cols += (["accuracy %", "± 95%", "vs full (paired)"] if has_acc else []) + (["ppl"] if has_ppl else [])
    if not by_part:
        cols += (["TTFT s"] if timing else []) + ["peak MiB", "KV kept", "tokens kept", "errors"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if c not in ("model", "task", "subtask", "method") else "---" for c in cols) + "|"]
    for g in groups:
        cells = [g["model"], g["task"]] + ([g["part"]] if by_part else []) + [g["method"], str(g["length"]), str(g["samples"])]
        vs = "-" if g["vs_full"] is None else f"{g['vs_full']:+.1f}" + (f" ± {g['vs_full_ci']:.1f}" if g["vs_full_ci"] is not None else "")
        acc = [_fmt(g["accuracy"], ".1f"), _fmt(g["accuracy_ci"], ".1f"), vs]
        cells += (acc if has_acc else []) + ([_fmt(g["ppl"], ".2f")] if has_ppl else [])
        if not by_part:
            cells += ([_fmt(g["ttft_s"], ".3f")] if timing else []) + [_fmt(g["peak_memory_mb"], ".0f"), _fmt(g["kv_kept"], ".0%"),
                      _fmt(g["tokens_kept"], ".0%"), str(g["errors"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def accuracy_vs_ttft_plot(groups: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Accuracy against mean TTFT, one line per (model, task, method) across lengths; None if nothing to plot."""
    from tokensieve.evaluation.plots import plt, save_figure

    pts = [g for g in groups if g["accuracy"] is not None and g["ttft_s"] is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series: dict[tuple, list[dict]] = defaultdict(list)
    for g in pts:
        series[(g["model"], g["task"], g["method"])].append(g)
    multi_model = len({g["model"] for g in pts}) > 1
    multi_task = len({g["task"] for g in pts}) > 1
    for (model, task, method), gs in sorted(series.items()):
        gs.sort(key=lambda g: g["length"])
        label = method + (f" [{task}]" if multi_task else "") + (f" on {model}" if multi_model else "")
        ax.plot([g["ttft_s"] for g in gs], [g["accuracy"] for g in gs], marker="o", label=label)
        for g in gs:
            ax.annotate(_short(g["length"]), (g["ttft_s"], g["accuracy"]), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("mean time to first token (s, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("accuracy vs TTFT (points labelled with prompt length)", fontsize=9)
    return save_figure(fig, path)


def _short(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def build_report(rows: list[dict[str, Any]], plot_dir: str | Path | None = None, link_base: str | Path | None = None,
                 paired: bool = False, timing: bool = True) -> str:
    """Markdown report (and, with ``plot_dir``, the accuracy-vs-TTFT plot and needle heatmaps).

    Image links are relative to ``link_base`` (the folder the report is written to) when given.
    ``paired`` keeps only the samples every method scored (see :func:`paired_rows`).
    ``timing=False`` leaves out TTFT and the accuracy-vs-TTFT plot (for runs whose methods
    were timed under different load, e.g. several processes sharing one GPU).
    """
    if paired:
        rows = paired_rows(rows)
    groups = summarize(rows)
    parts = ["## Results", "", markdown_table(groups, timing=timing), ""]
    if len({g["length"] for g in groups}) > 1 and any(g["accuracy"] is not None for g in groups):
        pooled = summarize([dict(r, length="all") for r in rows])  # sample keys are unique across lengths
        parts += ["## All lengths pooled", "", markdown_table(pooled, timing=False), ""]
    detail = [g for g in summarize(rows, by_part=True) if g["part"]]
    if detail:
        parts += ["## Accuracy by subtask / dataset", "", markdown_table(detail, by_part=True), ""]
    if plot_dir is not None:
        from tokensieve.evaluation.plots import needle_heatmaps

        plots = [accuracy_vs_ttft_plot(groups, Path(plot_dir) / "accuracy_vs_ttft.png")] if timing else []
        plots = [p for p in plots if p]
        plots += needle_heatmaps(rows, Path(plot_dir))
        if plots:
            parts += ["## Plots", ""] + [f"![{p.stem}]({_link(p, link_base)})" for p in plots] + [""]
    models = sorted({r["model"] for r in rows})
    versions = sorted({(r.get("env") or {}).get("tokensieve", "?") for r in rows})
    parts += [f"{len(rows)} result lines; model(s): {', '.join(models)}; tokensieve {', '.join(versions)}."]
    return "\n".join(parts) + "\n"


def _link(p: Path, base: str | Path | None) -> str:
    if base is not None:
        try:
            return p.resolve().relative_to(Path(base).resolve()).as_posix()
        except ValueError:
            pass
    return p.as_posix()
