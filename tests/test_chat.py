"""`tokensieve chat`: questions from stdin, the document computed once, answers equal to uncached runs."""

from __future__ import annotations

import io
import sys

import pytest
from eval_support import byte_model, byte_tokenizer

from tokensieve import cli
from tokensieve.commands import chat as chat_cmd
from tokensieve.engine.runner import generate, stop_token_ids
from tokensieve.methods import make_method

DOC = "The vault code is 4711. " * 6 + "\nThe keeper is called Ada.\n"


@pytest.fixture
def tiny(monkeypatch):
    model, tok = byte_model(seed=3), byte_tokenizer()
    monkeypatch.setattr(chat_cmd, "load", lambda args: (model, tok))
    return model, tok


def run_chat(monkeypatch, capsys, tmp_path, stdin: str, *extra: str) -> tuple[int, str, str]:
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        rc = cli.main(["chat", "--file", str(doc), "--max-new-tokens", "6", *extra])
    except SystemExit as exc:  # argparse's errors (one line, exit 2)
        rc = int(exc.code)
    out = capsys.readouterr()
    return rc, out.out, out.err


def expected(model, tok, question: str, method: str, **params) -> str:
    msgs = chat_cmd.messages_for(DOC, question, None)
    res = generate(model, tok, msgs, method=make_method(method, **params), max_new_tokens=6)
    stops = stop_token_ids(model, tok)
    return tok.decode([t for t in res.token_ids if t not in stops], skip_special_tokens=True)


@pytest.mark.parametrize(
    "method,params,flags",
    [
        ("full", {}, []),
        ("gemfilter", {"topk": 24}, ["--method", "gemfilter", "--topk", "24"]),
        (
            "snapkv",
            {"budget": 32, "window_size": 8},
            ["--method", "snapkv", "--param", "budget=32", "--param", "window_size=8"],
        ),
    ],
)
def test_questions_from_stdin_reuse_the_document(tiny, monkeypatch, capsys, tmp_path, method, params, flags):
    model, tok = tiny
    questions = ["what is the code?", "who is the keeper?"]
    rc, out, err = run_chat(
        monkeypatch, capsys, tmp_path, f"{questions[0]}\n\n{questions[1]}\n/exit\nnever asked\n", *flags
    )
    assert rc == 0, err
    answers = out.split("> ")
    assert answers[0] == "" and len(answers) == 5  # q1, blank line, q2, /exit
    assert answers[1] == expected(model, tok, questions[0], method, **params) + "\n"
    assert answers[3] == expected(model, tok, questions[1], method, **params) + "\n"
    ttft = [line for line in err.splitlines() if line.startswith("[TTFT ")]
    assert len(ttft) == 2
    prompt_tokens = len(tok(chat_cmd.messages_for(DOC, questions[0], None)[0]["content"])["input_ids"])
    for line in ttft:  # the document was computed at start: every question takes it from the cache
        cached = int(line.split("; ")[1].split(" of ")[0])
        assert len(DOC) - 16 <= cached < prompt_tokens
    assert "computed once" in err


def test_eof_ends_and_unsupported_method_runs_without_cache(tiny, monkeypatch, capsys, tmp_path):
    model, tok = tiny
    rc, out, err = run_chat(monkeypatch, capsys, tmp_path, "what is the code?", "--method", "h2o")
    assert rc == 0
    assert "no prefix cache" in err and "h2o" in err
    assert out.split("> ")[1] == expected(model, tok, "what is the code?", "h2o") + "\n"
    assert " 0 of " in err


def test_bad_input_exits_2_with_one_line(tiny, monkeypatch, capsys, tmp_path):
    for extra, words in [
        (["--temperature", "-1"], ["temperature", "-1"]),
        (["--prefix-cache-gib", "-2"], ["GiB", "-2"]),
        (["--top-p", "0"], ["top_p", "0"]),
        (["--method", "snapkv", "--topk", "3"], ["--topk", "gemfilter"]),
        (["--system", " "], ["--system", "empty"]),
    ]:
        rc, out, err = run_chat(monkeypatch, capsys, tmp_path, "q\n", *extra)
        assert rc == 2 and out == "", extra
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), (extra, err)
    monkeypatch.setattr(sys, "stdin", io.StringIO("q\n"))
    assert cli.main(["chat", "--file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert cli.main(["chat", "--file", "-"]) == 2
    assert "standard input" in capsys.readouterr().err


def test_ask_streams_the_answer_and_json_stays_one_object(monkeypatch, capsys, tmp_path):
    import json

    import tokensieve.engine.runner as runner
    from tokensieve.commands import ask as ask_cmd

    model, tok = byte_model(seed=3), byte_tokenizer()
    monkeypatch.setattr(ask_cmd, "load", lambda args: (model, tok))
    real = runner.generate
    seen: dict[str, object] = {}

    def spy(*args, on_token=None, **kw):
        res = real(*args, on_token=on_token, **kw)
        seen["streamed"] = capsys.readouterr().out  # written while generating, before generate returned
        seen["text"] = res.text
        return res

    monkeypatch.setattr(runner, "generate", spy)
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    assert cli.main(["ask", "--file", str(doc), "--question", "code?", "--max-new-tokens", "8"]) == 0
    rest = capsys.readouterr().out
    assert seen["streamed"] and (seen["streamed"] + rest).startswith(seen["text"])
    assert seen["text"].startswith(seen["streamed"].strip()) and "TTFT" in rest
    assert cli.main(["ask", "--file", str(doc), "--question", "code?", "--max-new-tokens", "8", "--json"]) == 0
    assert seen["streamed"] == ""
    assert json.loads(capsys.readouterr().out)["answer"] == seen["text"]
