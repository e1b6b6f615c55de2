"""`tokensieve chat`: questions from stdin, the document computed once, answers equal to uncached runs."""

from __future__ import annotations

import io
import re
import sys

import pytest
import torch
from conftest import TESTS, patch_model_load
from eval_support import byte_model, byte_tokenizer

from tokensieve import cli
from tokensieve.commands import chat as chat_cmd
from tokensieve.engine.runner import generate, stop_token_ids
from tokensieve.methods import make_method

DOC = "The vault code is 4711. " * 6 + "\nThe keeper is called Ada.\n"


@pytest.fixture
def tiny(monkeypatch):
    model, tok = byte_model(seed=3), byte_tokenizer()
    patch_model_load(monkeypatch, lambda args: (model, tok))
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


def expected(model, tok, question: str, method: str, history=None, **params) -> str:
    msgs = chat_cmd.messages_for(DOC, question, None, history)
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
        monkeypatch,
        capsys,
        tmp_path,
        f"{questions[0]}\n\n{questions[1]}\n/exit\nnever asked\n",
        "--no-memory",  # each question alone: its answer is the one asked alone
        *flags,
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

    model, tok = byte_model(seed=3), byte_tokenizer()
    patch_model_load(monkeypatch, lambda args: (model, tok))
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
    data = json.loads(capsys.readouterr().out)
    assert data["answer"] == seen["text"] and data["kv_kept"] == data["kept_tokens"] == data["prompt_tokens"]
    flags = ["--method", "snapkv", "--param", "budget=32", "--param", "window_size=8"]
    assert cli.main(["ask", "--file", str(doc), "--question", "code?", "--max-new-tokens", "2", *flags]) == 0
    table = capsys.readouterr().out  # an evicting method computes on the whole prompt and keeps its budget
    assert re.search(r"kept tokens: (\d+)\n", table).group(1) != "32"
    assert "KV kept: 32 entries (the fullest layer)" in table


def test_memory_keeps_the_conversation_and_the_prefix_cache_holds_it(tiny, monkeypatch, capsys, tmp_path):
    model, tok = tiny
    qs = ["what is the code?", "and the keeper?", "say it again"]
    rc, out, err = run_chat(monkeypatch, capsys, tmp_path, "\n".join(qs) + "\n")
    assert rc == 0, err
    answers = [a.removesuffix("\n") for a in out.split("> ")[1:4]]
    history: list[tuple[str, str]] = []
    for q, a in zip(qs, answers):  # each answer is the one of the whole conversation so far
        assert a == expected(model, tok, q, "full", history)
        history.append((q, a.strip()))
    cached = [int(line.split("; ")[1].split(" of ")[0]) for line in err.splitlines() if line.startswith("[TTFT ")]
    # question 3 reuses the prefix question 2 stored: the document, question 1 and its answer
    assert len(cached) == 3 and cached[0] == cached[1] < cached[2]


def test_memory_drops_the_oldest_turns_to_fit_the_context():
    notes: list[str] = []
    encode = lambda msgs: torch.zeros(1, sum(len(m["content"]) for m in msgs))  # noqa: E731  (a character a token)
    c = chat_cmd.Conversation("D" * 50, None, encode, limit=160, max_new_tokens=10, note=notes.append)
    c.add("q1", "a" * 20)
    c.add("q2", "b" * 20)
    msgs, ids = c.messages("q3")
    assert ids.shape[1] == sum(len(m["content"]) for m in msgs) and ids.shape[1] + 10 <= 160
    assert c.turns == [("q2", "b" * 20)] and [m["content"] for m in msgs[1:]] == ["b" * 20, "Question: q3"]
    assert msgs[0]["content"].startswith("D" * 50) and msgs[0]["content"].endswith("Question: q2")
    assert len(notes) == 1 and "dropped the 1 oldest turn(s)" in notes[0] and "160 positions" in notes[0]
    c.turns = [("q1", "a" * 200)]  # nothing fits: every turn goes, the question is asked alone
    msgs, _ = c.messages("q4")
    assert c.turns == [] and len(msgs) == 1 and len(notes) == 2
    off = chat_cmd.Conversation("D", None, encode, limit=None, max_new_tokens=1, memory=False)
    off.add("q", "a")
    assert off.turns == [] and len(off.messages("q2")[0]) == 1


