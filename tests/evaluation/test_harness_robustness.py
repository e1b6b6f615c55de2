"""The harness and report under bad conditions: failed cells, bugs, a second writer, restarts, damaged files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from eval_support import TEXT, byte_model, byte_tokenizer, save_model_dir

from tokensieve.cli import main
from tokensieve.errors import InputError, PromptTooLongError
from tokensieve.evaluation.harness import (
    ResultsLockedError,
    Sample,
    Task,
    backup_path,
    lock_results_dir,
    read_results,
    results_files,
    run_eval,
)
from tokensieve.evaluation.report import ResultsWarning, load_results

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return byte_model(max_pos=800)


class Scripted(Task):
    """Samples of given lengths; ``evaluate`` raises what ``raises`` maps a key to, else scores 1."""

    name = "scripted"

    def __init__(self, lengths: list[int], raises: dict[str, BaseException] | None = None):
        self.lengths, self.raises = lengths, raises or {}

    def config(self):
        return {"lengths": self.lengths}

    def samples(self, tokenizer):
        for i, n in enumerate(self.lengths):
            yield Sample(f"s{i}", n, [5] * n)

    def evaluate(self, model, tokenizer, sample, method, allow_long):
        if sample.key in self.raises:
            raise self.raises[sample.key]
        return {"score": 1.0, "answer": "ok"}


def run(model, tok, task, out, **kw):
    rows = []
    run_eval(model, tok, task, ["full"], out, "tiny", progress=False, on_row=rows.append, **kw)
    return rows


# ----- which errors are failed cells -----------------------------------------------------------
def test_declared_errors_and_out_of_memory_are_recorded(model, tok, tmp_path):
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    task = Scripted([10, 10, 10], {"s0": InputError("bad value 7; expected 1-3"), "s1": oom("CUDA out of memory")})
    rows = run(model, tok, task, tmp_path)
    assert [r.get("error") for r in rows] == [
        "InputError: bad value 7; expected 1-3",
        "OutOfMemoryError: CUDA out of memory",
        None,
    ]
    assert [r["score"] for r in rows] == [None, None, 1.0]


@pytest.mark.parametrize("exc", [ValueError("a bug"), RuntimeError("a bug"), KeyError("a bug")])
def test_other_exceptions_stop_the_run(exc, model, tok, tmp_path):
    task = Scripted([10, 10], {"s1": exc})
    with pytest.raises(type(exc), match="a bug"):
        run(model, tok, task, tmp_path)
    rows = read_results(tmp_path / "scripted.jsonl")
    assert [r["key"] for r in rows] == ["s0"] and "error" not in rows[0]  # nothing recorded for the bug


def test_prompts_longer_than_the_model_are_failed_cells(model, tok, tmp_path):
    rows = run(model, tok, Scripted([100, 900]), tmp_path)  # the model has 800 positions
    assert rows[0].get("error") is None
    assert rows[1]["error"].startswith(
        "PromptTooLongError: prompt has 900 tokens, more than the model's maximum of 800"
    )
    assert len(run(model, tok, Scripted([100, 900]), tmp_path, allow_long=True)) == 1  # retried, runs with allow_long


def test_every_prompt_too_long_stops_before_any_work(model, tok, tmp_path):
    run(model, tok, Scripted([100]), tmp_path)
    with pytest.raises(
        PromptTooLongError,
        match=r"every prompt is longer than the model's maximum of 800 positions \(length\(s\) 900, 1000",
    ):
        run(model, tok, Scripted([900, 1000]), tmp_path, restart=True)
    assert list(tmp_path.glob("scripted.*.jsonl")) == []  # --restart did not set the old file aside
    assert len(read_results(tmp_path / "scripted.jsonl")) == 1


# ----- one writer per folder ---------------------------------------------------------------------
@pytest.fixture
def other_process_holds(tmp_path):
    """A second process holding the lock of tmp_path/out; yields (folder, its pid)."""
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import sys
        from tokensieve.evaluation.harness import lock_results_dir
        with lock_results_dir({str(out)!r}):
            print("locked", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout.readline().strip() == "locked"
    yield out, proc.pid
    proc.stdin.close()
    proc.wait(timeout=60)


def test_a_second_writer_is_refused(other_process_holds, model, tok, capsys):
    out, pid = other_process_holds
    with pytest.raises(ResultsLockedError, match=rf"{out} is in use by another tokensieve eval \(pid {pid}\)"):
        run(model, tok, Scripted([10]), out)
    assert not (out / "scripted.jsonl").exists()
    # the command line says so in one line, before it loads a model (this one does not exist)
    hay = out.parent / "hay.txt"
    hay.write_text(TEXT)
    code = main(["eval", "needle", "--model", "/nonexistent/model", "--haystack", str(hay), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [
        f"tokensieve eval needle: error: {out} is in use by another tokensieve eval (pid {pid}); "
        f"wait for it to finish or choose another --out"
    ]


def test_lock_is_released_and_reentrant(model, tok, tmp_path):
    with lock_results_dir(tmp_path):
        assert len(run(model, tok, Scripted([10]), tmp_path)) == 1  # the same process may nest
    code = f"from tokensieve.evaluation.harness import lock_results_dir\nwith lock_results_dir({str(tmp_path)!r}): print('ok')"
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC)}, timeout=60
    )
    assert res.stdout.strip() == "ok", res.stderr  # released


# ----- restarts and damaged files -----------------------------------------------------------------
def test_restart_never_overwrites_a_backup(model, tok, tmp_path):
    path = tmp_path / "scripted.jsonl"
    for _ in range(3):  # three restarts within the same second
        run(model, tok, Scripted([10]), tmp_path, restart=True)
    backups = sorted(tmp_path.glob("scripted.*.jsonl"))
    assert len(backups) == 2 and all(len(read_results(b)) == 1 for b in backups)
    assert backup_path(path) not in backups
    assert results_files(tmp_path) == [path]


def test_read_results_counts_corrupt_lines_and_names_undecodable_files(tmp_path):
    f = tmp_path / "ruler.jsonl"
    good = json.dumps({"task": "ruler", "key": "a", "method": "full"})
    f.write_text(f'{good}\nnot json\n[1, 2]\n{{"task": "ruler", "key": "cut')
    problems = []
    assert len(read_results(f, on_problem=problems.append)) == 1
    assert problems == [f"skipped 3 corrupt line(s) of {f} (not a JSON result line, e.g. cut off by a crash)"]
    f.write_bytes(good.encode() + b"\n\xff\xfe\n")
    with pytest.raises(
        InputError, match=rf"results file {f} is not UTF-8 text \(byte 0xff at byte offset {len(good) + 1}\)"
    ):
        read_results(f)


def line(key, score, method="full", task="ruler", **extra):
    return json.dumps(
        {
            "task": task,
            "task_config": {},
            "model": "m",
            "key": key,
            "length": 1024,
            "method": method,
            "params": {},
            "score": score,
            "ttft_s": 0.1,
            "prompt_tokens": 10,
            "meta": {},
        }
        | extra
    )


def test_report_reads_live_files_and_warns_about_damaged_ones(tmp_path, capsys):
    (tmp_path / "ruler.jsonl").write_text(f"{line('a', 1.0)}\n{line('b', 0.0)}\n{{cut\n")
    (tmp_path / "ruler.20240101-120000.jsonl").write_text(
        f"{line('a', 0.0)}\n{line('c', 0.0)}\n"
    )  # set aside by --restart
    (tmp_path / "needle.jsonl").write_bytes(b"\xff" + line("n", 1.0, task="needle").encode())
    with pytest.warns(ResultsWarning) as warned:
        rows = load_results([tmp_path])
    assert sorted(r["key"] for r in rows) == ["a", "b"] and all(r["score"] is not None for r in rows)
    assert sorted(str(w.message) for w in warned) == sorted(
        [
            f"results file {tmp_path / 'needle.jsonl'} is not UTF-8 text (byte 0xff at byte offset 0); skipped it",
            f"skipped 1 corrupt line(s) of {tmp_path / 'ruler.jsonl'} (not a JSON result line, e.g. cut off by a crash)",
        ]
    )
    # a file given by name is read even when it was set aside
    assert len(load_results([tmp_path / "ruler.20240101-120000.jsonl"])) == 2
    # the command: the report of the live rows, the warnings on stderr, exit 0
    assert main(["report", str(tmp_path), "--no-plots"]) == 0
    out, err = capsys.readouterr()
    assert "| m | ruler | full | 1024 | 2 | 50.0 |" in out
    assert err.splitlines() == [
        f"tokensieve report: warning: results file {tmp_path / 'needle.jsonl'} is not UTF-8 text (byte 0xff at byte offset 0); skipped it",
        f"tokensieve report: warning: skipped 1 corrupt line(s) of {tmp_path / 'ruler.jsonl'} (not a JSON result line, e.g. cut off by a crash)",
    ]


# ----- the eval command: failed cells, summary = report ----------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("tiny-800"), max_pos=800)


def needle_args(model_dir, out, lengths):
    return [
        "eval",
        "needle",
        "--model",
        str(model_dir),
        "--methods",
        "full",
        "--lengths",
        lengths,
        "--depths",
        "0,1",
        "--haystack",
        str(model_dir / "hay.txt"),
        "--max-new-tokens",
        "1",
        "--quiet",
        "--out",
        str(out),
    ]


def test_eval_with_failed_cells_exits_1_and_lists_them(model_dir, tmp_path, capsys):
    assert main(needle_args(model_dir, tmp_path, "600,900")) == 1
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert (
        lines[0]
        == f"tokensieve eval needle: 2 of 4 cell(s) failed (recorded in {tmp_path / 'needle.jsonl'}; retried on the next run):"
    )
    assert [ln.split(":")[0] for ln in lines[1:]] == ["  full 900/0", "  full 900/1"]
    assert all("PromptTooLongError: prompt has 9" in ln for ln in lines[1:])
    assert "| needle | full | 600 | 2 |" in out and "| needle | full | 900 | 0 |" in out


def test_eval_where_every_prompt_is_too_long_is_one_line(model_dir, tmp_path, capsys):
    assert main(needle_args(model_dir, tmp_path, "900,1k")) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith(
        "tokensieve eval needle: error: every prompt is longer than the model's maximum of 800 positions "
        "(length(s) 900, 1024: "
    )
    assert "--allow-long" in err and not (tmp_path / "needle.jsonl").exists()


def test_eval_summary_counts_what_report_counts(model_dir, tmp_path, capsys):
    args = needle_args(model_dir, tmp_path, "600")
    assert main(args) == 0
    path = tmp_path / "needle.jsonl"
    path.write_text(path.read_text() * 2)  # every cell twice (e.g. two merged runs)
    capsys.readouterr()
    assert main(args) == 0  # nothing left to run: prints the summary
    summary = capsys.readouterr().out
    assert main(["report", str(tmp_path), "--no-plots"]) == 0
    report = capsys.readouterr().out
    row = "| needle | full | 600 | 2 |"
    assert row in summary and row in report and "| 600 | 4 |" not in summary
