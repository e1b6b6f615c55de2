"""The report reproduces the numbers of a small hand-written results file."""

from __future__ import annotations

import json

import pytest

from tokensieve.cli import main
from tokensieve.evaluation.report import ResultsWarning, build_report, load_results, markdown_table, method_labels, summarize

MB = 1024 * 1024


def line(method, length, score, ttft, mem_mb, kv, prompt=1000, params=None, key="k", task="ruler", **extra):
    return {"task": task, "task_config": {"seed": 0}, "model": "m", "key": key, "length": length, "method": method,
            "params": params or {}, "score": score, "ttft_s": ttft, "peak_memory_bytes": None if mem_mb is None else mem_mb * MB,
            "kv_tokens_prefill": kv, "kept_tokens": kv, "prompt_tokens": prompt, "meta": {"subtask": key.split("/")[0]}} | extra


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
    assert "| m | ruler | full | 1024 | 2 | 75.0 | 49.0 | - | 0.300 | 110 | 100% | 100% | 0 |" in md
    assert "| m | ruler | gemfilter | 1024 | 3 | 66.7 | 65.3 | -25.0 ± 147.0 | 0.167 | 60 | 25% | 25% | 0 |" in md
    parts = {(x["method"], x["part"]): x["accuracy"] for x in summarize(rows, by_part=True)}
    assert parts[("gemfilter", "niah")] == pytest.approx(50.0) and parts[("gemfilter", "vt")] == pytest.approx(100.0)


def test_labels_show_varying_params():
    rows = [line("gemfilter", 1, 1, 1, 1, 1, params={"topk": 256, "scoring": "window"}),
            line("gemfilter", 1, 1, 1, 1, 1, params={"topk": 512, "scoring": "window"}), line("full", 1, 1, 1, 1, 1)]
    assert sorted(method_labels(rows).values()) == ["full", "gemfilter(topk=256)", "gemfilter(topk=512)"]


def test_perplexity_aggregate(tmp_path):
    rows = [line("full", 128, None, 0.1, 1, 100, task="ppl", key="decode/128/0", nll=10.0, tokens=10),
            line("full", 128, None, 0.1, 1, 100, task="ppl", key="decode/128/1", nll=30.0, tokens=10)]
    (g,) = summarize(rows)
    assert g["ppl"] == pytest.approx(2.718281828 ** 2) and g["accuracy"] is None


def test_report_command_writes_markdown_and_plots(results, tmp_path, capsys):
    assert main(["report", str(results)]) == 0
    out = capsys.readouterr().out
    assert "| m | ruler | full | 1024 | 2 | 75.0 | 49.0 |" in out and "accuracy_vs_ttft" in out
    assert (results / "plots" / "accuracy_vs_ttft.png").stat().st_size > 1000
    assert main(["report", str(results), "--out", str(tmp_path / "r" / "report.md"), "--no-plots"]) == 0
    assert "## Accuracy by subtask" in (tmp_path / "r" / "report.md").read_text()
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_needle_heatmaps_from_report(tmp_path):
    rows = [line("full", n, float(d < 0.5), 0.1, 1, 100, task="needle", key=f"{n}/{d}", meta={"depth": d})
            for n in (1024, 2048) for d in (0.0, 0.5, 1.0)]
    md = build_report(rows, tmp_path / "plots", link_base=tmp_path)
    assert "(plots/needle_m_full.png)" in md and (tmp_path / "plots" / "needle_m_full.png").exists()


def test_paired_comparison_uses_the_samples_every_method_scored():
    rows = [line("full", 1024, 1.0, 0.1, 1, 100, key="a"), line("full", 1024, 1.0, 0.1, 1, 100, key="b"),
            line("full", 1024, 0.0, 0.1, 1, 100, key="c"),
            line("snapkv", 1024, 0.0, 0.1, 1, 100, key="a"), line("snapkv", 1024, 1.0, 0.1, 1, 100, key="b")]
    g = {x["method"]: x for x in summarize(rows)}
    assert g["full"]["accuracy"] == pytest.approx(200 / 3) and g["snapkv"]["accuracy"] == pytest.approx(50)
    # paired difference on a and b only: (0 - 1 + 1 - 1) / 2 = -0.5, sd 0.707, n 2
    assert g["snapkv"]["vs_full"] == pytest.approx(-50) and g["snapkv"]["vs_full_ci"] == pytest.approx(1.96 * 50)
    from tokensieve.evaluation.report import paired_rows

    p = {x["method"]: x for x in summarize(paired_rows(rows))}
    assert p["full"]["samples"] == 2 and p["full"]["accuracy"] == pytest.approx(100)
    assert "| m | ruler | full | 1024 | 2 | 100.0 | 0.0 |" in build_report(rows, paired=True)


def test_report_without_timing_has_no_ttft_column_or_plot(results, tmp_path):
    md = build_report(load_results([results], warn=lambda message: None), tmp_path / "plots", link_base=tmp_path, timing=False)
    assert "| m | ruler | full | 1024 | 2 | 75.0 | 49.0 | - | 110 | 100% | 100% | 0 |" in md and "TTFT" not in md
    assert not (tmp_path / "plots" / "accuracy_vs_ttft.png").exists()


def test_report_pools_all_lengths():
    rows = [line("full", 1024, 1.0, 0.1, 1, 100, key="1k/a"), line("full", 2048, 0.0, 0.1, 1, 100, key="2k/a"),
            line("gemfilter", 1024, 1.0, 0.1, 1, 100, key="1k/a"), line("gemfilter", 2048, 1.0, 0.1, 1, 100, key="2k/a")]
    md = build_report(rows)
    pooled = md.split("## All lengths pooled")[1]
    assert "| m | ruler | full | all | 2 | 50.0 | 98.0 | - |" in pooled
    assert "| m | ruler | gemfilter | all | 2 | 100.0 | 0.0 | +50.0 ± 98.0 |" in pooled
