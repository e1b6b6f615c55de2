"""Comparison report from result files: markdown tables and an accuracy-vs-TTFT plot.

Groups result lines by (model, task, method with its parameters, length) and
gives, per group: samples, accuracy (mean score, in %) with its 95% interval, the
paired difference to full attention with its 95% interval, perplexity (for ``ppl``
lines: ``exp(sum nll / sum tokens)``), mean TTFT, mean peak memory, and the KV
cache kept after prefill as a share of the prompt (mean over layers and samples).
A second table breaks accuracy down by RULER subtask or LongBench dataset.

Intervals (95%, all in points):

* accuracy, when every score is 0 or 1: the Wilson score interval of the
  proportion (:func:`wilson_interval`), valid at any n (at 2/2 it is
  [34.2, 100.0], not the normal approximation's zero width);
* accuracy with fractional scores (LongBench F1, ROUGE-L, ...): a percentile
  bootstrap of the mean (:func:`bootstrap_interval`);
* the difference to ``full``: a percentile bootstrap of the mean paired
  difference, over the samples both methods scored (pairs resampled together);
* bootstraps use :data:`BOOTSTRAP_RESAMPLES` resamples from a generator seeded
  with :data:`BOOTSTRAP_SEED`, so a report is reproducible; below
  :data:`MIN_SAMPLES_FOR_INTERVAL` samples (pairs) they are not computed and the
  table says "n too small" next to the point estimate.
When a file holds the same cell twice (a retried error), the last successful
line counts. The eval command's summary and ``tokensieve report`` both read
results through :func:`load_results`, so they count the same rows.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from tokensieve.errors import InputError
from tokensieve.evaluation.harness import is_backup, latest_rows, method_labels, read_results, results_files

MB = 1024 * 1024
Z95 = NormalDist().inv_cdf(0.975)
"""Two-sided 95% quantile of the standard normal (1.95996...)."""
MIN_SAMPLES_FOR_INTERVAL = 10
"""Fewest samples (pairs, for the difference to full) for a bootstrap interval; below it the report says "n too small"."""
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
TOO_SMALL = "n too small"

__all__ = [
    "load_results",
    "method_labels",
    "paired_rows",
    "summarize",
    "markdown_table",
    "build_report",
    "wilson_interval",
    "bootstrap_interval",
    "accuracy_interval",
    "MIN_SAMPLES_FOR_INTERVAL",
]


class ResultsWarning(UserWarning):
    """A results file or line that the report skipped."""


def _warn(message: str) -> None:
    warnings.warn(message, ResultsWarning, stacklevel=3)


_NUMBER_FIELDS = (
    "score",
    "nll",
    "tokens",
    "ttft_s",
    "peak_memory_bytes",
    "prompt_tokens",
    "kept_tokens",
    "kv_tokens_prefill",
)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def well_typed(row: dict[str, Any]) -> bool:
    """Whether a result line's fields have the types the report reads (valid JSON can still hold
    ``"score": "high"`` or ``"params": [1]``, which would stop the report half-way)."""
    if not all(isinstance(row.get(k), str) for k in ("model", "task", "method")):
        return False
    if not isinstance(row.get("key"), (str, int)) or isinstance(row.get("key"), bool):
        return False
    if any(k in row and not isinstance(row[k], dict) for k in ("params", "task_config")):
        return False
    if "length" in row and (not isinstance(row["length"], int) or isinstance(row["length"], bool)):
        return False
    meta, env = row.get("meta"), row.get("env")
    if meta is not None and (
        not isinstance(meta, dict)
        or any(meta.get(k) is not None and not isinstance(meta.get(k), str) for k in ("subtask", "dataset"))
    ):
        return False
    if env is not None and (not isinstance(env, dict) or not isinstance(env.get("tokensieve", ""), str)):
        return False
    return all(
        row.get(k) is None or _is_number(row[k]) or (k == "score" and isinstance(row[k], bool)) for k in _NUMBER_FIELDS
    )


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
            got = read_results(f, on_problem=warn)
        except InputError as exc:
            warn(f"{exc}; skipped it")
            continue
        good = [r for r in got if well_typed(r)]
        if len(good) < len(got):
            warn(
                f"skipped {len(got) - len(good)} result line(s) of {f} whose fields have the wrong types "
                f"(e.g. a text score or a list of parameters)"
            )
        rows += good
    return latest_rows(rows)


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (bounds in [0, 1]).

    The interval is the set of proportions ``p`` whose normal test does not reject the
    observed ``successes / n`` at level ``z``; unlike the normal approximation it has
    non-zero width at 0/n and n/n and never leaves [0, 1].
    """
    if n <= 0:
        raise ValueError("the Wilson interval needs at least one sample")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)  # exact bounds at 0/n and n/n, not rounding's 1e-17
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return lo, hi


