"""Bad input on the command line: one line `tokensieve CMD: error: ...` on stderr naming the value, exit code 2.

Every case here fails before a model loads (most pass ``--model /nonexistent/...``: if the check
under test did not fire first, the error would be about the model and the test would fail).
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import run_cli
from eval_support import TEXT, save_model_dir

from tokensieve.cli import COMMANDS

SRC = Path(__file__).resolve().parents[2] / "src"
NO_MODEL = ["--model", "/nonexistent/model"]


def fails(argv: list[str], capsys, *needles: str) -> str:
    """Assert exit code 2 and exactly one stderr line `tokensieve CMD: error: ...` holding every needle (after the
    "loading MODEL ..." line where the failure is in loading the model)."""
    code, _, err = run_cli(argv, capsys)
    lines = err.splitlines()
    if len(lines) == 2 and re.fullmatch(r"loading .+ \.\.\.", lines[0]):
        lines = lines[1:]
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    cmd = argv[0] + (f" {argv[1]}" if argv[0] == "eval" else "")
    assert lines[0].startswith(f"tokensieve {cmd}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def doc(tmp_path) -> Path:
    p = tmp_path / "doc.txt"
    p.write_text("The vault code is 4711. Nothing else happened.\n")
    return p


def ask(doc: Path, *extra: str) -> list[str]:
    return ["ask", "--file", str(doc), "--question", "what is the code?", *extra]


# ----- 1. dtype and device ----------------------------------------------------------------------
@pytest.mark.parametrize("value", ["float8", "banana"])
def test_bad_dtype(value, doc, capsys):
    fails(ask(doc, "--dtype", value, *NO_MODEL), capsys, f"'{value}'", "float32, bfloat16, float16")
    # bench parses --dtype with the same rule
    fails(["bench", "--shape", "tiny", "--dtype", value], capsys, f"'{value}'", "float32, bfloat16, float16")


def test_bad_device(doc, capsys):
    fails(ask(doc, "--device", "tpu", *NO_MODEL), capsys, "'tpu'", "cpu, cuda, cuda:N, mps")
    fails(["eval", "ruler", "--device", "gpu0"], capsys, "'gpu0'", "cpu, cuda, cuda:N, mps")


def test_cuda_asked_for_without_cuda(doc, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fails(ask(doc, "--device", "cuda", *NO_MODEL), capsys, "'cuda'", "CUDA was asked for but is not available")
    fails(ask(doc, "--device", "cuda:1", *NO_MODEL), capsys, "CUDA was asked for but is not available")


def test_library_load_model_checks_dtype_and_device_first():
    from tokensieve.core.models import load_model, parse_dtype
    from tokensieve.errors import InputError

    with pytest.raises(InputError, match="unknown dtype 'float8'; expected one of: float32, bfloat16, float16"):
        load_model("/nonexistent/model", dtype="float8")
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        load_model("/nonexistent/model", device="tpu")
    import torch

    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    with pytest.raises(InputError, match="float64"):
        parse_dtype(torch.float64)


# ----- 2, 3. method parameters and method-specific flags ----------------------------------------
def test_param_no_chosen_method_takes(doc, capsys):
    line = fails(ask(doc, "--param", "nonsense=3", *NO_MODEL), capsys, "--param nonsense", "full")
    assert "full takes no parameters" in line
    fails(
        ["eval", "needle", "--methods", "full,snapkv", "--param", "nonsense=3", *NO_MODEL],
        capsys,
        "--param nonsense",
        "full, snapkv",
        "snapkv takes budget",
    )
    # a parameter of another method: say whose it is
    fails(
        ask(doc, "--method", "snapkv", "--param", "topk=3", *NO_MODEL),
        capsys,
        "--param topk",
        "a parameter of gemfilter",
    )


def test_param_without_equals(doc, capsys):
    fails(ask(doc, "--param", "nonsense", *NO_MODEL), capsys, "'nonsense'", "KEY=VALUE")
    fails(ask(doc, "--param", "=3", *NO_MODEL), capsys, "'=3'", "KEY=VALUE")


def test_param_goes_to_the_methods_that_take_it(monkeypatch):
    from tokensieve.commands.common import method_params
    from tokensieve.methods.snapkv import SnapKV

    args = argparse.Namespace(
        methods=["full", "snapkv"], param=["budget=512"], topk=None, filter_layer=None, scoring=None
    )
    assert method_params(args) == {"full": {}, "snapkv": {"budget": 512}}
    # a deprecated (renamed) parameter name is accepted: the check uses accepted_params, not the fields
    monkeypatch.setattr(SnapKV, "renamed", {"old_budget": "budget"})
    args.param = ["old_budget=8"]
    assert method_params(args) == {"full": {}, "snapkv": {"old_budget": 8}}


@pytest.mark.parametrize(
    "flag, value, methods",
    [
        ("--filter-layer", "999", ["--method", "full"]),
        ("--topk", "64", ["--method", "snapkv"]),
        ("--scoring", "paper", ["--method", "h2o"]),
    ],
)
def test_gemfilter_flag_without_gemfilter(flag, value, methods, doc, capsys):
    chosen = methods[1]
    fails(
        ask(doc, flag, value, *methods, *NO_MODEL),
        capsys,
        f"{flag} is a gemfilter option; the chosen method(s) {chosen} do not use it",
    )


def test_gemfilter_flag_with_gemfilter_among_methods_is_fine(doc, capsys):
    # with gemfilter chosen the flag is accepted and the run gets as far as the model
    fails(
        [
            "eval",
            "needle",
            "--methods",
            "full,gemfilter",
            "--topk",
            "64",
            *NO_MODEL,
            "--haystack",
            str(doc),
            "--out",
            str(doc.parent / "o"),
        ],
        capsys,
        "model path /nonexistent/model does not exist",
    )


# ----- 4. documents: encoding, binary data, stdin ------------------------------------------------
def test_undecodable_document_names_file_offset_and_encoding(tmp_path, capsys):
    f = tmp_path / "latin.txt"
    f.write_bytes("Le café est fermé.".encode("latin-1"))
    fails(
        ask(f, *NO_MODEL),
        capsys,
        str(f),
        "byte 0xe9 at byte offset 6",
        "utf-8",
        "--encoding latin-1",
        "--encoding-errors replace",
    )
    # with the right encoding, or replacement characters, the document is read (the run reaches the model)
    fails(ask(f, "--encoding", "latin-1", *NO_MODEL), capsys, "model path /nonexistent/model does not exist")
    fails(ask(f, "--encoding-errors", "replace", *NO_MODEL), capsys, "model path /nonexistent/model does not exist")
    fails(ask(f, "--encoding", "banana", *NO_MODEL), capsys, "'banana'", "utf-8, latin-1")
    fails(ask(f, "--encoding-errors", "ignore", *NO_MODEL), capsys, "'ignore'", "strict", "replace")


@pytest.mark.parametrize("size", [3000, 20000])
def test_binary_document(size, tmp_path, capsys):
    f = tmp_path / "random.bin"
    f.write_bytes(random.Random(size).randbytes(size))
    fails(ask(f, *NO_MODEL), capsys, f"{f} does not look like text (binary data)")


def test_binary_without_nul_bytes(tmp_path, capsys):
    rng = random.Random(0)
    f = tmp_path / "controls.bin"
    f.write_bytes(bytes(rng.choice([*range(1, 9), *range(14, 32), *b"abcdefgh"]) for _ in range(4000)))
    fails(ask(f, *NO_MODEL), capsys, "does not look like text (binary data)")


def test_text_is_not_mistaken_for_binary(tmp_path):
    from tokensieve.data import read_document

    f = tmp_path / "wide.txt"
    f.write_text("Grüße aus Köln\n\tmit Tab und \x1b[1mFarbe\x1b[0m\r\n" * 20, encoding="utf-16")
    assert read_document(f, "utf-16").startswith("Grüße aus Köln")  # UTF-16 is full of NUL bytes
    f.write_text("Κείμενο σε cp1253 " * 50, encoding="cp1253")
    assert read_document(f, "cp1253").startswith("Κείμενο")


def _stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_stdin_document(monkeypatch, capsys):
    _stdin(monkeypatch, random.Random(1).randbytes(3000))
    fails(
        ["ask", "--file", "-", "--question", "q", *NO_MODEL],
        capsys,
        "standard input does not look like text (binary data)",
    )
    _stdin(monkeypatch, "caf\xe9".encode("latin-1"))
    fails(
        ["ask", "--file", "-", "--question", "q", *NO_MODEL],
        capsys,
        "standard input is not valid utf-8",
        "byte offset 3",
    )
    _stdin(monkeypatch, b"  \n")
    fails(["ask", "--file", "-", "--question", "q", *NO_MODEL], capsys, "document on standard input is empty")
    _stdin(monkeypatch, "café".encode("latin-1"))
    fails(["ask", "--file", "-", "--question", "q", "--encoding", "latin-1", *NO_MODEL], capsys, "model path")


def test_one_reader_for_documents_haystacks_and_data(tmp_path, capsys):
    """ask --file, eval --haystack, eval ppl --file and eval longbench --data all read through data.read_document."""
    f = tmp_path / "random.bin"
    f.write_bytes(random.Random(2).randbytes(3000))
    for argv in (
        ["eval", "needle", "--haystack", str(f)],
        ["eval", "ruler", "--haystack", str(f)],
        ["eval", "ppl", "--file", str(f)],
        ["eval", "longbench", "--data", str(f)],
    ):
        fails([*argv, *NO_MODEL, "--out", str(tmp_path / "o")], capsys, f"{f} does not look like text (binary data)")
    from tokensieve.commands import ask
    from tokensieve.evaluation import longbench

    assert not hasattr(ask, "read_document") or ask.read_document.__module__ == "tokensieve.data"
    assert "open(" not in Path(longbench.__file__).read_text()


# ----- 5. models that cannot be found -----------------------------------------------------------
def test_model_path_that_does_not_exist(doc, capsys):
    fails(ask(doc, "--model", "/nonexistent/path"), capsys, "model path /nonexistent/path does not exist")
    fails(ask(doc, "--model", "./nope/model.gguf"), capsys, "nope/model.gguf does not exist")
    fails(ask(doc, "--model", str(doc)), capsys, "is a file but not a .gguf file")
    fails(ask(doc, "--model", " "), capsys, "model name is empty")


def test_hub_id_not_in_cache_fails_without_the_network(doc):
    """A made-up hub id: one line, exit 2, and not one network connection tried (so no retries)."""
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import socket, sys
        attempts = []
        def refuse(*args, **kwargs):
            attempts.append(args)
            raise OSError("network used")
        socket.getaddrinfo = refuse
        socket.socket.connect = refuse
        from tokensieve.cli import main
        code = main(["ask", "--file", {str(doc)!r}, "--question", "q", "--model", "made-up-org/made-up-model-7"])
        print("exit", code, "attempts", len(attempts))
    """),
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
        timeout=300,
    )
    assert res.stdout.split() == ["exit", "2", "attempts", "0"], res.stdout + res.stderr
    assert res.stderr.splitlines() == [
        "loading made-up-org/made-up-model-7 ...",
        "tokensieve ask: error: could not load model 'made-up-org/made-up-model-7': it is not an embedded model "
        "(smollm2, gemma3-270m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b), local folder or .gguf file, and not in the local Hugging Face cache "
        "(tokensieve does not download models: download it elsewhere and pass its folder)",
    ]


