"""The report reproduces the numbers of a small hand-written results file."""

from __future__ import annotations

import json
import math
import random

import pytest

from tokensieve.cli import main
from tokensieve.evaluation.report import (
    MIN_SAMPLES_FOR_INTERVAL,
    ResultsWarning,
    accuracy_interval,
    bootstrap_interval,
    build_report,
    load_results,
    markdown_table,
    method_labels,
    summarize,
    wilson_interval,
)

MB = 1024 * 1024
Z = 1.959963984540054  # standard normal 97.5% quantile


def wilson(k, n):
    """The Wilson interval as the two roots p of (k/n - p)^2 = Z^2 p (1 - p) / n (a quadratic in p)."""
    ph, c = k / n, Z * Z / n
    a, b, cc = 1 + c, -(2 * ph + c), ph * ph
    disc = math.sqrt(b * b - 4 * a * cc)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


def cell(k, n):
    lo, hi = wilson(k, n)
    return f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def line(method, length, score, ttft, mem_mb, kv, prompt=1000, params=None, key="k", task="ruler", **extra):
    return {
        "task": task,
        "task_config": {"seed": 0},
        "model": "m",
        "key": key,
        "length": length,
        "method": method,
        "params": params or {},
        "score": score,
        "ttft_s": ttft,
        "peak_memory_bytes": None if mem_mb is None else mem_mb * MB,
        "kv_tokens_prefill": kv,
        "kept_tokens": kv,
        "prompt_tokens": prompt,
        "meta": {"subtask": key.split("/")[0]},
    } | extra


@pytest.fixture
def results(tmp_path):
    rows = [
        line("full", 1024, 1.0, 0.2, 100, 1000, key="niah/0"),
        line("full", 1024, 0.5, 0.4, 120, 1000, key="niah/1"),
        line("gemfilter", 1024, 0.0, 0.1, 50, 250, params={"topk": 256}, key="niah/0"),
        line("gemfilter", 1024, 1.0, 0.1, 70, 250, params={"topk": 256}, key="niah/1"),
        line("gemfilter", 1024, None, None, None, None, params={"topk": 256}, key="vt/0", error="ValueError: x"),
        line("gemfilter", 1024, 1.0, 0.3, 60, 250, params={"topk": 256}, key="vt/0"),  # the retry succeeded
    ]
    f = tmp_path / "ruler.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"task": "ruler", "key": "cut off')
    return tmp_path


def test_summary_numbers(results):
    with pytest.warns(ResultsWarning, match="skipped 1 corrupt line"):  # the half line is skipped, and said so
        rows = load_results([results])
    assert len(rows) == 5  # the error line is superseded by its retry
    g = {x["method"]: x for x in summarize(rows)}
    assert g["full"]["samples"] == 2 and g["full"]["accuracy"] == pytest.approx(75.0)
    assert g["full"]["ttft_s"] == pytest.approx(0.3) and g["full"]["peak_memory_mb"] == pytest.approx(110)
    assert g["full"]["kv_kept"] == pytest.approx(1.0)
    assert g["gemfilter"]["samples"] == 3 and g["gemfilter"]["accuracy"] == pytest.approx(200 / 3)
    assert g["gemfilter"]["ttft_s"] == pytest.approx(0.5 / 3) and g["gemfilter"]["kv_kept"] == pytest.approx(0.25)
    md = markdown_table(summarize(rows))
    # full's scores 1.0 and 0.5 are fractional: a bootstrap, and 2 samples are too few for it
    assert "| m | ruler | full | 1024 | 2 | 75.0 | n too small | - | 0.300 | 110 | 100% | 100% | 0 |" in md
    # gemfilter's 0/1 scores: Wilson at 2/3; its difference to full is over 2 pairs (niah/0, niah/1)
    assert (
        f"| m | ruler | gemfilter | 1024 | 3 | 66.7 | {cell(2, 3)} | -25.0 (n too small: n = 2) | 0.167 | 60 | 25% | 25% | 0 |"
        in md
    )
    assert "±" not in md
    parts = {(x["method"], x["part"]): x["accuracy"] for x in summarize(rows, by_part=True)}
    assert parts[("gemfilter", "niah")] == pytest.approx(50.0) and parts[("gemfilter", "vt")] == pytest.approx(100.0)


def test_labels_show_varying_params():
    rows = [
        line("gemfilter", 1, 1, 1, 1, 1, params={"topk": 256, "scoring": "window"}),
        line("gemfilter", 1, 1, 1, 1, 1, params={"topk": 512, "scoring": "window"}),
        line("full", 1, 1, 1, 1, 1),
    ]
    assert sorted(method_labels(rows).values()) == ["full", "gemfilter(topk=256)", "gemfilter(topk=512)"]


