"""Streaming with a bounded, position-shifted KV cache (tokensieve.engine.streaming, `tokensieve stream`)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import deque

import pytest
import torch
from conftest import PLAIN, TESTS, tiny_model
from transformers import DynamicCache

from tokensieve.engine.streaming import (
    FullPolicy,
    SepLLMPolicy,
    Streamer,
    StreamingLLMPolicy,
    make_policy,
)
from tokensieve.evaluation.stream_ppl import stream_perplexity
from tokensieve.methods.base import cache_kwarg

VOCAB = 96
SEP_IDS = torch.arange(0, 12)  # in the tiny models, ids 0..11 play the separators (1 token in 8)


def tiny(family: str, max_pos: int = 512) -> torch.nn.Module:
    """2 layers; Gemma 3: 3 layers, sliding-window + global, per-layer-type RoPE."""
    return tiny_model(
        family,
        layers=3 if family == "gemma3" else 2,
        vocab=VOCAB,
        max_pos=max_pos,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        **PLAIN,
    )


def stream_ids(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g)


def reference_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """NLL of tokens 1..n-1 from one plain forward (SDPA, no hook)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None]).logits[0].float(), -1)
    return -logp[:-1].gather(1, ids[1:, None])[:, 0]


# ----------------------------------------------------------------- no eviction = the plain model


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_full_stream_equals_one_forward(family, chunk):
    model = tiny(family)
    ids = stream_ids(60)
    res = stream_perplexity(model, ids, FullPolicy(), chunk_size=chunk)
    assert res.tokens_scored == 59
    torch.testing.assert_close(torch.tensor(res.nll), reference_nll(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", [SepLLMPolicy(4, 8, 16, 100), StreamingLLMPolicy(4, 100)])
def test_budget_at_least_n_equals_full(policy):
    model = tiny("llama")
    ids = stream_ids(90)
    res = stream_perplexity(model, ids, policy, SEP_IDS, chunk_size=7)
    torch.testing.assert_close(torch.tensor(res.nll), reference_nll(model, ids), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------- position shifting vs an independent reference


def shifted_reference_nll(model, ids: torch.Tensor, policy, chunk: int) -> torch.Tensor:
    """Slow reference: transformers' own DynamicCache + SDPA, keys kept post-RoPE.

    After each chunk the policy picks entries; an entry moving from cache slot i
    to slot j has its key rotated back by (i - j) positions (RoPE composes
    additively), so slot j always holds a key rotated at position j.
    """
    rotary = model.model.rotary_emb
    cache = DynamicCache(config=model.config)
    stream_idx, is_sep = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.bool)
    nll, prev = [], None
    with torch.no_grad():
        for s in range(0, ids.numel(), chunk):
            x = ids[s : s + chunk]
            L = stream_idx.numel()
            out = model(
                x[None], **cache_kwarg(model, cache), position_ids=torch.arange(L, L + x.numel())[None], use_cache=True
            )
            logp = torch.log_softmax(out.logits[0].float(), -1)
            if prev is not None:
                nll.append(-prev[x[0]])
            nll += [-logp[j, x[j + 1]] for j in range(x.numel() - 1)]
            prev = logp[-1]
            stream_idx = torch.cat((stream_idx, torch.arange(s, s + x.numel())))
            is_sep = torch.cat((is_sep, torch.isin(x, SEP_IDS)))
            keep = policy.keep(stream_idx, is_sep)
            if keep is None:
                continue
            delta = keep - torch.arange(keep.numel())  # >= 0: slots only move left
            cos, sin = rotary(torch.zeros(1), delta[None])  # [1, kept, head_dim]
            for layer in cache.layers:
                k = layer.keys[:, :, keep]  # [1, kv_heads, kept, d], rotated at old slot i
                half = k.shape[-1] // 2
                rot = torch.cat((-k[..., half:], k[..., :half]), -1)
                layer.keys = k * cos[:, None] - rot * sin[:, None]  # rotate by -(i - j)
                layer.values = layer.values[:, :, keep]
            stream_idx, is_sep = stream_idx[keep], is_sep[keep]
    return torch.stack(nll)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk", [1, 6])
@pytest.mark.parametrize(
    "policy", [SepLLMPolicy(2, 4, 6, 16), StreamingLLMPolicy(2, 16)], ids=["sepllm", "streamingllm"]
)
def test_shifted_stream_matches_reference(family, chunk, policy):
    model = tiny(family)
    ids = stream_ids(120)
    res = stream_perplexity(model, ids, policy, SEP_IDS, chunk_size=chunk)
    ref = shifted_reference_nll(model, ids, policy, chunk)
    torch.testing.assert_close(torch.tensor(res.nll), ref, atol=2e-4, rtol=2e-4)


def test_chunk_size_one_is_token_by_token():
    model = tiny("llama")
    ids = stream_ids(80)
    policy = SepLLMPolicy(2, 4, 6, 16)
    res = stream_perplexity(model, ids, policy, SEP_IDS, chunk_size=1)
    st = Streamer(model, policy, SEP_IDS)
    logits = torch.cat([st.feed(ids[i : i + 1]) for i in range(ids.numel())])  # [n, vocab]
    manual = -torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(res.nll), manual, atol=1e-5, rtol=1e-5)
    assert st.max_position_used <= policy.capacity  # positions 0..c (c cached + the new token)


def test_positions_stay_below_model_max():
    model = tiny("llama", max_pos=64)
    seen: list[int] = []  # largest position id of every forward the model runs
    handle = model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(int(kwargs["position_ids"].max())), with_kwargs=True
    )
    try:
        for policy in (StreamingLLMPolicy(4, 40), SepLLMPolicy(4, 8, 16, 40)):
            seen.clear()
            res = stream_perplexity(model, stream_ids(500), policy, SEP_IDS, chunk_size=8)
            assert res.tokens_seen == 500
            assert max(seen) < 64 and max(seen) == res.max_position_used <= 40 + 8 - 1
    finally:
        handle.remove()
    # a cache + chunk that would pass the maximum is refused up front
    with pytest.raises(ValueError, match="maximum of 64 positions"):
        stream_perplexity(model, stream_ids(100), StreamingLLMPolicy(4, 60), chunk_size=8)


