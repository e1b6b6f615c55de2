"""Modules that moved into subpackages: every old import path still works for one release (the same module
object, one DeprecationWarning naming the new path), and the public API keeps its names."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TinyTokenizer, random_ids, tiny_model

import tokensieve
from tokensieve._moved import MOVED, MOVED_NAMES, PACKAGE_NOW

SRC = Path(tokensieve.__file__).parent


def deprecations(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, DeprecationWarning) and "moved to" in str(w.message)]


def test_no_file_is_left_at_an_old_path():
    for old in MOVED:
        assert not (SRC.parent / (old.replace(".", "/") + ".py")).exists(), old
    for new in MOVED.values():
        assert (SRC.parent / (new.replace(".", "/") + ".py")).is_file(), new


@pytest.mark.parametrize("old", sorted(MOVED))
@pytest.mark.filterwarnings("default::DeprecationWarning")  # this test checks the warning; never an error here
def test_an_old_path_is_the_new_module_and_warns_once(old, monkeypatch):
    new = MOVED[old]
    monkeypatch.delitem(sys.modules, old, raising=False)  # as if never imported through the old path
    parent, _, child = old.rpartition(".")
    if child in vars(sys.modules[parent]):  # (hasattr would import it through the package's __getattr__)
        monkeypatch.delattr(sys.modules[parent], child)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
        again = importlib.import_module(old)
        from_import = getattr(__import__(parent, fromlist=[child]), child)
    assert module is importlib.import_module(new) and again is module and from_import is module
    assert module.__name__ == new and module.__spec__.name == new  # the module keeps its own identity
    found = deprecations(caught)
    assert len(found) == 1, [str(w.message) for w in caught]
    assert f"{old} moved to {new}" in str(found[0].message)
    assert found[0].filename == __file__  # it points at the importing line, not at the import machinery


def test_an_old_path_works_in_a_fresh_process_and_names_the_new_one():
    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "from tokensieve.runner import generate\n"
        "import tokensieve.prefix_cache as pc, tokensieve.engine.runner as r\n"
        "assert generate is r.generate and pc.PrefixStore.__module__ == 'tokensieve.engine.prefix_cache'\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(SRC.parent)},
    )
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "DeprecationWarning" in ln]
    assert len(lines) == 2 and "tokensieve.runner moved to tokensieve.engine.runner" in lines[0], out.stderr
    assert "tokensieve.prefix_cache moved to tokensieve.engine.prefix_cache" in lines[1]


@pytest.mark.parametrize("package", sorted(PACKAGE_NOW))
def test_a_package_that_took_an_old_module_name_serves_its_names(package):
    holder = importlib.import_module(PACKAGE_NOW[package])
    pkg = importlib.import_module(package)
    public = [
        n
        for n, v in vars(holder).items()
        if not n.startswith("_") and getattr(v, "__module__", None) == holder.__name__
    ]
    assert len(public) >= 3
    for name in public:
        with pytest.warns(DeprecationWarning, match=f"{package}.{name} moved to {PACKAGE_NOW[package]}.{name}"):
            assert getattr(pkg, name) is getattr(holder, name)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        pkg.no_such_name  # noqa: B018


def test_every_public_name_keeps_working():
    assert set(tokensieve.__all__) >= {
        "generate",
        "generate_batch",
        "load_model",
        "make_method",
        "Sampling",
        "InputError",
        "selection_text",
        "score_continuation",
        "METHODS",
    }
    for name in tokensieve.__all__:
        value = getattr(tokensieve, name)
        assert value is getattr(importlib.import_module(tokensieve._EXPORTS[name]), name)
    from tokensieve import InputError, Sampling, generate, load_model, make_method  # noqa: F401

    assert issubclass(InputError, ValueError) and Sampling().temperature == 0
    assert make_method("gemfilter", topk=8).topk == 8
    with pytest.raises(InputError, match="unknown method 'nope'"):
        make_method("nope")


def test_the_prefix_cache_classes_keep_working():
    from tokensieve.engine.prefix_cache import PrefixReuse, PrefixStore

    model, doc = tiny_model("llama", layers=2), random_ids(40, seed=3)
    store = PrefixStore(1 << 24)
    ids = torch.cat([doc, random_ids(6, seed=4)], dim=1)
    ref = tokensieve.generate(model, TinyTokenizer(), ids, method="full", max_new_tokens=3)
    answers = [
        tokensieve.generate(
            model,
            TinyTokenizer(),
            ids,
            method=PrefixReuse(tokensieve.make_method("full"), store, store_tokens=40),
            max_new_tokens=3,
        )
        for _ in range(2)
    ]
    assert [a.token_ids for a in answers] == [ref.token_ids] * 2
    assert store.stats.misses == 1 and store.stats.hits == 1 and answers[1].details["prefix_cached_tokens"] > 0


@pytest.mark.parametrize("module,name", [(m, n) for m, names in MOVED_NAMES.items() for n in names])
def test_a_name_that_moved_out_of_a_module_is_served_with_a_warning(module, name):
    new = MOVED_NAMES[module][name]
    with pytest.warns(DeprecationWarning, match=f"{module}.{name} moved to {new}.{name}"):
        value = getattr(importlib.import_module(module), name)
    assert value == getattr(importlib.import_module(new), name)  # (STATIC_METHODS is derived on each look-up)
    assert name not in vars(importlib.import_module(module))  # served, not defined there
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        importlib.import_module(module).no_such_name  # noqa: B018
