"""`tokensieve methods` (read from the method classes and their docstrings) and `bench`'s refusal of a GPU-sized
shape on the CPU."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import run_cli

from tokensieve.methods import METHODS, describe_methods, make_method, parameter_docs


@pytest.mark.parametrize("name", list(METHODS))
def test_every_parameter_is_documented_in_its_docstring(name):
    """The docstrings' "Parameters:" sections are the one source: a new field without an entry fails here."""
    assert set(parameter_docs(name)) == {f.name for f in dataclasses.fields(METHODS[name])}


def test_methods_json_lists_every_method_with_its_fields_defaults_and_docs(capsys):
    code, out, err = run_cli(["methods", "--json"], capsys)
    assert code == 0 and err == ""
    got = json.loads(out)
    assert [m["name"] for m in got] == list(METHODS)
    for m in got:
        cls = METHODS[m["name"]]
        defaults = make_method(m["name"]).params()
        assert [p["name"] for p in m["parameters"]] == [f.name for f in dataclasses.fields(cls)]
        assert m["summary"].replace("`", "") == cls.__doc__.strip().splitlines()[0].replace("`", "")
        assert m["renamed"] == cls.renamed
        for p in m["parameters"]:
            d = defaults[p["name"]]
            assert p["default"] == (list(d) if isinstance(d, tuple) else d)
            assert p["doc"] == parameter_docs(m["name"])[p["name"]] and p["doc"]
            assert p["meaning"].rstrip(".").replace("`", "") in p["doc"].replace("`", "") or p["meaning"].endswith(
                "..."
            )


def test_methods_text_one_line_per_parameter(capsys):
    code, out, _ = run_cli(["methods", "snapkv", "full"], capsys)
    assert code == 0
    blocks = out.split("\n\n")
    assert blocks[0].startswith("snapkv: SnapKV") and blocks[1].startswith("full: ")
    lines = blocks[0].splitlines()[1:]
    assert [line.split()[0].split("=")[0] for line in lines] == [f.name for f in dataclasses.fields(METHODS["snapkv"])]
    budget = next(line for line in lines if line.lstrip().startswith("budget="))
    assert f"budget={make_method('snapkv').budget}" in budget
    assert describe_methods(["snapkv"])[0]["parameters"][0]["meaning"] in budget
    assert "(no parameters)" in blocks[1]


def test_methods_unknown_name_is_one_line(capsys):
    code, _, err = run_cli(["methods", "snapkvv"], capsys)
    assert code == 2 and err.splitlines() == [
        f"tokensieve methods: error: unknown method 'snapkvv'; expected one of: {', '.join(METHODS)}"
    ]


def test_bench_refuses_a_gpu_sized_shape_on_the_cpu(capsys, monkeypatch):
    import tokensieve.bench.timing
    import tokensieve.core.models

    monkeypatch.setattr(tokensieve.core.models, "default_device", lambda: "cpu")  # a CPU-only machine
    for argv in (["bench"], ["bench", "--shape", "qwen2.5-7b", "--device", "cpu"]):
        code, out, err = run_cli(argv, capsys)
        assert code == 2 and out == "", err
        (line,) = err.splitlines()
        assert line.startswith("tokensieve bench: error: the ") and "GPU-sized" in line
        assert "--shape tiny" in line and "--shape smollm2-135m" in line and "--force" in line

    reached = []

    def fake_run_bench(shape, *args, **kwargs):
        reached.append(shape)
        raise tokensieve.errors.InputError("stopped before building")

    monkeypatch.setattr(tokensieve.bench.timing, "run_bench", fake_run_bench)
    code, _, err = run_cli(["bench", "--force", "--lengths", "16"], capsys)
    assert code == 2 and reached == ["llama3.1-8b"] and "stopped before building" in err
    code, _, err = run_cli(["bench", "--shape", "smollm2-135m", "--lengths", "16"], capsys)  # CPU-sized: no refusal
    assert reached == ["llama3.1-8b", "smollm2-135m"]


def test_bench_shape_sizes_come_from_the_architecture():
    from tokensieve.bench.timing import CPU_MAX_PARAMETERS, shape_parameters

    assert shape_parameters("llama3.1-8b") > CPU_MAX_PARAMETERS > shape_parameters("smollm2-135m")
    # tiny: embeddings + head (256 x 64 each), 4 layers of q/o (64 x 64), k/v (64 x 32), MLP 3 x 64 x 128, 2 norms; final norm
    assert shape_parameters("tiny") == 2 * 256 * 64 + 4 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64