def test_full_stops_at_max_unless_allow_long():
    model = tiny("llama", max_pos=64)
    res = stream_perplexity(model, stream_ids(100), FullPolicy(), chunk_size=8)
    assert res.tokens_seen == 64 and res.max_position_used == 63
    assert "maximum of 64 positions" in res.stopped and "--allow-long" in res.stopped
    res = stream_perplexity(model, stream_ids(100), FullPolicy(), chunk_size=8, allow_long=True)
    assert res.tokens_seen == 100 and res.max_position_used == 99 and res.stopped == "end of text"


# ----------------------------------------------------------------- RoPE outside the model (tokensieve.core.rope)


@pytest.mark.parametrize("rot_dim, scale", [(16, 1.0), (8, 1.0), (16, 1.7)])
def test_rope_inverse_undoes_rotation(rot_dim, scale):
    from tokensieve.core.rope import apply_rope

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 10, 16, generator=g)
    angles = torch.rand(10, rot_dim // 2, generator=g) * 6.0
    cos = torch.cat((angles.cos(), angles.cos()), -1) * scale  # attention scaling folded into cos/sin
    sin = torch.cat((angles.sin(), angles.sin()), -1) * scale
    y = apply_rope(x, cos, sin)
    assert not torch.allclose(y[..., :rot_dim], x[..., :rot_dim])
    assert torch.equal(y[..., rot_dim:], x[..., rot_dim:])  # partial rotary: the rest is untouched
    torch.testing.assert_close(apply_rope(y, cos, sin, inverse=True), x, atol=1e-5, rtol=1e-5)


def test_rope_tables_rotate_like_the_model():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from tokensieve.core.rope import RopeTables, apply_rope

    model = tiny("llama")
    tables = RopeTables(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 12, 16, generator=g)
    pos = torch.arange(12)[None]
    cos_m, sin_m = model.model.rotary_emb(x, pos)
    ref, _ = apply_rotary_pos_emb(x, x, cos_m, sin_m)
    cos, sin = tables.get(12)
    torch.testing.assert_close(apply_rope(x, cos, sin), ref)


# ----------------------------------------------------------------- SepCache budget and eviction order


def sepcache_reference(n: int, is_sep: list[bool], a: int, s: int, w: int, c: int, chunk: int):
    """Token-level SepCache: initial / separators (deque) / past window / local window."""
    initial, seps, past, local = [], deque(), [], deque()
    for start in range(0, n, chunk):
        for t in range(start, min(n, start + chunk)):
            if t < a:
                initial.append(t)
                continue
            local.append(t)
            if len(local) > w:
                past.append(local.popleft())  # leaves the local window
        if len(initial) + len(seps) + len(past) + len(local) > c:  # compress
            seps.extend(t for t in past if is_sep[t])
            past = []
            while len(seps) > s:
                seps.popleft()  # oldest separator first
        yield start, sorted(initial + list(seps) + past + list(local))


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_sepcache_budget_and_eviction_order(chunk):
    a, s, w, c, n = 3, 5, 8, 24, 700
    policy = SepLLMPolicy(a, s, w, c)
    g = torch.Generator().manual_seed(3)
    seps = (torch.rand(n, generator=g) < 0.15).tolist()
    stream_idx, is_sep = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.bool)
    compressions = 0
    for start, expected in sepcache_reference(n, seps, a, s, w, c, chunk):
        end = min(n, start + chunk)
        stream_idx = torch.cat((stream_idx, torch.arange(start, end)))
        is_sep = torch.cat((is_sep, torch.tensor(seps[start:end])))
        keep = policy.keep(stream_idx, is_sep)
        if keep is not None:
            compressions += 1
            stream_idx, is_sep = stream_idx[keep], is_sep[keep]
        assert stream_idx.tolist() == expected
        assert stream_idx.numel() <= c
        assert stream_idx[:a].tolist() == list(range(min(a, end)))  # initial tokens never leave
    assert compressions > 10


