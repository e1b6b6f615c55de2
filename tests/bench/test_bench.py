"""`tokensieve bench` on the CPU with a tiny shape: what it measures and what it writes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokensieve import cli
from tokensieve.bench import roofline
from tokensieve.bench.roofline import copy_bandwidth, decode_step_bytes, median, p90, roofline_step_s
from tokensieve.bench.timing import SHAPES, build_model, run_batch_bench, run_bench
from tokensieve.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


def _tiny_bytes() -> tuple[int, int]:
    """Hand count for the tiny shape in float32: (bytes of every weight, bytes of one position's K+V over all layers)."""
    c = SHAPES["tiny"]
    h, inter, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    head_dim = h // c["num_attention_heads"]
    kv_dim = c["num_key_value_heads"] * head_dim
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * inter + 2 * h  # q, o; k, v; gate, up, down; two RMSNorms
    params = vocab * h + layers * per_layer + h + vocab * h  # embedding, layers, final norm, untied head
    return params * 4, layers * 2 * kv_dim * 4


def test_run_bench_rows_and_kv_bytes():
    methods = {"full": {"method": "full"}, "gem": {"method": "gemfilter", "topk": 32, "filter_layer": 1}}
    res = run_bench(
        "tiny",
        [64, 128],
        methods,
        dtype=torch.float32,
        device="cpu",
        repeats=2,
        decode_tokens=3,
        warmup_length=16,
        progress=False,
    )
    cfg = SHAPES["tiny"]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * 4  # K+V, float32
    assert [(r["label"], r["length"]) for r in res["rows"]] == [("full", 64), ("gem", 64), ("full", 128), ("gem", 128)]
    for r in res["rows"]:
        assert r["status"] == "ok" and len(r["ttft_runs"]) == 2 and r["ttft_s"] > 0
        assert r["decode_tokens_per_s"] > 0
        kept = r["length"] if r["label"] == "full" else 32
        assert r["kept_tokens"] == kept and r["kv_tokens_prefill"] == kept and r["kv_kept"] == kept
        assert r["kv_bytes_prefill"] == kept * per_token
    assert res["weights_bytes"] == sum(p.numel() * 4 for p in build_model("tiny", torch.float32, "cpu").parameters())


def test_failed_cell_is_recorded_and_sweep_goes_on():
    methods = {"bad": {"method": "gemfilter", "filter_layer": 99}, "full": {"method": "full"}}
    res = run_bench(
        "tiny",
        [32],
        methods,
        dtype=torch.float32,
        device="cpu",
        repeats=1,
        decode_tokens=0,
        warmup_length=16,
        progress=False,
    )
    bad, full = res["rows"]
    assert bad["status"].startswith("error: InputError") and "filter_layer" in bad["status"]
    assert full["status"] == "ok"


def test_bench_cli_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = cli.main(
        [
            "bench",
            "--shape",
            "tiny",
            "--lengths",
            "64",
            "--methods",
            "full,gemfilter",
            "--topk",
            "16",
            "--filter-layer",
            "1",
            "--repeats",
            "1",
            "--decode-tokens",
            "2",
            "--answer-tokens",
            "4",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert {r["label"] for r in data["rows"]} == {"full", "gemfilter"}
    assert data["answer_tokens"] == 4 and data["bandwidth_gb_s"] > 0
    assert all(r["e2e_s"] > r["ttft_s"] and r["roofline_fraction"] > 0 for r in data["rows"])
    assert out.with_suffix(".png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert (
        "gemfilter" in printed and "p90 ms" in printed and "e2e: TTFT + 3 decoding steps, a 4-token answer" in printed
    )
    full = next(line.split() for line in printed.splitlines() if line.split()[:2] == ["full", "64"])
    row = next(r for r in data["rows"] if r["label"] == "full")
    assert full[-1] == f"{row['e2e_s']:.3f}" and full[-4] == f"{row['decode_step_median_s'] * 1e3:.2f}"


def test_bench_cli_bad_input(capsys):
    assert cli.main(["bench", "--shape", "nope", "--device", "cpu"]) == 2
    assert "unknown shape" in capsys.readouterr().err
    assert cli.main(["bench", "--shape", "tiny", "--repeats", "0", "--device", "cpu"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["bench", "--lengths", "0"])


def test_batch_bench_rows_and_ratios():
    methods = {"full": {"method": "full"}, "gem": {"method": "gemfilter", "topk": 16, "filter_layer": 1}}
    res = run_batch_bench(
        "tiny",
        [48],
        [1, 3],
        methods,
        dtype=torch.float32,
        device="cpu",
        decode_tokens=4,
        warmup_length=16,
        progress=False,
    )
    assert [(r["label"], r["batch"]) for r in res["rows"]] == [("full", 1), ("full", 3), ("gem", 1), ("gem", 3)]
    for r in res["rows"]:
        assert r["status"] == "ok" and r["length"] == 48
        assert r["generated_tokens"] == 4 * r["batch"]  # no EOS: every row answers decode_tokens tokens
        assert r["decode_tokens_per_s"] > 0 and r["e2e_tokens_per_s"] > 0
        assert r["kept_tokens"] == (48 if r["label"] == "full" else 16)
        assert r["details"]["batch_size"] == r["batch"]
        assert (r["speedup_vs_batch1"] is None) == (r["batch"] == 1)
    gem3 = res["rows"][3]
    assert gem3["speedup_vs_batch1"] == pytest.approx(
        gem3["decode_tokens_per_s"] / res["rows"][2]["decode_tokens_per_s"]
    )


def test_bench_cli_batches(tmp_path, capsys):
    out = tmp_path / "batch.json"
    rc = cli.main(
        [
            "bench",
            "--shape",
            "tiny",
            "--lengths",
            "40",
            "--batches",
            "1,2",
            "--methods",
            "full,snapkv",
            "--param",
            "budget=16",
            "--param",
            "window_size=8",
            "--decode-tokens",
            "3",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert [(r["label"], r["batch"], r["status"]) for r in data["rows"]] == [
        ("full", 1, "ok"),
        ("full", 2, "ok"),
        ("snapkv", 1, "ok"),
        ("snapkv", 2, "ok"),
    ]
    assert "vs batch 1" in capsys.readouterr().out
    assert (
        cli.main(
            [
                "bench",
                "--shape",
                "tiny",
                "--lengths",
                "40",
                "--batches",
                "2",
                "--methods",
                "h2o",
                "--decode-tokens",
                "3",
                "--device",
                "cpu",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )  # a failed cell is recorded
    assert "h2o runs one prompt at a time" in capsys.readouterr().out


def test_percentiles_and_step_bytes_by_hand():
    xs = [0.5, 0.1, 0.4, 0.2, 0.3, 0.9, 0.8, 0.6, 0.7, 1.0]
    assert median(xs) == pytest.approx(0.55)
    assert p90(xs) == 0.9  # nearest rank below: sorted[int(0.9 * 9)], a measured value
    assert p90([2.0]) == median([2.0]) == 2.0
    # three steps over a cache of 200 bytes growing by 10 a step: they attend 210, 220, 230 -> mean 220
    assert decode_step_bytes(1000, 200, 10, 3) == 1000 + 220
    assert decode_step_bytes(1000, 200, 0, 7) == 1200  # a cache evicting to its budget does not grow
    assert roofline_step_s(1220, 610.0) == pytest.approx(2.0)
    with pytest.raises(InputError, match="steps must be >= 1, got 0"):
        decode_step_bytes(1000, 200, 10, 0)
    with pytest.raises(InputError, match="bandwidth"):
        roofline_step_s(1, 0)
    with pytest.raises(InputError):
        p90([])


def test_copy_bandwidth_cpu_is_a_positive_rate():
    bw = copy_bandwidth("cpu", gib=1 / 64, repeats=4, warmup=1)
    assert 1e8 < bw < 1e13  # bytes/s: between 0.1 GB/s and 10 TB/s on any CPU
    with pytest.raises(InputError, match="repeats must exceed warmup"):
        copy_bandwidth("cpu", gib=1 / 64, repeats=2, warmup=2)


def test_run_bench_roofline_p90_and_e2e():
    steps, answer, k, budget = 5, 9, 16, 24
    methods = {
        "full": {"method": "full"},
        "gem": {"method": "gemfilter", "topk": k, "filter_layer": 1},
        "snap": {"method": "snapkv", "budget": budget, "window_size": 8},
        "h2o": {"method": "h2o", "budget": budget},
    }
    n = 96
    res = run_bench(
        "tiny",
        [n],
        methods,
        dtype=torch.float32,
        device="cpu",
        repeats=2,
        decode_tokens=steps,
        warmup_length=16,
        progress=False,
        answer_tokens=answer,
    )
    bw = res["bandwidth_gb_s"] * 1e9
    assert bw > 0 and res["answer_tokens"] == answer
    weights, per_pos = _tiny_bytes()
    assert res["weights_bytes"] == weights
    rows = {r["label"]: r for r in res["rows"]}
    for r in rows.values():
        assert r["status"] == "ok"
        med, hi = r["decode_step_median_s"], r["decode_step_p90_s"]
        assert 0 < med <= hi <= r["details"]["decode_step_s"]["max"]
        assert r["decode_tokens_per_s"] == pytest.approx(1 / med)
        assert r["roofline_step_s"] == pytest.approx(r["roofline_step_bytes"] / bw)
        assert r["roofline_fraction"] == pytest.approx(r["roofline_step_s"] / med)
        # measured in the last TTFT run: its own TTFT plus answer - 1 real steps, each > 0
        assert r["e2e_s"] > r["ttft_runs"][-1]
    # the bytes follow each method's cache: full grows from n entries, GemFilter from k, SnapKV from its
    # budget (one entry a step); H2O evicts back to its budget every step
    grow = per_pos * (steps + 1) / 2
    assert rows["full"]["roofline_step_bytes"] == weights + n * per_pos + grow
    assert rows["gem"]["roofline_step_bytes"] == weights + k * per_pos + grow
    assert rows["snap"]["roofline_step_bytes"] == weights + budget * per_pos + grow
    assert rows["h2o"]["roofline_step_bytes"] == weights + budget * per_pos
    assert (
        rows["gem"]["roofline_step_bytes"] < rows["snap"]["roofline_step_bytes"] < rows["full"]["roofline_step_bytes"]
    )


def test_e2e_counts_only_the_answer_and_zero_skips():
    methods = {"full": {"method": "full"}}
    # a longer decode than the answer: e2e takes the answer's 2 steps, not all 6
    res = run_bench(
        "tiny",
        [32],
        methods,
        dtype=torch.float32,
        device="cpu",
        repeats=1,
        decode_tokens=6,
        warmup_length=16,
        progress=False,
        answer_tokens=3,
        bandwidth_Bps=1e9,
    )
    r = res["rows"][0]
    step = r["details"]["decode_step_s"]
    assert 2 * step["min"] * 0.999 <= r["e2e_s"] - r["ttft_s"] <= 2 * step["max"] * 1.001
    # no decode figures without decode_tokens; a one-token answer is its first token
    res = run_bench(
        "tiny",
        [32],
        methods,
        dtype=torch.float32,
        device="cpu",
        repeats=1,
        decode_tokens=0,
        warmup_length=16,
        progress=False,
        answer_tokens=1,
    )
    r = res["rows"][0]
    assert r["e2e_s"] == r["ttft_s"] == r["ttft_runs"][0]
    assert r["decode_step_median_s"] is None and r["roofline_fraction"] is None and res["bandwidth_gb_s"] is None
    res = run_bench(
        "tiny",
        [32],
        methods,
        dtype=torch.float32,
        device="cpu",
        repeats=1,
        decode_tokens=2,
        warmup_length=16,
        progress=False,
        bandwidth_Bps=1e9,
    )
    r = res["rows"][0]
    assert r["e2e_s"] is None and res["answer_tokens"] == 0 and res["bandwidth_gb_s"] == 1.0
    with pytest.raises(InputError, match="answer_tokens must be an integer >= 0"):
        run_bench("tiny", [32], methods, device="cpu", answer_tokens=-1)


def test_bench_cli_answer_tokens_bad_values(capsys):
    for bad in ("-1", "x"):
        with pytest.raises(SystemExit) as exc:
            cli.main(["bench", "--shape", "tiny", "--answer-tokens", bad, "--device", "cpu"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--answer-tokens" in err and repr(bad) in err
    assert cli.main(["bench", "--shape", "tiny", "--batches", "1", "--answer-tokens", "8", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--answer-tokens 8 does not apply with --batches" in err


def test_decode_bench_uses_the_library_rules():
    spec = importlib.util.spec_from_file_location("decode_bench", ROOT / "benchmarks" / "decode_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # imports only: main() runs under __name__ == "__main__"
    assert mod.copy_bandwidth is roofline.copy_bandwidth and mod.p90 is roofline.p90
    assert mod.decode_step_bytes is roofline.decode_step_bytes
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decode_bench.py"), "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--tokens" in out.stdout and "--batches" in out.stdout


def test_cold_run_is_reported_apart_from_the_timed_runs(monkeypatch):
    """Each cell's first run (compiles and captures for a new length) is kept out of the median TTFT."""
    import tokensieve.bench.timing as bench_mod

    ttfts = iter([9.0, 1.0, 2.0, 3.0])  # the cold run is slow; the three timed runs are not
    real = bench_mod.generate

    def fake(*a, **kw):
        r = real(*a, **kw)
        r.ttft_s = next(ttfts)
        return r

    monkeypatch.setattr(bench_mod, "generate", fake)
    model = build_model("tiny", torch.float32, "cpu")
    row = bench_mod.bench_method(model, bench_mod.make_method("full"), 32, repeats=3, decode_tokens=2, cold_run=True)
    assert row.ttft_cold_s == 9.0 and row.ttft_runs == [1.0, 2.0, 3.0] and row.ttft_s == 2.0
    ttfts = iter([1.0, 2.0, 3.0])
    row = bench_mod.bench_method(model, bench_mod.make_method("full"), 32, repeats=3, decode_tokens=2)
    assert row.ttft_cold_s is None and row.ttft_runs == [1.0, 2.0, 3.0]


def test_bench_cli_cold_runs_by_default(tmp_path):
    for flag, cold in (([], True), (["--no-cold-run"], False)):
        out = tmp_path / f"c{cold}.json"
        assert (
            cli.main(
                [
                    "bench",
                    "--shape",
                    "tiny",
                    "--lengths",
                    "48",
                    "--methods",
                    "full",
                    "--repeats",
                    "1",
                    "--decode-tokens",
                    "1",
                    "--answer-tokens",
                    "0",
                    "--device",
                    "cpu",
                    "--dtype",
                    "float32",
                    "--out",
                    str(out),
                    *flag,
                ]
            )
            == 0
        )
        (row,) = json.loads(out.read_text())["rows"]
        assert (row["ttft_cold_s"] is not None) == cold


def test_bench_cli_compile_fuses_the_captured_steps(tmp_path, monkeypatch, capsys):
    """--compile reaches the decoders (DecoderPool(compile=True)) and the JSON; with --batches it is refused."""
    import tokensieve.bench.timing as bench_mod

    made = []
    real = bench_mod.DecoderPool

    def pool(model, **kw):
        made.append(kw)
        return real(model, **kw | {"compile": False})  # (inductor on the CPU would take minutes)

    monkeypatch.setattr(bench_mod, "DecoderPool", pool)
    for flag, compiled in (([], False), (["--compile"], True)):
        out = tmp_path / f"c{compiled}.json"
        assert (
            cli.main(
                [
                    "bench",
                    "--shape",
                    "tiny",
                    "--lengths",
                    "48",
                    "--methods",
                    "full",
                    "--repeats",
                    "1",
                    "--decode-tokens",
                    "1",
                    "--answer-tokens",
                    "0",
                    "--device",
                    "cpu",
                    "--dtype",
                    "float32",
                    "--no-cold-run",
                    "--out",
                    str(out),
                    *flag,
                ]
            )
            == 0
        )
        assert json.loads(out.read_text())["compile"] is compiled and made[-1] == {"compile": compiled}
    assert cli.main(["bench", "--shape", "tiny", "--batches", "1,2", "--compile", "--device", "cpu"]) == 2
    assert "--compile does not apply with --batches" in capsys.readouterr().err


def test_e2e_bars_merge_runs_and_refuse_results_without_e2e(tmp_path):
    from tokensieve.evaluation.plots import e2e_bars

    def result(n, labels):
        rows = [
            {"label": lab, "length": n, "status": "ok", "ttft_s": 0.5 + i, "e2e_s": 2.0 + i}
            for i, lab in enumerate(labels)
        ]
        return {"shape": "tiny", "dtype": "float32", "answer_tokens": 8, "environment": {"cpu": "x"}, "rows": rows}

    path = e2e_bars([result(32, ["full", "gemfilter"]), result(64, ["full"])], tmp_path / "bars.png")
    assert path.stat().st_size > 1000
    bad = result(32, ["full"])
    bad["rows"][0]["e2e_s"] = None
    with pytest.raises(ValueError, match="no row with an end-to-end latency"):
        e2e_bars([bad], tmp_path / "none.png")


def test_build_model_cuts_the_decoder_stack_to_layers_and_bounds_it():
    from tokensieve.bench.timing import shape_config
    from tokensieve.errors import InputError

    whole = shape_config("tiny").num_hidden_layers
    cut = build_model("tiny", torch.float32, "cpu", layers=1)
    assert whole > 1 and cut.config.num_hidden_layers == 1 and len(cut.model.layers) == 1
    same = build_model("tiny", torch.float32, "cpu")
    assert len(same.model.layers) == whole
    with pytest.raises(InputError, match="layers"):
        shape_config("tiny", layers=0)
