"""One name per idea: methods, streaming policies and `tokensieve stream` flags use the approved vocabulary,
and the old names still work for one release with a deprecation message."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tokensieve.cli import main
from tokensieve.engine.streaming import POLICIES, make_policy
from tokensieve.errors import InputError
from tokensieve.methods import METHODS, make_method

# window_size: observation window of scoring queries; n_initial: first tokens always kept;
# n_recent: recent / local window kept; budget: KV entries kept per layer; n_separators: SepCache separators.
APPROVED = {"window_size", "n_initial", "n_recent", "budget", "n_separators"}
# Names that meant one of those ideas before, and must not be parameters any more.
RETIRED = {"window", "sinks", "initial", "init_size", "cache_size", "sep_size", "local_size", "recent"}

METHOD_RENAMES = {
    "gemfilter": {"window": "window_size"},
    "snapkv": {"window": "window_size"},
    "h2o": {"window": "n_recent"},
    "streamingllm": {"sinks": "n_initial"},
    "sepllm": {"initial": "n_initial", "window": "n_recent"},
}
POLICY_RENAMES = {
    "streamingllm": {"init_size": "n_initial", "cache_size": "budget", "window": "n_recent"},
    "sepllm": {"init_size": "n_initial", "sep_size": "n_separators", "local_size": "n_recent", "cache_size": "budget"},
}


def policy_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("name", list(METHODS))
def test_method_params_use_the_vocabulary(name):
    cls = METHODS[name]
    keys = set(make_method(name).params())
    assert not keys & RETIRED, f"{name} still has {sorted(keys & RETIRED)}"
    assert cls.renamed == METHOD_RENAMES.get(name, {})
    for old, new in cls.renamed.items():
        assert old in RETIRED and new in APPROVED and new in keys and old not in keys


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_params_use_the_vocabulary(name):
    cls = POLICIES[name]
    keys = set(cls().params())
    assert keys == set(policy_fields(cls))
    assert not keys & RETIRED and keys <= APPROVED
    assert cls.renamed == POLICY_RENAMES.get(name, {})
    for old, new in cls.renamed.items():
        assert new in keys and old not in keys


@pytest.mark.parametrize("name, old, new", [(m, o, n) for m, r in METHOD_RENAMES.items() for o, n in r.items()])
def test_old_method_names_still_work_with_a_future_warning(name, old, new):
    value = 3
    with pytest.warns(FutureWarning, match=rf"{name}: parameter '{old}' is now called '{new}'"):
        m = make_method(name, **{old: value})
    assert getattr(m, new) == value and m.params()[new] == value and old not in m.params()
    assert m == make_method(name, **{new: value})
    with pytest.raises(InputError, match="not both"), pytest.warns(FutureWarning):
        make_method(name, **{old: value, new: value})


@pytest.mark.parametrize("name, old, new", [(p, o, n) for p, r in POLICY_RENAMES.items() for o, n in r.items()])
def test_old_policy_names_still_work_with_a_future_warning(name, old, new):
    value = {"n_initial": 2, "n_separators": 5, "n_recent": 16, "budget": 900}[new]
    with pytest.warns(FutureWarning, match=rf"streaming {name}: parameter '{old}' is now called '{new}'"):
        p = make_policy(name, **{old: value})
    assert getattr(p, new) == value and p.params()[new] == value
    assert p == make_policy(name, **{new: value})
    with pytest.raises(InputError, match="not both"), pytest.warns(FutureWarning):
        make_policy(name, **{old: value, new: value})


def test_new_names_give_no_warning(recwarn):
    for name in METHOD_RENAMES:
        make_method(name, **{new: 3 for new in METHOD_RENAMES[name].values()})
    make_policy("sepllm", n_initial=4, n_separators=8, n_recent=16, budget=100)
    make_policy("streamingllm", n_initial=4, n_recent=16, budget=100)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_stream_cli_old_flags_are_hidden_aliases_with_one_deprecation_line(capsys):
    argv = ["stream", "--method", "streamingllm", "--init-size", "2", "--cache-size", "-5", "--model", "/nonexistent"]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    deprecations = [line for line in err if "deprecated" in line]
    assert deprecations == [
        "tokensieve stream: --init-size is deprecated, use --n-initial (the old flag goes in the next release)",
        "tokensieve stream: --cache-size is deprecated, use --budget (the old flag goes in the next release)",
    ]
    assert any("budget must be a non-negative integer, got -5" in line for line in err)  # the value reached `budget`

    assert main(["stream", "--method", "sepllm", "--sep-size", "600", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.count("deprecated") == 1 and "a + s + w < c" in err  # --sep-size became n_separators

    assert main(["stream", "--method", "sepllm", "--window", "8", "--n-recent", "8", "--model", "/nonexistent"]) == 2
    assert "give --n-recent or its old name --window, not both" in capsys.readouterr().err


def test_stream_help_shows_only_the_new_flags(capsys):
    with pytest.raises(SystemExit):
        main(["stream", "--help"])
    out = capsys.readouterr().out
    for flag in ("--n-initial", "--n-separators", "--n-recent", "--budget"):
        assert flag in out
    for flag in ("--init-size", "--sep-size", "--cache-size"):
        assert flag not in out
    assert not re.search(r"(?<![\w-])--window\b", out)  # --ppl-window is another idea and stays