def test_perplexity_aggregate(tmp_path):
    rows = [
        line("full", 128, None, 0.1, 1, 100, task="ppl", key="decode/128/0", nll=10.0, tokens=10),
        line("full", 128, None, 0.1, 1, 100, task="ppl", key="decode/128/1", nll=30.0, tokens=10),
    ]
    (g,) = summarize(rows)
    assert g["ppl"] == pytest.approx(2.718281828**2) and g["accuracy"] is None


def test_report_command_writes_markdown_and_plots(results, tmp_path, capsys):
    assert main(["report", str(results)]) == 0
    out = capsys.readouterr().out
    assert "| m | ruler | full | 1024 | 2 | 75.0 | n too small |" in out and "accuracy_vs_ttft" in out
    assert (results / "plots" / "accuracy_vs_ttft.png").stat().st_size > 1000
    assert main(["report", str(results), "--out", str(tmp_path / "r" / "report.md"), "--no-plots"]) == 0
    assert "## Accuracy by subtask" in (tmp_path / "r" / "report.md").read_text()
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_needle_heatmaps_from_report(tmp_path):
    rows = [
        line("full", n, float(d < 0.5), 0.1, 1, 100, task="needle", key=f"{n}/{d}", meta={"depth": d})
        for n in (1024, 2048)
        for d in (0.0, 0.5, 1.0)
    ]
    md = build_report(rows, tmp_path / "plots", link_base=tmp_path)
    assert "(plots/needle_m_full.png)" in md and (tmp_path / "plots" / "needle_m_full.png").exists()


def test_paired_comparison_uses_the_samples_every_method_scored():
    rows = [
        line("full", 1024, 1.0, 0.1, 1, 100, key="a"),
        line("full", 1024, 1.0, 0.1, 1, 100, key="b"),
        line("full", 1024, 0.0, 0.1, 1, 100, key="c"),
        line("snapkv", 1024, 0.0, 0.1, 1, 100, key="a"),
        line("snapkv", 1024, 1.0, 0.1, 1, 100, key="b"),
    ]
    g = {x["method"]: x for x in summarize(rows)}
    assert g["full"]["accuracy"] == pytest.approx(200 / 3) and g["snapkv"]["accuracy"] == pytest.approx(50)
    # paired difference on a and b only: (0 - 1 + 1 - 1) / 2 = -0.5, over 2 pairs: too few for an interval
    assert g["snapkv"]["vs_full"] == pytest.approx(-50) and g["snapkv"]["vs_full_n"] == 2
    assert g["snapkv"]["vs_full_interval"] is None and g["snapkv"]["vs_full_ci"] is None
    from tokensieve.evaluation.report import paired_rows

    p = {x["method"]: x for x in summarize(paired_rows(rows))}
    assert p["full"]["samples"] == 2 and p["full"]["accuracy"] == pytest.approx(100)
    md = build_report(rows, paired=True)
    # 2/2 correct: the normal approximation printed "100.0 ± 0.0"; Wilson's interval is wide
    assert f"| m | ruler | full | 1024 | 2 | 100.0 | {cell(2, 2)} |" in md and "± 0.0" not in md
    assert wilson(2, 2)[0] < 0.4
    assert "| -50.0 (n too small: n = 2) |" in md


def test_report_without_timing_has_no_ttft_column_or_plot(results, tmp_path):
    md = build_report(
        load_results([results], warn=lambda message: None), tmp_path / "plots", link_base=tmp_path, timing=False
    )
    assert "| m | ruler | full | 1024 | 2 | 75.0 | n too small | - | 110 | 100% | 100% | 0 |" in md and "TTFT" not in md
    assert not (tmp_path / "plots" / "accuracy_vs_ttft.png").exists()


def test_report_pools_all_lengths():
    rows = [
        line("full", 1024, 1.0, 0.1, 1, 100, key="1k/a"),
        line("full", 2048, 0.0, 0.1, 1, 100, key="2k/a"),
        line("gemfilter", 1024, 1.0, 0.1, 1, 100, key="1k/a"),
        line("gemfilter", 2048, 1.0, 0.1, 1, 100, key="2k/a"),
    ]
    md = build_report(rows)
    pooled = md.split("## All lengths pooled")[1]
    assert f"| m | ruler | full | all | 2 | 50.0 | {cell(1, 2)} | - |" in pooled
    assert f"| m | ruler | gemfilter | all | 2 | 100.0 | {cell(2, 2)} | +50.0 (n too small: n = 2) |" in pooled


@pytest.mark.parametrize("k", [0, 1, 5, 9, 10])
def test_wilson_interval_at_known_values(k):
    lo, hi = wilson_interval(k, 10)
    want = wilson(k, 10)
    assert lo == pytest.approx(max(0.0, want[0]), abs=1e-12) and hi == pytest.approx(min(1.0, want[1]), abs=1e-12)
    assert lo < k / 10 < hi or (k == 0 and lo == 0.0 < hi) or (k == 10 and lo < hi == 1.0)
    if k == 5:  # symmetric about 1/2 and narrower than the normal approximation's 0.5 +- 0.31
        assert lo + hi == pytest.approx(1.0) and hi - lo < 2 * Z * math.sqrt(0.25 / 10)