def test_sepllm_stream_never_exceeds_budget_per_layer():
    model = tiny("qwen2")
    policy = SepLLMPolicy(4, 6, 12, 30)
    st = Streamer(model, policy, SEP_IDS)
    ids = stream_ids(600)
    sizes = []
    for s in range(0, 600, 5):
        st.feed(ids[s : s + 5])
        lengths = st.layer_lengths()
        assert len(set(lengths)) == 1 and lengths[0] == st.cache_len <= 30
        if sizes and st.cache_len < sizes[-1]:  # just compressed: between initial and local window only separators
            middle = st.stream_idx[4:-12]
            assert bool(torch.isin(ids[middle], SEP_IDS).all()) and middle.numel() <= 6
        sizes.append(st.cache_len)
    assert max(sizes) > 30 - 5 and min(sizes[20:]) >= 4 + 12  # it fills up and gets compressed


# ----------------------------------------------------------------- bad parameters


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("sepllm", dict(n_initial=-1), "n_initial must be a non-negative integer, got -1"),
        ("sepllm", dict(n_separators=-2), "n_separators must be a non-negative integer"),
        ("sepllm", dict(n_initial=4, n_separators=64, n_recent=256, budget=300), r"a \+ s \+ w < c.*324 >= 300"),
        ("sepllm", dict(n_initial=4, n_separators=64, n_recent=256, budget=324), r"a \+ s \+ w < c"),
        ("sepllm", dict(n_recent=900, budget=800), "local window larger than the budget: n_recent=900"),
        ("streamingllm", dict(budget=-5), "budget must be a non-negative integer, got -5"),
        ("streamingllm", dict(n_initial=4, budget=100, n_recent=200), "n_recent=200 is larger than the budget"),
        ("streamingllm", dict(n_initial=10, budget=10), "recent window of at least 1"),
        ("streamingllm", dict(n_separators=3), "has no parameter"),
        ("full", dict(n_recent=3), "has no parameter"),
        ("h2o", {}, "unknown streaming method"),
    ],
)
def test_bad_parameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        make_policy(name, **params)


