"""The harness: result lines, resume after a crash, refusing mixed configurations, errors retried, every method."""

from __future__ import annotations

import json

import pytest
from eval_support import TEXT, byte_model, byte_tokenizer

import tokensieve
from tokensieve.evaluation.harness import ResultsMismatchError, cell_id, read_results, run_eval
from tokensieve.evaluation.ruler import RulerTask
from tokensieve.methods import METHODS


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return byte_model()


def task(seed=0, samples=2):
    return RulerTask([900], samples=samples, seed=seed, tasks=["niah_single", "vt"], haystack=TEXT, max_new_tokens=3)


def run(model, tok, out, t=None, methods=("full", tokensieve.make_method("gemfilter", topk=64)), **kw):  # noqa: B008
    seen = []
    path = run_eval(model, tok, t or task(), list(methods), out, "tiny", progress=False, on_row=seen.append, **kw)
    return path, seen


def test_lines_record_model_params_seed_version(model, tok, tmp_path):
    path, seen = run(model, tok, tmp_path)
    rows = read_results(path)
    assert path.name == "ruler.jsonl" and len(rows) == len(seen) == 2 * 2 * 2
    for r in rows:
        assert (
            r["model"] == "tiny" and r["task_config"]["seed"] == 0 and r["env"]["tokensieve"] == tokensieve.__version__
        )
        assert r["method"] in ("full", "gemfilter") and isinstance(r["params"], dict)
        assert 0.0 <= r["score"] <= 1.0 and r["ttft_s"] > 0 and r["prompt_tokens"] <= 900
    gem = [r for r in rows if r["method"] == "gemfilter"]
    assert all(r["params"]["topk"] == 64 and r["kept_tokens"] == 64 == r["kv_kept"] for r in gem)
    assert all(r["kv_kept"] == r["prompt_tokens"] for r in rows if r["method"] == "full")
    assert len({cell_id(r) for r in rows}) == len(rows)


def test_resume_after_crash_mid_file(model, tok, tmp_path):
    path, first = run(model, tok, tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    # Simulate a crash while writing the 6th line: 5 whole lines and half of the next.
    path.write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    path2, redone = run(model, tok, tmp_path)
    assert path2 == path
    assert [cell_id(r) for r in redone] == [cell_id(r) for r in first[5:]]  # only the missing cells ran, in order
    rows = read_results(path)
    assert len(rows) == 8 and len({cell_id(r) for r in rows}) == 8
    # the half line is kept in the file (never deleted) but ignored
    assert len(path.read_text().splitlines()) == 9
    # identical results for the cells run twice (deterministic greedy decoding)
    again = {cell_id(r): r["answer"] for r in rows}
    assert all(again[cell_id(r)] == r["answer"] for r in first)
    # a third run has nothing to do
    assert run(model, tok, tmp_path)[1] == []


def test_resume_counts_lines_written_before_an_option_that_is_off_by_default(model, tok, tmp_path):
    """A line from before a method gained an option whose default is None (it lacks the key) is done; one that
    lacks an option with another default (it ran without it) runs again."""
    path, first = run(model, tok, tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        if r["method"] == "gemfilter":
            assert r["params"]["filter_model"] is None and r["params"]["dilation"] == 31
            del r["params"]["filter_model"]  # written by a version without the option
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run(model, tok, tmp_path)[1] == []
    for r in rows:
        if r["method"] == "gemfilter":
            del r["params"]["dilation"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    redone = run(model, tok, tmp_path)[1]
    assert {r["method"] for r in redone} == {"gemfilter"} and len(redone) == 4


def test_adding_a_method_runs_only_its_cells(model, tok, tmp_path):
    run(model, tok, tmp_path, methods=["full"])
    _, seen = run(model, tok, tmp_path, methods=["full", "gemfilter"])
    assert {r["method"] for r in seen} == {"gemfilter"} and len(seen) == 4


def test_refuses_other_configuration(model, tok, tmp_path):
    path, _ = run(model, tok, tmp_path, methods=["full"])
    with pytest.raises(ResultsMismatchError, match="seed=0 .now 1."):
        run(model, tok, tmp_path, t=task(seed=1), methods=["full"])
    with pytest.raises(ResultsMismatchError, match="model"):
        run_eval(model, tok, task(), ["full"], tmp_path, "other-model", progress=False)
    # --append: both configurations in one file
    _, seen = run(model, tok, tmp_path, t=task(seed=1), methods=["full"], append=True)
    assert len(seen) == 4 and len(read_results(path)) == 8
    # --restart: the old file is set aside, not deleted
    _, seen = run(model, tok, tmp_path, t=task(seed=1), methods=["full"], restart=True)
    assert len(seen) == 4 and len(read_results(path)) == 4
    backups = [p for p in tmp_path.glob("ruler.*.jsonl")]
    assert len(backups) == 1 and len(read_results(backups[0])) == 8


def test_errors_are_recorded_and_retried(tok, tmp_path):
    """A declared user error (here a prompt longer than the model's positions) is a failed cell, retried next run."""
    short = byte_model(max_pos=800)
    t = RulerTask([600, 900], samples=1, tasks=["niah_single", "vt"], haystack=TEXT, max_new_tokens=3)
    _, seen = run(short, tok, tmp_path, t=t, methods=["full"])
    failed = [r for r in seen if r.get("error")]
    assert len(seen) == 4 and {r["length"] for r in failed} == {900} and len(failed) == 2
    assert all(r["error"].startswith("PromptTooLongError") and r["score"] is None for r in failed)
    assert all(r["score"] is not None for r in seen if r["length"] == 600)
    _, seen = run(short, tok, tmp_path, t=t, methods=["full"])
    assert len(seen) == 2 and all(r["length"] == 900 for r in seen)  # retried


@pytest.mark.parametrize("name", list(METHODS))
def test_every_registered_method_runs(name, tok, tmp_path):
    """A method that joins METHODS is evaluated with its default parameters, on two model families."""
    for m in (byte_model(), byte_model("qwen2", layers=2)):
        _, seen = run(m, tok, tmp_path / m.config.model_type, t=task(samples=1), methods=[name])
        assert len(seen) == 2 and all(r.get("error") is None and r["score"] is not None for r in seen), seen


def test_duplicate_keys_rejected(model, tok, tmp_path):
    class Dup(RulerTask):
        def samples(self, tokenizer):
            s = next(super().samples(tokenizer))
            yield s
            yield s

    with pytest.raises(ValueError, match="duplicate"):
        run(model, tok, tmp_path, t=Dup([900], samples=1, tasks=["vt"]))


def test_lines_are_json(model, tok, tmp_path):
    path, _ = run(model, tok, tmp_path, t=task(samples=1), methods=["full"])
    for line in path.read_text().splitlines():
        json.loads(line)


def test_resume_refuses_a_results_path_that_is_not_a_regular_file(tmp_path):
    """A folder, a device or a pipe where the results file belongs: one InputError, never an endless read."""
    import os

    from tokensieve.errors import InputError

    folder = tmp_path / "needle.jsonl"
    folder.mkdir()
    device = tmp_path / "dev.jsonl"
    device.symlink_to("/dev/zero")
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    for p in (folder, device, fifo):
        with pytest.raises(InputError, match=f"results path {p} is not a regular file"):
            read_results(p)
    assert read_results(tmp_path / "absent.jsonl") == []