def test_session_ctrl_c_stops_the_answer_only_and_ends_at_the_prompt():
    asked: list[str] = []
    err = io.StringIO()

    def answer(q: str) -> None:
        asked.append(q)
        if q == "slow":
            raise KeyboardInterrupt  # Ctrl-C while answering

    def reader(lines):
        it = iter(lines)

        def read() -> str:
            item = next(it)
            if isinstance(item, BaseException):
                raise item
            return item

        return read

    ended = chat_cmd.run_session(reader(["slow", "", "next", KeyboardInterrupt(), "never"]), answer, err)
    assert ended == "interrupt" and asked == ["slow", "next"] and chat_cmd.STOPPED in err.getvalue()
    assert chat_cmd.run_session(reader(["a", EOFError()]), answer, err) == "eof"
    assert chat_cmd.run_session(reader(["/exit", "b"]), answer, err) == "exit" and asked[-1] == "a"


def test_ctrl_c_during_an_answer_keeps_the_session_and_forgets_that_answer(tiny, monkeypatch, capsys, tmp_path):
    from tokensieve.engine.detokenize import TextStream

    model, tok = tiny
    real_push, calls = TextStream.push, {"n": 0}

    def push(self, token_id):
        calls["n"] += 1
        if calls["n"] == 2:  # the second token of the first answer: as if Ctrl-C was pressed there
            raise KeyboardInterrupt
        return real_push(self, token_id)

    monkeypatch.setattr(TextStream, "push", push)
    rc, out, err = run_chat(monkeypatch, capsys, tmp_path, "what is the code?\nwho is the keeper?\n")
    assert rc == 0 and chat_cmd.STOPPED in err
    parts = out.split("> ")
    assert len(parts) == 4  # two questions asked, then the prompt that met EOF
    # the stopped answer is not remembered: the second question is answered as if asked first
    assert parts[2] == expected(model, tok, "who is the keeper?", "full") + "\n"
    assert len([line for line in err.splitlines() if line.startswith("[TTFT ")]) == 1


# `tokensieve chat` on the byte model (seed 3), for a terminal: run under a pseudo-terminal by the test below.
PTY_PROBE = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a shell (a background job inherits it ignored)
sys.path.insert(0, {tests!r})
from eval_support import byte_model, byte_tokenizer
import tokensieve.commands.common as common
common.load = lambda args: (byte_model(seed=3), byte_tokenizer())
from tokensieve.cli import main
sys.exit(main(["chat", "--file", {doc!r}, "--max-new-tokens", "6", "--no-memory"]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_terminal_session_has_line_editing_and_ends_on_ctrl_c_at_the_prompt(tmp_path):
    pytest.importorskip("readline")
    import os
    import pty
    import select
    import subprocess
    import time

    model, tok = byte_model(seed=3), byte_tokenizer()
    question = "what is the code?"
    answer = expected(model, tok, question, "full")
    typed = "ode?\x01what is the c"  # 'ode?', Ctrl-A (to the line's start: readline), then the beginning
    assert expected(model, tok, typed, "full") != answer  # without line editing the answer would differ
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    tests = str(TESTS)  # eval_support lives there
    master, slave = pty.openpty()

    def controlling_terminal() -> None:  # in the child: a new session whose controlling terminal is the pty
        import fcntl
        import termios

        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    env = {**os.environ, "PYTHONPATH": str(TESTS.parent / "src"), "TERM": "xterm"}
    p = subprocess.Popen(
        [sys.executable, "-c", PTY_PROBE.format(tests=tests, doc=str(doc))],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        preexec_fn=controlling_terminal,  # Ctrl-C on the pty is then its SIGINT
    )
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, after: int) -> None:
        nonlocal seen
        end = time.monotonic() + 240
        while marker not in seen[after:]:
            assert time.monotonic() < end and p.poll() is None, seen.decode(errors="replace")
            if select.select([master], [], [], 0.1)[0]:
                seen += os.read(master, 4096)

    try:
        read_until(b"> ", 0)
        start = len(seen)
        os.write(master, typed.encode() + b"\r")
        read_until(b"[TTFT", start)
        read_until(b"> ", seen.index(b"[TTFT", start))
        # Ctrl-C at the prompt: the session ends. Python sees a SIGINT in input() only when it interrupts the wait
        # for a key, so one sent while readline is still setting up the prompt waits for the next key: send again.
        for _ in range(20):
            os.write(master, b"\x03")
            try:
                p.wait(timeout=3)
                break
            except subprocess.TimeoutExpired:
                continue
        assert p.wait(timeout=10) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    text = seen.decode(errors="replace").replace("\r\n", "\n")
    assert answer + "\n" in text
