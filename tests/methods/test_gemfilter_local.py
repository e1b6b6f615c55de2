"""GemFilter's local filter pass (sinks + recent window in layers 0..r-1) and accurate RoPE past 1M positions."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_ids, tiny_model

import tokensieve
from tokensieve.core.rope import accurate_rope
from tokensieve.errors import InputError
from tokensieve.methods import gemfilter as gf
from tokensieve.methods.gemfilter import GemFilter, local_attention, local_mask, pool_and_select


def hand_mask(n: int, n_initial: int, n_recent: int, sliding: int | None = None) -> torch.Tensor:
    """[n, n] bool, element by element: query i sees key j iff j <= i and (j is a sink or within the window)."""
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            if sliding is not None:
                m[i, j] = i - j < sliding
            else:
                m[i, j] = j < n_initial or i - j < n_recent
    return m


def masked_attention_reference(q, k, v, scale, mask):
    """Dense float64 attention with an explicit [n, n] mask, GQA by repetition: [1, hq, n, d]."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, dim=1), v.double().repeat_interleave(g, dim=1)
    logits = (q.double() @ k.transpose(-1, -2)) * scale
    return logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("n_initial,n_recent", [(0, 1), (3, 5), (4, 16), (2, 100)])
def test_local_mask_matches_hand_written_mask(n_initial, n_recent):
    pos = torch.arange(40)
    assert torch.equal(local_mask(pos, pos, n_initial, n_recent), hand_mask(40, n_initial, n_recent))