def test_accuracy_interval_picks_wilson_for_0_1_scores_and_bootstrap_otherwise():
    assert accuracy_interval([1.0, 0.0, 1]) == wilson_interval(2, 3)
    assert accuracy_interval([]) is None
    few = [0.5] * (MIN_SAMPLES_FOR_INTERVAL - 1)
    assert accuracy_interval(few) is None  # fractional scores below the threshold: n too small
    scores = [(i % 7) / 6 for i in range(60)]
    assert accuracy_interval(scores) == bootstrap_interval(scores)


@pytest.mark.parametrize(
    "values", [[-1.0, 0.0, 0.0, 1.0, 1.0], [i / 97 for i in range(97)]], ids=["few-values", "many-values"]
)
def test_bootstrap_interval_contains_the_mean_narrows_with_n_and_is_reproducible(values):
    widths = []
    for reps in (1, 4, 16):
        xs = values * reps
        mean = sum(xs) / len(xs)
        lo, hi = bootstrap_interval(xs)
        assert lo < mean < hi
        assert bootstrap_interval(xs) == (lo, hi)  # fixed seed
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
        # the bootstrap distribution of the mean is close to normal with sd / sqrt(n) at these n
        assert hi - lo == pytest.approx(2 * Z * sd / math.sqrt(len(xs)), rel=0.15)
        widths.append(hi - lo)
    assert widths[0] > 1.6 * widths[1] > 1.6 * 1.6 * widths[2]  # about halves with 4x the samples


def test_paired_interval_and_n_too_small_threshold():
    def rows(n):
        r = random.Random(n)
        out = []
        for i in range(n):
            f, s = float(r.random() < 0.8), float(r.random() < 0.5)
            out += [
                line("full", 1024, f, 0.1, 1, 100, key=f"k/{i}"),
                line("snapkv", 1024, s, 0.1, 1, 100, key=f"k/{i}"),
            ]
        return out

    small = {g["method"]: g for g in summarize(rows(MIN_SAMPLES_FOR_INTERVAL - 1))}["snapkv"]
    assert small["vs_full"] is not None and small["vs_full_interval"] is None
    assert f"({'n too small'}: n = {MIN_SAMPLES_FOR_INTERVAL - 1})" in markdown_table([small])
    for n in (MIN_SAMPLES_FOR_INTERVAL, 200):
        rs = rows(n)
        g = {x["method"]: x for x in summarize(rs)}["snapkv"]
        full = {r["key"]: r["score"] for r in rs if r["method"] == "full"}
        diffs = [100 * (r["score"] - full[r["key"]]) for r in rs if r["method"] == "snapkv"]
        assert g["vs_full"] == pytest.approx(sum(diffs) / n) and g["vs_full_n"] == n
        lo, hi = g["vs_full_interval"]
        assert lo <= g["vs_full"] <= hi and g["vs_full_interval"] == bootstrap_interval(diffs)
        assert g["vs_full_ci"] == pytest.approx((hi - lo) / 2)
        assert f"{g['vs_full']:+.1f} [{lo:+.1f}, {hi:+.1f}]" in markdown_table(
            [g]
        ) and "n too small" not in markdown_table([g])


def test_lines_with_wrong_field_types_are_skipped_with_the_warning(results, capsys):
    """Valid JSON result lines whose fields have the wrong types are skipped and counted, not fatal."""
    f = results / "ruler.jsonl"
    bad = [
        line("full", 1024, "high", 0.2, 100, 1000, key="niah/2"),
        line("full", 1024, 1.0, 0.2, 100, 1000, key="niah/3") | {"params": [1]},
        line("full", "1k", 1.0, 0.2, 100, 1000, key="niah/4"),
        line("full", 1024, 1.0, 0.2, 100, 1000, key="niah/5") | {"model": 5},
        line("full", 1024, 1.0, "fast", 100, 1000, key="niah/6"),
        line("full", 1024, 1.0, 0.2, 100, 1000, key="niah/7") | {"key": ["niah/7"]},
        line("full", 1024, 1.0, 0.2, 100, 1000, key="niah/8") | {"meta": "x"},
        line("full", 1024, 1.0, 0.2, 100, 1000, key="niah/9") | {"env": ["x"]},
    ]
    f.write_text(f.read_text() + "\n" + "\n".join(json.dumps(r) for r in bad) + "\n")
    seen: list[str] = []
    rows = load_results([results], warn=seen.append)
    assert len(rows) == 5 and any(f"skipped {len(bad)} result line(s)" in m and "wrong types" in m for m in seen), seen
    assert {x["method"]: x["samples"] for x in summarize(rows)} == {"full": 2, "gemfilter": 3}
    assert main(["report", str(results), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert f"tokensieve report: warning: skipped {len(bad)} result line(s)" in err and "Traceback" not in err
