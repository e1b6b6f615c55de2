"""The one validation vocabulary (tokensieve.errors: check_int, check_number, check_choice): what passes, what
is refused, and the one-line message naming the value and what was expected."""

from __future__ import annotations

import math

import pytest

from tokensieve.errors import InputError, check_choice, check_int, check_number


@pytest.mark.parametrize("value,minimum,maximum", [(0, 0, None), (5, 1, None), (7, 1, 7), (-3, -3, 0)])
def test_check_int_returns_a_value_in_bounds(value, minimum, maximum):
    assert check_int("n", value, minimum, maximum) == value


@pytest.mark.parametrize(
    "value,minimum,maximum,message",
    [
        (0, 1, None, "n must be an integer >= 1, got 0"),
        (8, 1, 7, r"n must be an integer in \[1, 7\], got 8"),
        (0, 1, 7, "n must be an integer >= 1, got 0"),
        (True, 0, None, "n must be an integer >= 0, got True"),  # a bool is not a count
        (2.0, 0, None, "n must be an integer >= 0, got 2.0"),
        ("3", 0, None, "n must be an integer >= 0, got '3'"),
        (None, 0, None, "n must be an integer >= 0, got None"),
    ],
)
def test_check_int_refuses(value, minimum, maximum, message):
    with pytest.raises(InputError, match=f"^{message}$"):
        check_int("n", value, minimum, maximum)


def test_check_int_note_follows_the_expectation():
    with pytest.raises(InputError, match=r"^top_k must be an integer >= 0 \(0 = no limit\), got -1$"):
        check_int("top_k", -1, 0, note=" (0 = no limit)")


@pytest.mark.parametrize(
    "value,kw",
    [
        (0, dict(minimum=0)),
        (0.5, dict(minimum=0, maximum=1, above=True)),
        (1, dict(minimum=0, maximum=1, above=True)),
        (-1e9, {}),
        (3, dict(maximum=3)),
    ],
)
def test_check_number_returns_a_value_in_bounds(value, kw):
    assert check_number("x", value, **kw) == value


@pytest.mark.parametrize(
    "value,kw,message",
    [
        (-0.5, dict(minimum=0), "x must be a number >= 0, got -0.5"),
        (0, dict(minimum=0, maximum=1, above=True), r"x must be a number in \(0, 1\], got 0"),
        (1.5, dict(minimum=0, maximum=1, above=True), r"x must be a number in \(0, 1\], got 1.5"),
        (0, dict(minimum=0, above=True), "x must be a number > 0, got 0"),
        (4, dict(maximum=3), "x must be a number <= 3, got 4"),
        (math.inf, dict(minimum=0), "x must be a number >= 0, got inf"),
        (math.nan, {}, "x must be a number, got nan"),
        (False, {}, "x must be a number, got False"),
        ("1", {}, "x must be a number, got '1'"),
    ],
)
def test_check_number_refuses(value, kw, message):
    with pytest.raises(InputError, match=f"^{message}$"):
        check_number("x", value, **kw)


def test_check_choice():
    assert check_choice("pooling", "max", ("max", "mean")) == "max"
    with pytest.raises(InputError, match=r"^pooling must be one of 'max', 'mean', got 'median'$"):
        check_choice("pooling", "median", ("max", "mean"))
    with pytest.raises(InputError, match=r"^mode must be one of 'a', got \['a'\]$"):
        check_choice("mode", ["a"], iter(["a"]))  # any iterable of choices; an unhashable value is refused


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: __import__("tokensieve").Sampling(top_p=0), r"top_p must be a number in \(0, 1\], got 0"),
        (
            lambda: __import__("tokensieve").Sampling(temperature=-1),
            r"temperature must be a number >= 0 \(0 = greedy\)",
        ),
        (
            lambda: __import__("tokensieve").make_method("snapkv", pooling="median").validate(None, 1),
            "pooling must be one of 'avg', 'max', got 'median'",
        ),
    ],
)
def test_the_package_speaks_the_vocabulary(call, message):
    with pytest.raises(InputError, match=message):
        call()
