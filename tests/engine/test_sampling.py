"""Sampling (temperature, top-k, top-p, seed) against a slow reference, and its bad values."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyTokenizer, random_ids, tiny_model

from tokensieve.engine.runner import Sampling, generate
from tokensieve.errors import InputError


def allowed_reference(logits: list[float], temperature: float, top_k: int, top_p: float) -> set[int]:
    """Tokens a sampler may draw: written out with plain Python sorting and sums."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    if top_k:
        order = order[:top_k]
    m = max(scaled[i] for i in order)
    w = {i: torch.tensor(scaled[i] - m).exp().item() for i in order}
    total = sum(w.values())
    keep, acc = set(), 0.0
    for i in order:  # a token stays while the ones before it have not reached top_p
        if acc >= top_p:
            break
        keep.add(i)
        acc += w[i] / total
    return keep


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.5), (5, 0.8), (1, 1.0)])
def test_draws_stay_in_the_reference_set(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    s = Sampling(temperature=0.7, top_k=top_k, top_p=top_p, seed=3)
    g = s.generator(torch.device("cpu"))
    draws = {int(s.choose(logits, g)) for _ in range(400)}
    allowed = allowed_reference(logits[0].tolist(), 0.7, top_k, top_p)
    assert draws <= allowed
    if len(allowed) > 1:
        assert len(draws) > 1  # it really samples


def test_greedy_default_and_seeded_reproducibility():
    model, tok, ids = tiny_model("llama"), TinyTokenizer(), random_ids(24, seed=2)
    greedy = generate(model, tok, ids, max_new_tokens=12)
    assert (
        generate(model, tok, ids, max_new_tokens=12, sampling=Sampling(temperature=0.0)).token_ids == greedy.token_ids
    )
    assert (
        generate(model, tok, ids, max_new_tokens=12, sampling=Sampling(temperature=1.0, top_k=1)).token_ids
        == greedy.token_ids
    )
    a = generate(model, tok, ids, max_new_tokens=12, sampling=Sampling(temperature=1.5, seed=7))
    b = generate(model, tok, ids, max_new_tokens=12, sampling=Sampling(temperature=1.5, seed=7))
    c = generate(model, tok, ids, max_new_tokens=12, sampling=Sampling(temperature=1.5, seed=8))
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(seed="x"), "seed"),
    ],
)
def test_bad_sampling_parameters(kwargs, match):
    with pytest.raises(InputError, match=match):
        Sampling(**kwargs)


def test_on_token_streams_every_token_and_can_stop():
    model, tok, ids = tiny_model("llama"), TinyTokenizer(), random_ids(24, seed=2)
    seen: list[int] = []
    res = generate(model, tok, ids, max_new_tokens=10, on_token=seen.append)
    assert seen == res.token_ids and len(seen) == 10
    stopped: list[int] = []
    res = generate(model, tok, ids, max_new_tokens=10, on_token=lambda t: stopped.append(t) or len(stopped) < 4)
    assert stopped == res.token_ids == seen[:4]


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-45, 1e-38, 1e-8, 9.9e-6])
def test_tiny_and_denormal_temperatures_are_greedy(temperature):
    torch.manual_seed(1)
    logits = torch.randn(3, 50) * 8
    for top_p, top_k in [(1.0, 0), (0.3, 0), (1e-300, 5)]:
        s = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=0)
        assert s.greedy and s.generator(torch.device("cpu")) is None
        assert s.choose(logits, None).tolist() == logits.argmax(-1, keepdim=True).tolist()


@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-46, 1e-12])
def test_a_tiny_top_p_keeps_the_most_likely_token(top_p):
    torch.manual_seed(2)
    logits = torch.randn(4, 64) * 3
    for temperature in (1e-5, 0.5, 2.0):
        s = Sampling(temperature=temperature, top_p=top_p, seed=5)
        g = s.generator(torch.device("cpu"))
        for _ in range(20):  # only the most likely token survives top_p: every draw is the argmax
            assert s.choose(logits, g).tolist() == logits.argmax(-1, keepdim=True).tolist()


def test_rows_without_a_finite_probability_fall_back_to_the_argmax():
    logits = torch.full((2, 8), float("-inf"))
    logits[1, 3] = 0.0
    logits[0, 5] = float("nan")
    s = Sampling(temperature=1.0, top_p=0.5, seed=0)
    out = s.choose(logits, s.generator(torch.device("cpu")))
    assert out.shape == (2, 1) and out[1, 0] == 3 and 0 <= int(out[0, 0]) < 8