@pytest.mark.parametrize("n_initial,n_recent,chunk", [(0, 3, 4), (3, 5, 7), (4, 16, 10), (2, 100, 13), (4, 8, 1000)])
def test_local_attention_equals_dense_masked_reference(n_initial, n_recent, chunk):
    torch.manual_seed(0)
    n, d = 57, 8
    q, k, v = torch.randn(1, 4, n, d), torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    got = local_attention(q, k, v, 0.3, n_initial, n_recent, query_chunk=chunk)
    ref = masked_attention_reference(q, k, v, 0.3, hand_mask(n, n_initial, n_recent))
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # the last 20 queries over a cache holding only the sinks and the keys from position lo on
    lo = max(min(n_initial, n - 20), n - 20 - n_recent + 1)
    held = torch.cat([torch.arange(min(n_initial, lo)), torch.arange(lo, n)])
    part = local_attention(
        q[:, :, -20:], k[:, :, held], v[:, :, held], 0.3, n_initial, n_recent, query_chunk=chunk, key_positions=held
    )
    torch.testing.assert_close(part.double(), ref[:, :, -20:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_initial,n_recent", [(0, 3), (3, 5), (4, 16), (2, 100)])
@pytest.mark.parametrize("nq", [57, 20])
def test_flex_local_attention_equals_dense_masked_reference(n_initial, n_recent, nq):
    """The FlexAttention kernel (its eager reference on CPU) applies the same sinks + band rule, also for the
    last ``nq`` queries over all keys."""
    torch.manual_seed(1)
    n, d = 57, 8
    q, k, v = torch.randn(1, 4, n, d), torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    ref = masked_attention_reference(q, k, v, 0.3, hand_mask(n, n_initial, n_recent))
    got = local_attention(q[:, :, -nq:], k, v, 0.3, n_initial, n_recent, kernel="flex")
    torch.testing.assert_close(got.double(), ref[:, :, -nq:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_flex_and_sdpa_local_kernels_select_alike(family):
    model = model_for(family, seed=3)
    ids = random_ids(60, seed=5)
    kw = dict(topk=17, filter_layer=2, window_size=8, filter_attention="local", n_initial=2, n_recent=9)
    a = GemFilter(local_kernel="sdpa", **kw).scores(model, ids)
    b = GemFilter(local_kernel="flex", **kw).scores(model, ids)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("scoring", ["paper", "window"])
def test_local_with_window_at_least_n_equals_dense(family, scoring):
    model = model_for(family, seed=1)
    ids = random_ids(70, seed=4)
    r = len(model.model.layers) - 2
    dense = GemFilter(topk=20, filter_layer=r, scoring=scoring, window_size=8, filter_attention="dense")
    for w in (70, 500):
        local = GemFilter(topk=20, filter_layer=r, scoring=scoring, window_size=8, filter_attention="local", n_recent=w)
        local.validate(model, 70)
        torch.testing.assert_close(local.scores(model, ids), dense.scores(model, ids), rtol=1e-4, atol=1e-5)
        assert local.select(model, ids).tolist() == dense.select(model, ids).tolist()


def model_for(family: str, seed: int):
    """Tiny model; Gemma 3 with 8 layers so that a full-attention layer (5) lies below filter layer 6."""
    return tiny_model(family, seed=seed, layers=8) if family == "gemma3" else tiny_model(family, seed=seed)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_small_window_changes_the_scores(family):
    """The local pass is not silently dense: a 4-token window moves the scores (Gemma 3: through its one
    full-attention layer below r; its sliding layers are local already)."""
    model = model_for(family, seed=1)
    ids = random_ids(70, seed=4)
    r = len(model.model.layers) - 2
    dense = GemFilter(topk=20, filter_layer=r, filter_attention="dense").scores(model, ids)
    local = GemFilter(topk=20, filter_layer=r, filter_attention="local", n_initial=2, n_recent=4).scores(model, ids)
    assert (local - dense).abs().max() > 1e-3


def reference_local_scores(model, ids, r: int, scoring: str, window: int, n_initial: int, n_recent: int):
    """Slow reference: the model's own modules, each attention below layer r replaced by dense float64
    attention under a hand-written sinks+window mask (sliding layers: their own window), then GemFilter's
    scores at layer r computed head by head with explicit loops."""
    n = ids.shape[1]
    captured = {}

    def hook(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx == r:
            captured["q"], captured["k"] = query, key
            raise gf._FilterDone(torch.zeros(1))
        sw = getattr(module, "sliding_window", None)
        mask = hand_mask(n, n_initial, n_recent, sliding=sw or None)
        out = masked_attention_reference(query, key, value, module.scaling, mask).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None

    with torch.no_grad(), pytest.raises(gf._FilterDone):
        model(input_ids=ids, use_cache=False, **{gf.HOOK_KWARG: hook})
    q, k = captured["q"][0].double(), captured["k"][0].double()  # [hq, n, d], [hkv, n, d]
    hq, hkv = q.shape[0], k.shape[0]
    scale = model.model.layers[r].self_attn.scaling
    scores = torch.zeros(n, dtype=torch.float64)
    for h in range(hq):
        kh = k[h // (hq // hkv)]
        if scoring == "paper":
            scores += kh @ q[h, -1]
        else:
            for i in range(n - window, n):
                scores[: i + 1] += torch.softmax((kh[: i + 1] @ q[h, i]) * scale, dim=0)
    return scores


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("scoring", ["paper", "window"])
def test_local_selection_matches_slow_reference(family, scoring):
    model = model_for(family, seed=3)
    ids = random_ids(60, seed=5)
    for r, n_initial, w in ((1, 0, 3), (3, 4, 9), (len(model.model.layers) - 2, 2, 20)):
        m = GemFilter(
            topk=17,
            filter_layer=r,
            scoring=scoring,
            window_size=8,
            filter_attention="local",
            n_initial=n_initial,
            n_recent=w,
        )
        got = m.scores(model, ids)
        ref = reference_local_scores(model, ids, r, scoring, 8, n_initial, w)
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
        assert m.select(model, ids).tolist() == pool_and_select(ref, 17, dilation=m.dilation).tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("scoring", ["paper", "window"])
@pytest.mark.parametrize("n_initial,w,chunk", [(4, 9, 16), (0, 30, 16), (3, 5, 7), (4, 200, 16)])
def test_local_chunked_equals_unchunked(family, scoring, n_initial, w, chunk):
    model = tiny_model(family, seed=2)
    ids = random_ids(103, seed=2)
    kw = dict(
        topk=20,
        filter_layer=3,
        scoring=scoring,
        window_size=5,
        filter_attention="local",
        n_initial=n_initial,
        n_recent=w,
    )
    one, chunked = GemFilter(**kw), GemFilter(**kw, chunk_size=chunk)
    chunked.validate(model, 103)
    torch.testing.assert_close(chunked.scores(model, ids), one.scores(model, ids), rtol=1e-4, atol=1e-4)
    assert chunked.select(model, ids).tolist() == one.select(model, ids).tolist()


def test_local_chunked_pass_holds_only_sinks_and_window(monkeypatch):
    """Below layer r the streamed pass attends over at most n_initial + n_recent - 1 + chunk keys,
    and each layer's input is one chunk (the prompt's hidden states are never resident at once)."""
    model = tiny_model("llama", seed=2)
    n, chunk, n_initial, w = 203, 16, 4, 9
    seen: list[tuple[int, int]] = []
    real = gf._sdpa_masked

    def spy(query, key, value, mask, scale):
        seen.append((query.shape[2], key.shape[2]))
        return real(query, key, value, mask, scale)

    monkeypatch.setattr(gf, "_sdpa_masked", spy)
    inputs: list[int] = []
    handles = [
        layer.register_forward_pre_hook(
            lambda mod, args, kw: inputs.append(
                kw["hidden_states"].shape[1] if "hidden_states" in kw else args[0].shape[1]
            ),
            with_kwargs=True,
        )
        for layer in model.model.layers
    ]
    try:
        GemFilter(
            topk=20,
            filter_layer=3,
            filter_attention="local",
            n_initial=n_initial,
            n_recent=w,
            chunk_size=chunk,
            window_size=4,
        ).scores(model, random_ids(n, seed=1))
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 3 * math.ceil(n / chunk)  # every chunk through layers 0..2
    assert max(k for _, k in seen) <= n_initial + w - 1 + chunk
    assert max(q for q, _ in seen) <= chunk and max(inputs) <= chunk  # 203 = 12 * 16 + 11: the tail is a chunk


def test_local_through_generate_selects_like_dense_when_window_covers_prompt(tok):
    model = tiny_model("llama", seed=0)
    ids = random_ids(80, seed=7)
    dense = tokensieve.generate(
        model, tok, ids, method="gemfilter", topk=30, filter_layer=2, max_new_tokens=6, filter_attention="dense"
    )
    local = tokensieve.generate(
        model,
        tok,
        ids,
        method="gemfilter",
        topk=30,
        filter_layer=2,
        max_new_tokens=6,
        filter_attention="local",
        n_recent=80,
    )
    assert local.kept_indices == dense.kept_indices and local.token_ids == dense.token_ids
    small = tokensieve.generate(
        model,
        tok,
        ids,
        method="gemfilter",
        topk=30,
        filter_layer=2,
        max_new_tokens=6,
        filter_attention="local",
        n_initial=2,
        n_recent=8,
    )
    assert len(small.kept_indices) == 30 and small.kept_indices == sorted(set(small.kept_indices))


@pytest.mark.parametrize(
    "params,match",
    [
        (dict(filter_attention="sparse"), "filter_attention must be one of .* got 'sparse'"),
        (dict(filter_attention="local", n_recent=0), "n_recent"),
        (dict(filter_attention="local", n_initial=-1), "n_initial"),
        (dict(filter_attention="local", local_kernel="triton"), "local_kernel must be one of .* got 'triton'"),
    ],
)
def test_bad_local_parameters_give_clear_errors(params, match):
    with pytest.raises(InputError, match=match):
        GemFilter(topk=8, filter_layer=1, **params).validate(tiny_model("llama"), 40)


# --- RoPE past a million positions -------------------------------------------------------------------------


def llama_rotary(**rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_parameters=dict(rope_type="default", rope_theta=500000.0) | rope,
    )
    return LlamaRotaryEmbedding(cfg)


def angle_error(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> float:
    """Largest |angle - exact angle| (radians, wrapped) over positions and frequencies, exact = float64
    ``position * inv_freq`` (the model's own inv_freq, so only the arithmetic is judged)."""
    half = inv_freq.shape[0]
    got = torch.atan2(sin[0, :, :half].double(), cos[0, :, :half].double())
    exact = positions.double()[:, None] * inv_freq.double()[None]
    diff = torch.remainder(got - exact + math.pi, 2 * math.pi) - math.pi
    return float(diff.abs().max())


POSITIONS_1M = torch.arange(1_000_000, 1_000_000 + 2048)
POSITIONS_4M = torch.arange(4_000_000, 4_000_000 + 2048)


def test_model_rotary_angles_drift_past_a_million_positions():
    """Measures the float32 angle error of transformers' own rotary_emb (Llama-3.1 shape, theta 5e5):
    about ulp(p)/2 in the fastest dimension, i.e. ~0.03 rad at 1M and ~0.125 rad at 4M, far above the
    ~1e-6 at 4k. This is why the long filter pass computes its own RoPE."""
    rot = llama_rotary()
    errs = {}
    for name, pos in (("4k", torch.arange(4096)), ("1M", POSITIONS_1M), ("4M", POSITIONS_4M)):
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos[None])
        errs[name] = angle_error(cos, sin, pos, rot.inv_freq)
    assert errs["4k"] < 1e-3
    assert errs["1M"] > 0.01 and errs["4M"] > 0.05, errs


@pytest.mark.parametrize(
    "rope",
    [
        {},
        dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ],
)
def test_accurate_rope_stays_exact_past_a_million_and_matches_the_model_below(rope):
    rot = llama_rotary(**rope)
    for pos in (POSITIONS_1M, POSITIONS_4M):
        cos, sin = accurate_rope(rot, pos, torch.float32)
        assert angle_error(cos, sin, pos, rot.inv_freq) < 1e-5
    pos = torch.arange(8192)
    ref = rot(torch.zeros(1, dtype=torch.float32), pos[None])
    got = accurate_rope(rot, pos, torch.float32)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=2e-3)  # float32 angle rounding at 8k: ~5e-4
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=2e-3)


def test_chunked_passes_use_accurate_rope(monkeypatch):
    """Both chunked passes get their cos/sin from accurate_rope (at every chunk's positions)."""
    import tokensieve.core.rope as rope_mod

    calls: list[int] = []
    real = rope_mod.accurate_rope
    monkeypatch.setattr(
        rope_mod, "accurate_rope", lambda rot, pos, dtype: calls.append(int(pos[0])) or real(rot, pos, dtype)
    )
    model = tiny_model("llama", seed=2)
    ids = random_ids(64, seed=1)
    for attn in ("dense", "local"):
        calls.clear()
        GemFilter(topk=8, filter_layer=2, filter_attention=attn, n_recent=8, chunk_size=16).scores(model, ids)
        assert sorted(set(calls)) == [0, 16, 32, 48], attn


def test_defaults_dense_and_auto_local_from_64k_with_a_2048_window():
    """The measured default (docs/gemfilter.md): dense, since local lost accuracy on both embedded models; "auto"
    takes local (4 sinks, w = 2048) from 64k tokens on, where it is faster."""
    from tokensieve.methods.gemfilter import LOCAL_FROM_TOKENS

    assert GemFilter().filter_attention == "dense" and not GemFilter().uses_local(10**7, tiny_model("llama"))
    m = GemFilter(filter_attention="auto")
    assert (m.n_initial, m.n_recent, LOCAL_FROM_TOKENS) == (4, 2048, 65536)
    assert not m.uses_local(65535) and m.uses_local(65536)
    assert GemFilter(filter_attention="local").uses_local(10) and not GemFilter(filter_attention="dense").uses_local(
        10**7
    )
    # not on models with sliding-window layers (Gemma 3), where the local pass lost recall
    assert m.uses_local(10**6, tiny_model("llama")) and not m.uses_local(10**6, tiny_model("gemma3"))
    assert GemFilter(filter_attention="local").uses_local(10, tiny_model("gemma3"))


def test_auto_switches_to_the_local_pass_from_the_threshold(monkeypatch):
    """ "auto" gives the dense scores below the threshold and the local ones from it (threshold lowered for a tiny model)."""
    import tokensieve.methods.gemfilter as gf

    model, ids = tiny_model("llama"), random_ids(48, seed=3)
    kw = dict(topk=8, filter_layer=3, n_initial=2, n_recent=6)
    dense = GemFilter(filter_attention="dense", **kw).scores(model, ids)
    local = GemFilter(filter_attention="local", **kw).scores(model, ids)
    assert not torch.allclose(dense, local)
    monkeypatch.setattr(gf, "LOCAL_FROM_TOKENS", 49)
    torch.testing.assert_close(GemFilter(filter_attention="auto", **kw).scores(model, ids), dense)
    monkeypatch.setattr(gf, "LOCAL_FROM_TOKENS", 48)
    torch.testing.assert_close(GemFilter(filter_attention="auto", **kw).scores(model, ids), local)