def test_cli_rejects_bad_parameters_before_loading(capsys):
    from tokensieve.cli import main

    rc = main(["stream", "--method", "sepllm", "--n-separators", "600", "--model", "/nonexistent"])
    assert rc == 2
    assert "a + s + w < c" in capsys.readouterr().err
    assert main(["stream", "--method", "full", "--budget", "64", "--model", "/nonexistent"]) == 2
    assert "do not apply to --method full" in capsys.readouterr().err


@pytest.mark.real_model
def test_cli_stream_smollm2(tmp_path, capsys):
    from tokensieve.cli import main
    from tokensieve.data import read_text

    text_file = tmp_path / "book.txt"
    text_file.write_text(read_text(None, min_chars=8000)[:8000])
    png = tmp_path / "s.png"
    rc = main(
        [
            "stream",
            "--method",
            "streamingllm",
            "--file",
            str(text_file),
            "--max-tokens",
            "320",
            "--chunk-size",
            "32",
            "--budget",
            "96",
            "--ppl-window",
            "64",
            "--plot",
            str(png),
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens_seen"] == 320 and out["max_cache_entries"] == 96
    assert out["max_position_used"] <= 96 + 32 - 1
    assert 1 < out["perplexity"] < 200  # a real model on English text
    assert png.stat().st_size > 1000


# `tokensieve stream` on the tiny byte model, its chunks slowed down and counted in a file, so that a signal can
# arrive mid-stream; the parent sends it once some chunks were fed.
STREAM_PROBE = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from eval_support import byte_model, byte_tokenizer
import tokensieve.commands.common as common
import tokensieve.evaluation.stream_ppl as sp
common.load = lambda args: (byte_model(seed=3), byte_tokenizer())
real = sp.feed_stream
def slow(*a, **k):
    for i, item in enumerate(real(*a, **k)):
        Path({marker!r}).write_text(str(i + 1))
        time.sleep(0.05)
        yield item
sp.feed_stream = slow
from tokensieve.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_stream_interrupted_writes_what_it_computed(tmp_path, sig):
    text = tmp_path / "long.txt"
    text.write_text("A long text, sentence after sentence. " * 200)  # 7600 bytes: 475 chunks of 16
    marker = tmp_path / "chunks"
    tests = str(TESTS)  # eval_support lives there
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent / "src")}
    p = subprocess.Popen(
        [sys.executable, "-c", STREAM_PROBE.format(tests=tests, marker=str(marker)), "stream", "--file", str(text)]
        + ["--chunk-size", "16", "--budget", "64", "--n-separators", "8", "--n-recent", "32", "--plot", "", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        end = time.monotonic() + 240
        while not (marker.exists() and marker.read_text() and int(marker.read_text()) >= 5):
            assert p.poll() is None and time.monotonic() < end, p.stderr.read() if p.poll() is not None else "slow"
            time.sleep(0.05)
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + sig, err
    res = json.loads(out)
    fed = int(marker.read_text())
    assert res["interrupted"] is True and res["stopped"] == f"interrupted ({signal.Signals(sig).name})"
    assert 5 * 16 <= res["tokens_seen"] == fed * 16 < 7600  # every chunk fed is counted, the rest was not fed
    assert res["tokens_scored"] == res["tokens_seen"] - 1 and math.isfinite(res["perplexity"])
    assert res["max_cache_entries"] <= 64 and res["points"]
    assert "stopping after this chunk" in err
