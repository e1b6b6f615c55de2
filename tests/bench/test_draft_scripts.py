"""The draft-model GPU benchmarks' CPU smoke runs (tiny shapes): resuming, --slow-self, and the depth fit."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args], env=ENV, capture_output=True, text=True, timeout=300
    )


def test_draft_gpu_resumes_and_runs_the_skipped_slow_self_cell_alone(tmp_path):
    first = script("draft_gpu.py", "--smoke", "--out", str(tmp_path), "--lengths", "256,2k")
    assert first.returncode == 0, first.stderr
    d1 = json.loads((tmp_path / "draft_gpu.json").read_text())
    slow = d1["cells"]["70b/2048/self"]  # the 70B's local pass (2k is "long" in a smoke run): left out by default
    assert slow["status"] == "skipped" and "--slow-self" in slow["reason"]
    assert d1["cells"]["70b/256/self"]["status"] == "ok" and d1["cells"]["8b/2048/self"]["status"] == "ok"

    second = script(
        "draft_gpu.py", "--smoke", "--out", str(tmp_path), "--lengths", "256,2k", "--targets", "70b", "--slow-self"
    )
    assert second.returncode == 0, second.stderr
    d2 = json.loads((tmp_path / "draft_gpu.json").read_text())
    assert d2["cells"]["70b/2048/self"]["status"] == "ok" and d2["cells"]["70b/2048/self"]["select_s"] > 0
    assert [k for k in d1["cells"] if d2["cells"][k] != d1["cells"][k]] == ["70b/2048/self"]  # nothing else re-ran
    assert len(d2["commands"]) == 2 and set(d2["targets"]) == {"8b", "70b"}
    assert d2["summary"]["70b/2048/draft_early"]["self_select_s"] == d2["cells"]["70b/2048/self"]["select_s"]


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_second_pass_depth_fit_recovers_a_line_and_the_smoke_run_reports_both_shapes(tmp_path):
    fit = load_module("second_pass_depth").fit
    a, b = fit([(10, 0.2 + 0.03 * 10), (20, 0.2 + 0.03 * 20), (40, 0.2 + 0.03 * 40)])
    assert a == pytest.approx(0.2) and b == pytest.approx(0.03)
    out = script("second_pass_depth.py", "--smoke", "--out", str(tmp_path), "--repeats", "1")
    assert out.returncode == 0, out.stderr
    d = json.loads((tmp_path / "second_pass_depth.json").read_text())
    assert [r["layers"] for r in d["rows"]] == [1, 2, 4, 1, 2]  # the check shape's depths and whole, the target's
    assert all(r["status"] == "ok" for r in d["rows"])
    t = d["target"]
    assert t["estimate_s"] == pytest.approx(t["intercept_s"] + t["per_layer_s"] * 4)
    assert d["check"]["measured_s"] == d["rows"][2]["ttft_s"]
    for args, said in ((["--layers", "40"], "--layers needs two or more values"), (["--layers", "a,b"], "integers")):
        bad = script("second_pass_depth.py", *args)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and said in bad.stderr, bad.stderr


@pytest.mark.parametrize(
    "args,said",
    [
        (["--lengths", "32q"], "sizes such as"),
        (["--lengths", "8m"], "from 64 to 4m"),
        (["--targets", "13b"], "subset of"),
        (["--topk", "0"], "--topk in"),
    ],
)
def test_draft_gpu_refuses_bad_arguments_in_one_line(args, said):
    bad = script("draft_gpu.py", *args)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and said in bad.stderr, bad.stderr