def bootstrap_interval(
    xs: Sequence[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``xs``: the central ``level`` share of
    the means of ``resamples`` resamples (n draws with replacement), reproducible for a seed.

    With few distinct values (0/1 scores, their paired differences in {-1, 0, 1}) a resample
    is drawn as the multinomial counts of those values, which has the same distribution as
    drawing n indices and is cheaper.
    """
    x = np.asarray(xs, dtype=float)
    n = len(x)
    if n == 0:
        raise ValueError("a bootstrap interval needs at least one value")
    rng = np.random.default_rng(seed)
    values, counts = np.unique(x, return_counts=True)
    means = np.empty(resamples)
    few = len(values) <= 64
    width = len(values) if few else n
    step = max(1, (1 << 22) // width)  # resamples per block: about 4M draws in memory at a time
    for start in range(0, resamples, step):
        k = min(step, resamples - start)
        if few:
            means[start : start + k] = rng.multinomial(n, counts / n, size=k) @ values / n
        else:
            means[start : start + k] = x[rng.integers(0, n, size=(k, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def accuracy_interval(scores: Sequence[float]) -> tuple[float, float] | None:
    """95% interval of the mean score (scores in [0, 1]), bounds in [0, 1].

    Wilson score interval when every score is 0 or 1 (any n >= 1); otherwise the
    percentile bootstrap of the mean, or None below :data:`MIN_SAMPLES_FOR_INTERVAL`
    scores (and for no scores).
    """
    if not scores:
        return None
    if all(s in (0, 1) for s in scores):
        return wilson_interval(sum(scores), len(scores))
    if len(scores) < MIN_SAMPLES_FOR_INTERVAL:
        return None
    return bootstrap_interval(scores)


def _half_width(iv: tuple[float, float] | None) -> float | None:
    return None if iv is None else (iv[1] - iv[0]) / 2


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

    ``accuracy_interval`` is the 95% interval of the accuracy (:func:`accuracy_interval`,
    points); ``vs_full`` the mean paired difference to ``full`` on the samples both scored
    (points), ``vs_full_n`` the number of those pairs and ``vs_full_interval`` the percentile
    bootstrap 95% interval of that mean (None below :data:`MIN_SAMPLES_FOR_INTERVAL` pairs).
    An interval is None where there is no point estimate or n is too small. ``accuracy_ci``
    and ``vs_full_ci`` are half the width of those intervals, for callers that print
    ``±``; the intervals themselves need not be symmetric about the estimate.
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
        full = {
            r.get("key"): r["score"]
            for r in groups.get((model, task, "full", length, part), [])
            if not r.get("error") and r.get("score") is not None
        }
        diffs = [
            100 * (r["score"] - full[r.get("key")]) for r in ok if r.get("score") is not None and r.get("key") in full
        ]
        nll, toks = sum(r.get("nll", 0.0) for r in ok if "nll" in r), sum(r.get("tokens", 0) for r in ok if "nll" in r)
        kv = [
            r["kv_tokens_prefill"] / r["prompt_tokens"]
            for r in ok
            if r.get("kv_tokens_prefill") is not None and r.get("prompt_tokens")
        ]
        kept = [
            r["kept_tokens"] / r["prompt_tokens"]
            for r in ok
            if r.get("kept_tokens") is not None and r.get("prompt_tokens")
        ]
        acc_iv = accuracy_interval(scores)
        acc_iv = None if acc_iv is None else (100 * acc_iv[0], 100 * acc_iv[1])
        paired = label != "full" and bool(diffs)
        diff_iv = bootstrap_interval(diffs) if paired and len(diffs) >= MIN_SAMPLES_FOR_INTERVAL else None
        out.append(
            {
                "model": model,
                "task": task,
                "method": label,
                "length": length,
                "part": part,
                "samples": len(ok),
                "errors": len(rs) - len(ok),
                "accuracy": 100 * sum(scores) / len(scores) if scores else None,
                "accuracy_interval": acc_iv,
                "accuracy_ci": _half_width(acc_iv),
                "vs_full": _mean(diffs) if paired else None,
                "vs_full_n": len(diffs) if paired else 0,
                "vs_full_interval": diff_iv,
                "vs_full_ci": _half_width(diff_iv),
                "ppl": math.exp(nll / toks) if toks else None,
                "ttft_s": _mean([r.get("ttft_s") for r in ok]),
                "peak_memory_mb": (m / MB)
                if (m := _mean([r.get("peak_memory_bytes") for r in ok])) is not None
                else None,
                "kv_kept": _mean(kv),
                "tokens_kept": _mean(kept),
                "prompt_tokens": _mean([r.get("prompt_tokens") for r in ok]),
            }
        )
    out.sort(key=lambda g: (g["model"], g["task"], g["part"], g["length"], g["method"]))
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _interval_cell(iv: tuple[float, float], signed: bool = False) -> str:
    spec = "+.1f" if signed else ".1f"
    return f"[{iv[0]:{spec}}, {iv[1]:{spec}}]"


def _accuracy_cells(g: dict[str, Any]) -> list[str]:
    if g["accuracy"] is None:
        acc_iv = "-"
    else:
        acc_iv = TOO_SMALL if g.get("accuracy_interval") is None else _interval_cell(g["accuracy_interval"])
    if g["vs_full"] is None:
        vs = "-"
    elif g.get("vs_full_interval") is None:
        vs = f"{g['vs_full']:+.1f} ({TOO_SMALL}: n = {g.get('vs_full_n', 0)})"
    else:
        vs = f"{g['vs_full']:+.1f} {_interval_cell(g['vs_full_interval'], signed=True)}"
    return [_fmt(g["accuracy"], ".1f"), acc_iv, vs]


def markdown_table(groups: list[dict[str, Any]], by_part: bool = False, timing: bool = True) -> str:
    """Markdown table of :func:`summarize`'s groups; intervals as ``[lo, hi]`` (95%, points)."""
    has_ppl = any(g["ppl"] is not None for g in groups)
    has_acc = any(g["accuracy"] is not None for g in groups)
    cols = ["model", "task"] + (["subtask"] if by_part else []) + ["method", "length", "n"]
    cols += (["accuracy %", "95% interval", "vs full (paired) [95%]"] if has_acc else []) + (["ppl"] if has_ppl else [])
    if not by_part:
        cols += (["TTFT s"] if timing else []) + ["peak MiB", "KV kept", "tokens kept", "errors"]
    lines = [
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---:" if c not in ("model", "task", "subtask", "method") else "---" for c in cols) + "|",
    ]
    for g in groups:
        cells = (
            [g["model"], g["task"]]
            + ([g["part"]] if by_part else [])
            + [g["method"], str(g["length"]), str(g["samples"])]
        )
        cells += (_accuracy_cells(g) if has_acc else []) + ([_fmt(g["ppl"], ".2f")] if has_ppl else [])
        if not by_part:
            cells += ([_fmt(g["ttft_s"], ".3f")] if timing else []) + [
                _fmt(g["peak_memory_mb"], ".0f"),
                _fmt(g["kv_kept"], ".0%"),
                _fmt(g["tokens_kept"], ".0%"),
                str(g["errors"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


INTERVALS_NOTE = (
    f"95% intervals, in points: accuracy: Wilson score interval for 0/1 scores, percentile bootstrap of the mean "
    f"for fractional scores; vs full: percentile bootstrap of the mean paired difference on the samples both scored "
    f'({BOOTSTRAP_RESAMPLES:,} resamples, seed {BOOTSTRAP_SEED}). "{TOO_SMALL}": fewer than '
    f"{MIN_SAMPLES_FOR_INTERVAL} samples (pairs) for a bootstrap."
)


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
            ax.annotate(
                _short(g["length"]), (g["ttft_s"], g["accuracy"]), textcoords="offset points", xytext=(3, 3), fontsize=7
            )
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


def build_report(
    rows: list[dict[str, Any]],
    plot_dir: str | Path | None = None,
    link_base: str | Path | None = None,
    paired: bool = False,
    timing: bool = True,
) -> str:
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
    if any(g["accuracy"] is not None for g in groups):
        parts += [INTERVALS_NOTE, ""]
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
