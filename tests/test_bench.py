"""`tokensieve bench` on the CPU with a tiny shape: what it measures and what it writes."""

from __future__ import annotations

import json

import pytest
import torch

from tokensieve import cli
from tokensieve.bench import SHAPES, build_model, run_batch_bench, run_bench


def test_run_bench_rows_and_kv_bytes():
    methods = {"full": {"method": "full"}, "gem": {"method": "gemfilter", "topk": 32, "filter_layer": 1}}
    res = run_bench("tiny", [64, 128], methods, dtype=torch.float32, device="cpu", repeats=2, decode_tokens=3,
                    warmup_length=16, progress=False)
    cfg = SHAPES["tiny"]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * 4  # K+V, float32
    assert [(r["label"], r["length"]) for r in res["rows"]] == [("full", 64), ("gem", 64), ("full", 128), ("gem", 128)]
    for r in res["rows"]:
        assert r["status"] == "ok" and len(r["ttft_runs"]) == 2 and r["ttft_s"] > 0
        assert r["decode_tokens_per_s"] > 0
        kept = r["length"] if r["label"] == "full" else 32
        assert r["kept_tokens"] == kept and r["kv_tokens_prefill"] == kept
        assert r["kv_bytes_prefill"] == kept * per_token
    assert res["weights_bytes"] == sum(p.numel() * 4 for p in build_model("tiny", torch.float32, "cpu").parameters())


def test_failed_cell_is_recorded_and_sweep_goes_on():
    methods = {"bad": {"method": "gemfilter", "filter_layer": 99}, "full": {"method": "full"}}
    res = run_bench("tiny", [32], methods, dtype=torch.float32, device="cpu", repeats=1, decode_tokens=0,
                    warmup_length=16, progress=False)
    bad, full = res["rows"]
    assert bad["status"].startswith("error: InputError") and "filter_layer" in bad["status"]
    assert full["status"] == "ok"


def test_bench_cli_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = cli.main(["bench", "--shape", "tiny", "--lengths", "64", "--methods", "full,gemfilter", "--topk", "16",
                   "--filter-layer", "1", "--repeats", "1", "--decode-tokens", "2", "--device", "cpu",
                   "--dtype", "float32", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {r["label"] for r in data["rows"]} == {"full", "gemfilter"}
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "gemfilter" in capsys.readouterr().out


def test_bench_cli_bad_input(capsys):
    assert cli.main(["bench", "--shape", "nope", "--device", "cpu"]) == 2
    assert "unknown shape" in capsys.readouterr().err
    assert cli.main(["bench", "--shape", "tiny", "--repeats", "0", "--device", "cpu"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["bench", "--lengths", "0"])


def test_batch_bench_rows_and_ratios():
    methods = {"full": {"method": "full"}, "gem": {"method": "gemfilter", "topk": 16, "filter_layer": 1}}
    res = run_batch_bench("tiny", [48], [1, 3], methods, dtype=torch.float32, device="cpu", decode_tokens=4,
                          warmup_length=16, progress=False)
    assert [(r["label"], r["batch"]) for r in res["rows"]] == [("full", 1), ("full", 3), ("gem", 1), ("gem", 3)]
    for r in res["rows"]:
        assert r["status"] == "ok" and r["length"] == 48
        assert r["generated_tokens"] == 4 * r["batch"]  # no EOS: every row answers decode_tokens tokens
        assert r["decode_tokens_per_s"] > 0 and r["e2e_tokens_per_s"] > 0
        assert r["kept_tokens"] == (48 if r["label"] == "full" else 16)
        assert r["details"]["batch_size"] == r["batch"]
        assert (r["speedup_vs_batch1"] is None) == (r["batch"] == 1)
    gem3 = res["rows"][3]
    assert gem3["speedup_vs_batch1"] == pytest.approx(gem3["decode_tokens_per_s"] / res["rows"][2]["decode_tokens_per_s"])


def test_bench_cli_batches(tmp_path, capsys):
    out = tmp_path / "batch.json"
    rc = cli.main(["bench", "--shape", "tiny", "--lengths", "40", "--batches", "1,2", "--methods", "full,snapkv",
                   "--param", "budget=16", "--param", "window_size=8", "--decode-tokens", "3", "--device", "cpu", "--dtype", "float32", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [(r["label"], r["batch"], r["status"]) for r in data["rows"]] == [
        ("full", 1, "ok"), ("full", 2, "ok"), ("snapkv", 1, "ok"), ("snapkv", 2, "ok")]
    assert "vs batch 1" in capsys.readouterr().out
    assert cli.main(["bench", "--shape", "tiny", "--lengths", "40", "--batches", "2", "--methods", "h2o",
                     "--decode-tokens", "3", "--device", "cpu", "--dtype", "float32"]) == 0  # a failed cell is recorded
    assert "h2o runs one prompt at a time" in capsys.readouterr().out