def test_library_hub_id_not_in_cache():
    from tokensieve.core.models import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model("made-up-org/made-up-model-7")


# ----- 10. argparse errors ------------------------------------------------------------------------
def test_argparse_errors_are_one_line_with_a_hint(doc, capsys):
    fails(
        ["ask", "--question", "q"], capsys, "the following arguments are required: --file (see tokensieve ask --help)"
    )
    fails(
        ["eval", "ruler", "--tasks", "niah_single,bogus"],
        capsys,
        "bogus",
        "niah_multikey",
        "(see tokensieve eval ruler --help)",
    )
    fails(["eval", "needle", "--restart", "--append"], capsys, "not allowed with argument")
    fails(ask(doc, "--method", "bogus"), capsys, "invalid choice: 'bogus'")
    code, _, err = run_cli([], capsys)
    assert code == 2 and err.splitlines() == [
        f"tokensieve: error: no command given; expected one of: {', '.join(COMMANDS)} (see tokensieve --help)"
    ]
    code, _, err = run_cli(["frobnicate"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "invalid choice: 'frobnicate'" in err


def test_needle_has_no_seed_but_ruler_does(capsys):
    fails(["eval", "needle", "--seed", "3"], capsys, "unrecognized arguments: --seed 3")
    fails(["needle", "--seed", "3"], capsys, "unrecognized arguments: --seed 3")
    fails(["eval", "ruler", "--seed", "x"], capsys, "--seed", "'x'")


# ----- 13. other bad values ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, needles",
    [
        (["eval", "ruler", "--samples", "0"], ["--samples", "'0'", ">= 1"]),
        (["eval", "ppl", "--samples", "-2"], ["--samples", "'-2'"]),
        (["eval", "longbench", "--data", "x.jsonl", "--samples", "0"], ["--samples", "'0'"]),
        (["eval", "needle", "--max-new-tokens", "0"], ["--max-new-tokens", "'0'"]),
        (["eval", "needle", "--lengths", ","], ["--lengths", "at least one size"]),
        (["eval", "needle", "--lengths", "4q"], ["--lengths", "'4q'"]),
        (["eval", "needle", "--depths", "0.5,1.5"], ["--depths", "1.5", "[0, 1]"]),
        (["eval", "needle", "--needle", " "], ["--needle", "non-empty"]),
        (["eval", "ruler", "--num-keys", "0"], ["--num-keys", "'0'"]),
        (["eval", "ruler", "--tasks", ""], ["--tasks", "niah_single"]),
        (["eval", "longbench", "--data", "x.jsonl", "--datasets", ","], ["--datasets", "at least one name"]),
        (["demo", "--depth", "2"], ["--depth", "'2'", "[0, 1]"]),
        (["demo", "--topk", "0"], ["--topk", "'0'"]),
        (["ask", "--file", "x", "--question", "q", "--max-new-tokens", "0"], ["--max-new-tokens", "'0'"]),
        (["ask", "--file", "x", "--question", ""], ["--question", "non-empty", "''"]),
        (["ask", "--file", "x", "--question", "q", "--filter-layer", "-1"], ["--filter-layer", "'-1'"]),
        (["serve", "--max-batch", "0"], ["--max-batch", "'0'", ">= 1"]),
        (["serve", "--max-batch", "two"], ["--max-batch", "'two'", ">= 1"]),
        (["bench", "--shape", "nope"], ["unknown shape 'nope'", "llama3.1-8b"]),
        (["bench", "--shape", "tiny", "--repeats", "0"], ["--repeats", "0"]),
        (["bench", "--shape", "tiny", "--decode-tokens", "-1"], ["--decode-tokens", "-1"]),
        (
            [
                "bench",
                "--shape",
                "tiny",
                "--lengths",
                "16",
                "--repeats",
                "1",
                "--decode-tokens",
                "0",
                "--methods",
                "full",
                "--param",
                "budget=3",
            ],
            ["--param budget", "full"],
        ),
    ],
)
def test_bad_values(argv, needles, capsys):
    fails([*argv, *(NO_MODEL if argv[0] != "bench" else [])], capsys, *needles)


def test_bad_files_fail_before_the_model_loads(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    fails(
        ["eval", "needle", "--haystack", "/nonexistent/hay.txt", *NO_MODEL, *out],
        capsys,
        "file /nonexistent/hay.txt does not exist",
    )
    fails(["eval", "ppl", "--file", str(tmp_path), *NO_MODEL, *out], capsys, f"{tmp_path} is a folder")
    fails(
        ["eval", "longbench", "--data", "/nonexistent/lb.jsonl", *NO_MODEL, *out],
        capsys,
        "/nonexistent/lb.jsonl does not exist",
    )
    fails(
        ["ask", "--file", "/nonexistent/doc.txt", "--question", "q", *NO_MODEL],
        capsys,
        "/nonexistent/doc.txt does not exist",
    )
    bad = tmp_path / "lb.jsonl"
    bad.write_text(json.dumps({"context": "c", "answers": ["a"], "dataset": "hotpotqa"}) + "\n[1, 2]\n")
    fails(["eval", "longbench", "--data", str(bad), *NO_MODEL, *out], capsys, f"{bad}:2", "expected a JSON object")
    bad.write_text(json.dumps({"context": "c", "answers": ["a"], "dataset": "hotpotqa"}) + "\n")
    fails(
        ["eval", "longbench", "--data", str(bad), "--datasets", "hotpotqa,qasperr", *NO_MODEL, *out],
        capsys,
        "qasperr",
        "it holds: hotpotqa",
    )
    hay = tmp_path / "hay.txt"
    hay.write_text(TEXT)
    fails(
        ["eval", "needle", "--haystack", str(hay), "--expected", " , ", *NO_MODEL, *out], capsys, "--expected", "' , '"
    )
    fails(
        ["eval", "ppl", "--mode", "sliding", "--methods", "full,gemfilter", "--file", str(hay), *NO_MODEL, *out],
        capsys,
        "--mode sliding",
        "gemfilter",
    )
    fails(
        ["eval", "ruler", "--tasks", "niah_single", "--haystack", str(hay), "--out", str(hay), *NO_MODEL],
        capsys,
        f"{hay} is a file; expected a folder",
    )


def test_report_bad_input(tmp_path, capsys):
    fails(["report", str(tmp_path)], capsys, f"no results files (*.jsonl) in {tmp_path}")
    fails(["report", str(tmp_path / "missing")], capsys, f"no results file or folder at {tmp_path / 'missing'}")
    (tmp_path / "ruler.20240101-120000.jsonl").write_text("{}\n")
    fails(["report", str(tmp_path)], capsys, "only 1 file(s) set aside by --restart")


# ----- constants kept here so that parsing imports no torch -----------------------------------------
def test_constant_lists_match_the_library():
    from tokensieve.bench.timing import SHAPES
    from tokensieve.commands.bench import SHAPE_NAMES
    from tokensieve.commands.calibrate import DEFAULT_WINDOW_SIZE
    from tokensieve.commands.common import METHOD_NAMES, SCORINGS
    from tokensieve.commands.stream import STREAM_METHODS
    from tokensieve.engine.streaming import POLICIES
    from tokensieve.methods import METHODS
    from tokensieve.methods.gemfilter import SCORINGS as GEMFILTER_SCORINGS
    from tokensieve.methods.gemfilter import GemFilter

    assert list(METHOD_NAMES) == list(METHODS)
    assert list(SCORINGS) == list(GEMFILTER_SCORINGS)
    assert list(SHAPE_NAMES) == list(SHAPES)
    assert sorted(STREAM_METHODS) == sorted(POLICIES)
    assert DEFAULT_WINDOW_SIZE == GemFilter().window_size


# ----- 11. fast start: parsing imports no torch --------------------------------------------------------
LIGHT_HELP = [
    [],
    ["ask"],
    ["demo"],
    ["needle"],
    ["eval"],
    ["eval", "needle"],
    ["eval", "ruler"],
    ["eval", "longbench"],
    ["eval", "ppl"],
    ["report"],
    ["bench"],
    ["stream"],
    ["calibrate"],
    ["serve"],
    ["methods"],
    ["models"],
    ["models", "install"],
]


def _python(code: str) -> str:
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_help_and_import_do_not_import_torch():
    out = _python(f"""
        import runpy, sys
        import tokensieve.cli
        print("import", "torch" in sys.modules, "transformers" in sys.modules)
        for argv in {LIGHT_HELP!r}:
            sys.argv = ["tokensieve", *argv, "--help"]
            try:
                runpy.run_module("tokensieve.cli", run_name="__main__", alter_sys=True)
            except SystemExit as e:
                assert e.code == 0, (argv, e.code)
            print(" ".join(argv) or "top", "torch" in sys.modules, "transformers" in sys.modules, file=sys.stderr)
            assert "torch" not in sys.modules and "transformers" not in sys.modules, argv
        import tokensieve
        print("version", tokensieve.__version__, "torch" in sys.modules)
        tokensieve.load_model, tokensieve.generate, tokensieve.METHODS, tokensieve.PromptTooLongError
        print("lazy", "torch" in sys.modules)
    """)
    assert "import False False" in out
    assert "version 0.1.0 False" in out and "lazy True" in out


def test_package_names_still_work():
    import tokensieve
    from tokensieve import generate, load_model  # the PEP 562 __getattr__ serves from-imports too

    assert generate.__module__ == "tokensieve.engine.runner" and load_model.__module__ == "tokensieve.core.models"
    assert set(tokensieve.__all__) <= set(dir(tokensieve))
    for name in tokensieve.__all__:
        assert getattr(tokensieve, name) is not None
    assert tokensieve.methods.FullAttention.name == "full"
    assert "evaluation" in dir(tokensieve) and tokensieve.evaluation.harness.Task  # submodules on first use
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tokensieve.nope  # noqa: B018


# ----- 12. no import cycle ---------------------------------------------------------------------------
def _imports(path: Path, module: str) -> set[str]:
    """tokensieve modules ``path`` imports anywhere (functions included), except under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for child in node.body
        for n in ast.walk(child)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("tokensieve")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tokensieve"):
            out.add(node.module)
    return out


def test_no_import_cycles():
    modules = {}
    for f in (SRC / "tokensieve").rglob("*.py"):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = f
    graph = {m: {i for i in _imports(f, m) if i in modules and i != m} for m, f in modules.items()}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        for n in graph[m]:
            if n in stack:
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in done:
                visit(n, stack + [n])
        done.add(m)

    done: set[str] = set()
    for m in sorted(graph):
        if m not in done:
            visit(m, [m])
    assert cycles == []


# ----- 12. transformers' bars only with -v; --quiet silences everything -----------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("tiny-model"))


def test_progress_bars_only_with_verbose_and_none_with_quiet(model_dir, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    args = [
        "eval",
        "needle",
        "--model",
        str(model_dir),
        "--methods",
        "full",
        "--lengths",
        "600",
        "--depths",
        "0.5",
        "--haystack",
        str(model_dir / "hay.txt"),
        "--max-new-tokens",
        "1",
        "--no-plots",
    ]
    try:
        code, _, err = run_cli([*args, "--out", str(tmp_path / "a")], capsys)
        # the loading line first, tokensieve's own bar, no transformers bar
        assert code == 0 and err.startswith(f"loading {model_dir} ...\n") and "eval needle" in err
        assert "Loading weights" not in err
        code, _, err = run_cli(["-v", *args, "--out", str(tmp_path / "b")], capsys)
        assert code == 0 and "Loading weights" in err and "eval needle" in err  # -v: transformers' bars too
        code, _, err = run_cli([*args, "--out", str(tmp_path / "c"), "--quiet"], capsys)
        assert code == 0 and err == ""
    finally:
        hf_logging.enable_progress_bar()


# ----- bounded reads (issue 22): stdin, files that are not regular files --------------------------------
class _EndlessStdin(io.RawIOBase):
    """Standard input that never ends ('a' forever); reading more than ``budget`` bytes in all is an error, so a
    reader without a bound fails here instead of hanging."""

    def __init__(self, budget: int) -> None:
        self.budget, self.given = budget, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.given > self.budget:
            raise AssertionError(f"read more than {self.budget} bytes of an endless stream")
        b[:] = b"a" * len(b)
        self.given += len(b)
        return len(b)


def test_stdin_is_read_up_to_max_input_bytes(monkeypatch, capsys):
    endless = _EndlessStdin(budget=64 << 10)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(endless), encoding="utf-8"))
    fails(
        ["ask", "--file", "-", "--question", "q", "--max-input-bytes", "1k", *NO_MODEL],
        capsys,
        "standard input is longer than 1024 bytes",
        "--max-input-bytes",
    )
    assert endless.given <= 64 << 10
    _stdin(monkeypatch, b"b" * 1024)  # exactly the limit is read (the run goes on to the model)
    fails(["ask", "--file", "-", "--question", "q", "--max-input-bytes", "1k", *NO_MODEL], capsys, "model path")
    monkeypatch.setattr(sys, "stdin", io.StringIO("c" * 2000))  # a text stream (no .buffer): counted in characters
    from tokensieve.data import read_document

    with pytest.raises(Exception, match="longer than 1999 bytes"):
        read_document("-", max_stdin_bytes=1999)
    code, out, _ = run_cli(["ask", "--help"], capsys)
    assert code == 0 and "--max-input-bytes" in out


def test_endless_stdin_process_ends_with_one_line(tmp_path):
    """``tokensieve ask --file - < /dev/zero`` stops at the default bound (64 MiB) with one line and exit 2."""
    with open("/dev/zero", "rb") as zero:
        res = subprocess.run(
            [sys.executable, "-m", "tokensieve.cli", "ask", "--file", "-", "--question", "q", *NO_MODEL],
            stdin=zero,
            capture_output=True,
            text=True,
            timeout=120,
            env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        )
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [
        f"tokensieve ask: error: standard input is longer than {64 << 20} bytes; "
        f"pass a larger --max-input-bytes or the document as a file"
    ]


def test_files_that_are_not_regular_are_refused(tmp_path, capsys):
    import os

    fifo = tmp_path / "doc.fifo"
    os.mkfifo(fifo)
    broken = tmp_path / "broken.txt"
    broken.symlink_to(tmp_path / "gone.txt")
    for path in (fifo, Path("/dev/zero"), broken):
        fails(ask(path, *NO_MODEL), capsys, f"{path} is not a regular file")
        fails(
            ["eval", "needle", "--haystack", str(path), *NO_MODEL, "--out", str(tmp_path / "o")],
            capsys,
            f"{path} is not a regular file",
        )
    fails(ask(tmp_path, *NO_MODEL), capsys, f"{tmp_path} is a folder")
    fails(ask(tmp_path / "nothing.txt", *NO_MODEL), capsys, "nothing.txt does not exist")


def test_library_bars_off_unless_verbose_in_a_fresh_process():
    """A bar that does not say ``disable=`` itself (transformers' GGUF conversion) is off after ``main`` without -v."""
    code = """
        import sys
        from tokensieve.cli import main
        main([{flags}"methods", "full"])
        from tqdm.auto import tqdm
        print("bar disabled:", tqdm(range(2), file=sys.stderr).disable)
    """
    assert "bar disabled: True" in _python(code.format(flags=""))
    assert "bar disabled: False" in _python(code.format(flags='"-v", '))
