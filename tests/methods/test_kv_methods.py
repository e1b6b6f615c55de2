"""KV-eviction methods (SnapKV, H2O, StreamingLLM, SepLLM) against full attention and slow references.

References are dense and obviously correct: the whole sequence is recomputed
with an explicit boolean mask (per layer and head where the method's choice
differs per layer) and softmax attention written out by hand, and kept sets
are recomputed from eager ``output_attentions``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PLAIN, tiny_model
from test_span_selection import slow_rank

import tokensieve
from tokensieve.core.attention import HOOK_KWARG, repeat_kv
from tokensieve.core.scoring import attention_scores
from tokensieve.methods import H2O, FullAttention, SepLLM, SnapKV, StreamingLLM, make_method
from tokensieve.methods.eviction import DEFAULT_DILATION

torch.set_num_threads(1)

VOCAB = 64
SEPS = (1, 2, 3)  # separator ids for the tiny models


def tiny(family: str, init: float = 0.02) -> torch.nn.Module:
    """A 3-layer random model (4 query heads, 2 KV heads); a large ``init`` gives peaked attention.

    float64: the methods and the dense references then agree to ~1e-14, so the logits are
    compared at 1e-9. In float32 the two orders of summation differ by up to ~1e-4 on the
    peaked (``init=0.5``) models, depending on the CPU's kernels, and no tolerance is both
    tight and portable (it was measured: identical numbers on transformers 5.23 and 5.24,
    9.4e-5 on one machine and 1.1e-4 on another, 5e-15 in float64).
    """
    return tiny_model(family, layers=3, vocab=VOCAB, init=init, dtype=torch.float64, **PLAIN)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return tiny(request.param)


def prompt(n: int = 40, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (1, n), generator=g)


@torch.no_grad()
def greedy(model, method, ids: torch.Tensor, steps: int):
    """Prefill + ``steps - 1`` decoding steps; token ids, logits [steps, vocab] and the final state."""
    state = method.prefill(model, ids)
    logits = [state.logits[0]]
    tok = state.logits.argmax(-1, keepdim=True)
    toks = [int(tok)]
    for _ in range(steps - 1):
        logits.append(method.step(model, state, tok)[0])
        tok = logits[-1].argmax(-1).view(1, 1)
        toks.append(int(tok))
    return toks, torch.stack(logits), state


@torch.no_grad()
def dense_forward(model, seq: torch.Tensor, masks: list[torch.Tensor]):
    """Logits [T, vocab] of ``seq`` [1, T] where layer l's head h row i attends where ``masks[l][h, i]``.

    Attention is written out by hand (softmax of scaled q.k). Also returns each
    layer's attention probabilities [q_heads, T, T].
    """
    probs_out: dict[int, torch.Tensor] = {}

    def hook(module, query, key, value, attention_mask, **kwargs):
        g = query.shape[1] // key.shape[1]
        k, v = repeat_kv(key, g), repeat_kv(value, g)  # [1, hq, T, d]
        logits = (query @ k.transpose(-1, -2)) * module.scaling  # [1, hq, T, T]
        m = masks[module.layer_idx][None]
        p = logits.masked_fill(~m, float("-inf")).softmax(-1)
        probs_out[module.layer_idx] = p[0]
        return (p @ v).transpose(1, 2).contiguous(), None

    out = model(input_ids=seq, use_cache=False, **{HOOK_KWARG: hook})
    return out.logits[0], probs_out


@torch.no_grad()
def eager_attentions(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer [q_heads, n, n] attention weights from the eager implementation."""
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
    finally:
        tokensieve.use_tokensieve_attention(model)
    return [a[0].float() for a in out.attentions]


def causal(T: int) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool).tril()


def group_sum(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[q_heads, ...] -> [kv_heads, ...] summed over the query heads of each KV head."""
    return x.reshape(kv_heads, -1, *x.shape[1:]).sum(1)


def n_layers(model) -> int:
    return model.config.num_hidden_layers


# --- budget >= n: exactly full attention --------------------------------------------------------

LARGE = [
    SnapKV(budget=48, window_size=8),
    SnapKV(budget=40, window_size=32),  # budget == n: nothing to evict
    H2O(budget=64),
    StreamingLLM(budget=64, n_initial=4),
    SepLLM(n_recent=64, separator_ids=SEPS),
]


@pytest.mark.parametrize("method", LARGE, ids=lambda m: f"{m.name}")
def test_large_budget_reproduces_full_attention(model, method):
    ids = prompt(40)
    ids[0, ::5] = 2  # some separators, so SepLLM has some
    ref_toks, ref_logits, _ = greedy(model, FullAttention(), ids, 8)
    method.validate(model, ids.shape[1])
    toks, logits, state = greedy(model, method, ids, 8)
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits)
    # Nothing was evicted: 40 prompt entries + 7 decoded ones, at their original positions.
    for layer in range(n_layers(model)):
        pos = state.cache.kept_positions(layer)
        assert pos.shape[-1] == 47
        assert (pos == torch.arange(47)).all()


# --- SepLLM and StreamingLLM: the same rule for every layer, checked with a 4-D mask -----------


def check_against_mask(model, method, ids, steps, allowed):
    """The method's logits equal a plain forward of prompt + generated tokens under mask ``allowed(T)``."""
    toks, logits, state = greedy(model, method, ids, steps)
    seq = torch.cat([ids, torch.tensor([toks[:-1]])], dim=1)  # tokens whose logits we compare
    T = seq.shape[1]
    with torch.no_grad():
        ref = model(input_ids=seq, attention_mask=allowed(T)[None, None], use_cache=False).logits[0]
    n = ids.shape[1]
    torch.testing.assert_close(logits, ref[n - 1 :], rtol=1e-9, atol=1e-9)
    return toks, state, T


def test_sepllm_matches_masked_reference(model):
    n, w, a = 48, 6, 3
    ids = prompt(n, seed=2)
    ids[0, [7, 15, 16, 30, 41]] = torch.tensor([1, 2, 3, 1, 2])
    method = SepLLM(n_initial=a, n_recent=w, separator_ids=SEPS, block_size=16)  # several query blocks

    def allowed(T):
        seq_ids = torch.cat([ids[0], torch.tensor(toks[:-1])])[:T]
        sep = torch.isin(seq_ids, torch.tensor(SEPS))
        i, j = torch.arange(T)[:, None], torch.arange(T)[None]
        return (j <= i) & ((j < a) | sep[None] | (j >= i - w))

    # Generated tokens are needed for the mask (they may be separators): run once to get them.
    toks, _, _ = greedy(model, method, ids, 10)
    toks2, state, T = check_against_mask(model, method, ids, 10, allowed)
    assert toks2 == toks
    # Kept entries at the end: initial, every separator fed so far, the last w tokens.
    fed = state.cache.token_ids[0]
    assert fed.shape[0] == T
    expect = [p for p in range(T) if p < a or int(fed[p]) in SEPS or p >= T - w]
    for layer in range(n_layers(model)):
        assert state.cache.kept_positions(layer)[0, 0].tolist() == expect
        assert (state.cache.kept_positions(layer) == state.cache.kept_positions(layer)[:, :1]).all()


def test_sepllm_prefill_keeps_initial_separators_window(model):
    n, w, a = 40, 5, 4
    ids = prompt(n, seed=3)
    ids[0, [10, 20, 21]] = 1
    state = SepLLM(n_initial=a, n_recent=w, separator_ids=SEPS).prefill(model, ids)
    expect = [p for p in range(n) if p < a or int(ids[0, p]) in SEPS or p >= n - w]
    for layer in range(n_layers(model)):
        assert state.cache.kept_positions(layer)[0, 0].tolist() == expect
        assert state.cache.layers[layer].keys.shape[-2] == len(expect)
    assert state.next_position == n  # original positions


def test_streamingllm_matches_masked_reference(model):
    n, budget, sinks = 40, 16, 4
    ids = prompt(n, seed=4)
    W = budget - sinks

    def allowed(T):
        i, j = torch.arange(T)[:, None], torch.arange(T)[None]
        return (j <= i) & ((i < n) | (j < sinks) | (j >= i - W))  # prompt rows: full causal

    _, state, T = check_against_mask(model, StreamingLLM(budget=budget, n_initial=sinks), ids, 8, allowed)
    for layer in range(n_layers(model)):
        assert state.cache.kept_positions(layer)[0, 0].tolist() == list(range(sinks)) + list(range(T - W, T))


# --- SnapKV and H2O: per layer and head, checked against eager attention and a dense reference -


def snapkv_reference_keep(
    attn: torch.Tensor, kv_heads: int, budget: int, window: int, kernel: int, dilation: int = DEFAULT_DILATION
) -> list[list[int]]:
    """Kept prompt positions per KV head from eager attention weights [q_heads, n, n]: the window's attention
    summed per KV head, ranked by the span rule written out (``slow_rank``), plus the window."""
    n = attn.shape[-1]
    s = group_sum(attn[:, n - window :, : n - window].sum(1), kv_heads)  # [kv_heads, n - window]
    keep = []
    for h in range(kv_heads):
        top = slow_rank(s[h].double().tolist(), kernel, "avg", dilation)[: budget - window]
        keep.append(sorted(top + list(range(n - window, n))))
    return keep


def test_snapkv_matches_eager_reference(model):
    n, budget, window, steps = 48, 20, 6, 6
    ids = prompt(n, seed=5)
    method = SnapKV(budget=budget, window_size=window)
    hkv, hq = model.config.num_key_value_heads, model.config.num_attention_heads
    attns = eager_attentions(model, ids)
    ref_keep = [snapkv_reference_keep(a, hkv, budget, window, 5) for a in attns]
    with torch.no_grad():
        state = method.prefill(model, ids)
    for layer in range(n_layers(model)):
        assert state.cache.kept_positions(layer)[0].tolist() == ref_keep[layer]

    toks, logits, state = greedy(model, method, ids, steps)
    seq = torch.cat([ids, torch.tensor([toks[:-1]])], dim=1)
    T = seq.shape[1]
    masks = []
    for layer in range(n_layers(model)):
        m = causal(T).repeat(hq, 1, 1)  # [hq, T, T]
        for h in range(hq):
            row = torch.zeros(T, dtype=torch.bool)
            row[ref_keep[layer][h // (hq // hkv)]] = True
            m[h, n:, :n] = row[:n]  # decoded tokens see only the kept prompt entries (+ decoded ones, causal)
        masks.append(m)
    ref, _ = dense_forward(model, seq, masks)
    torch.testing.assert_close(logits, ref[n - 1 :], rtol=1e-9, atol=1e-9)
    for layer in range(n_layers(model)):
        assert state.cache.layers[layer].keys.shape[-2] == budget + steps - 1


@pytest.mark.parametrize("n, budget, recent, steps, init", [(40, 20, 6, 8, None), (10, 8, 2, 24, 0.5)])
def test_h2o_matches_reference(model, n, budget, recent, steps, init):
    """Prefill kept sets from eager attention; then a slow dense simulation of H2O's decoding rule.

    The second case (short prompt, long decode, peaked attention) keeps decoded tokens
    as heavy hitters, so the scores accumulated while decoding decide evictions.
    """
    if init is not None:
        model = tiny(model.config.model_type, init)
    ids = prompt(n, seed=6)
    method = H2O(budget=budget, n_recent=recent)
    hkv, hq = model.config.num_key_value_heads, model.config.num_attention_heads
    g, L = hq // hkv, n_layers(model)

    toks, logits, state = greedy(model, method, ids, steps)

    # Prefill: accumulated attention over all prompt queries, from eager weights.
    attns = eager_attentions(model, ids)
    acc = [group_sum(a.sum(1), hkv) for a in attns]  # [hkv, n] per layer: attention received, summed over queries
    kept: list[list[list[int]]] = []
    for layer in range(L):
        kept.append([])
        for h in range(hkv):
            top = torch.topk(acc[layer][h, : n - recent], budget - recent).indices.tolist()
            kept[layer].append(sorted(top + list(range(n - recent, n))))
    score = [{h: {p: float(acc[layer][h, p]) for p in kept[layer][h]} for h in range(hkv)} for layer in range(L)]

    # Decode: token at position p sees its layer/head's kept set and itself; then scores grow and one entry goes.
    rows: list[list[list[list[int]]]] = []  # rows[t][layer][h]: what the token at n + t saw
    for t in range(steps - 1):
        p = n + t
        seq = torch.cat([ids, torch.tensor([toks[: t + 1]])], dim=1)
        rows.append([[kept[layer][h] + [p] for h in range(hkv)] for layer in range(L)])
        masks = []
        for layer in range(L):
            m = causal(p + 1).repeat(hq, 1, 1)
            for s, seen in enumerate(rows):
                for qh in range(hq):
                    m[qh, n + s] = False
                    m[qh, n + s, seen[layer][qh // g]] = True
            masks.append(m)
        ref_logits, probs = dense_forward(model, seq, masks)
        torch.testing.assert_close(logits[t + 1], ref_logits[-1], rtol=1e-9, atol=1e-9)
        for layer in range(L):
            last = group_sum(probs[layer][:, -1], hkv)  # [hkv, p + 1]
            for h in range(hkv):
                sc = score[layer][h]
                sc[p] = 0.0
                for q in rows[-1][layer][h]:
                    sc[q] += float(last[h, q])
                entries = sorted(sc)
                if len(entries) > budget:
                    old = entries[: len(entries) - recent]
                    del sc[min(old, key=lambda q: sc[q])]
                kept[layer][h] = sorted(sc)
    for layer in range(L):
        assert state.cache.kept_positions(layer)[0].tolist() == kept[layer]
        assert state.cache.layers[layer].keys.shape[-2] == budget


def test_attention_scores_do_not_depend_on_chunking():
    torch.manual_seed(0)
    q, k = torch.randn(1, 6, 30, 8), torch.randn(1, 2, 30, 8)
    full = attention_scores(q, k, 0.3, query_chunk=None)
    for chunk in (1, 7, 30):
        torch.testing.assert_close(attention_scores(q, k, 0.3, query_chunk=chunk), full)
    # Each query's probabilities sum to 1: the total is the number of (query head, query) pairs.
    torch.testing.assert_close(full.sum(), torch.tensor(6.0 * 30))
    # Decode-style: the last 2 queries only, still causal.
    last = attention_scores(q[:, :, -2:], k, 0.3)
    assert last.shape == (1, 2, 30)
    torch.testing.assert_close(last.sum(), torch.tensor(6.0 * 2))


# --- the keep rules as pure functions, against hand-written references ------------------------


@pytest.mark.parametrize("n, a, r", [(10, 2, 3), (5, 2, 3), (6, 2, 3), (9, 0, 4), (9, 3, 0), (0, 4, 4)])
def test_keep_sinks_and_recent_matches_reference(n, a, r):
    from tokensieve.methods.streamingllm import keep_sinks_and_recent

    expect = list(range(n)) if n <= a + r else [i for i in range(n) if i < a or i >= n - r]
    assert keep_sinks_and_recent(n, a, r).tolist() == expect


def test_sepllm_visible_and_keep_match_reference():
    from tokensieve.methods.sepllm import sepllm_keep, sepllm_visible

    g = torch.Generator().manual_seed(0)
    T, a, w = 30, 3, 4
    is_sep = torch.rand(T, generator=g) < 0.2
    got = sepllm_visible(torch.arange(T), torch.arange(T), is_sep, a, w)
    for i in range(T):
        for j in range(T):
            ref = j <= i and (j < a or bool(is_sep[j]) or i - w <= j)
            assert bool(got[i, j]) == ref, (i, j)
    # A subset of keys at arbitrary positions, as the blocked prefill and the decoding cache use it.
    keys = torch.tensor([0, 2, 5, 11, 17, 18, 25, 29])
    sub = sepllm_visible(torch.tensor([20, 29]), keys, is_sep[keys], a, w)
    assert torch.equal(sub, got[[20, 29]][:, keys])
    # keep = what the next token may see; later tokens see a subset of it
    for nxt in (T, T + 5):
        keep = sepllm_keep(keys, is_sep[keys], a, w, next_position=nxt)
        ref = [int(p) for p in keys if p < a or bool(is_sep[p]) or p >= nxt - w]
        assert keys[keep].tolist() == ref


def sepcache_reference(stream_pos: list[int], is_sep: list[bool], a: int, s: int, w: int, c: int) -> list[int]:
    """Kept indices by the SepCache rule, with plain lists."""
    n = len(stream_pos)
    if n <= c:
        return list(range(n))
    initial = [i for i in range(n) if stream_pos[i] < a]
    local = list(range(n - w, n))
    seps = [i for i in range(n) if is_sep[i] and i not in initial and i not in local]
    seps = seps[len(seps) - s :] if len(seps) > s else seps  # the newest s
    return sorted(set(initial) | set(seps) | set(local))


@pytest.mark.parametrize("seed", range(6))
def test_sepcache_keep_matches_reference(seed):
    from tokensieve.methods.sepllm import sepcache_keep

    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(20, 60, (1,), generator=g))
    stream_pos = torch.sort(torch.randperm(200, generator=g)[:n]).values  # an already-compressed cache: gaps
    stream_pos[:2] = torch.tensor([0, 1])
    is_sep = torch.rand(n, generator=g) < 0.3
    for a, s, w, c in [(2, 3, 5, 25), (3, 0, 4, 10), (0, 50, 6, 20), (2, 3, 5, 100)]:
        got = sepcache_keep(stream_pos, is_sep, a, s, w, c).tolist()
        assert got == sepcache_reference(stream_pos.tolist(), is_sep.tolist(), a, s, w, c)
        if n > c:
            assert len(got) <= a + s + w


# --- bad parameters --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, params, match",
    [
        ("snapkv", dict(budget=0), "budget"),
        ("snapkv", dict(budget=16, window_size=32), "window_size"),
        ("snapkv", dict(kernel=4), "kernel"),
        ("snapkv", dict(pooling="median"), "pooling"),
        ("h2o", dict(budget=-3), "budget"),
        ("h2o", dict(budget=8, n_recent=9), "n_recent"),
        ("h2o", dict(chunk_size=0), "chunk_size"),
        ("streamingllm", dict(budget=4, n_initial=4), "n_initial"),
        ("streamingllm", dict(n_initial=-1), "n_initial"),
        ("sepllm", dict(n_recent=-1, separator_ids=SEPS), "n_recent"),
        ("sepllm", dict(n_initial=-2, separator_ids=SEPS), "n_initial"),
        ("sepllm", dict(separator_ids=(1, VOCAB)), "separator_ids"),
    ],
)
def test_bad_parameters_raise(method, params, match):
    model = tiny("llama")
    with pytest.raises(ValueError, match=match):
        make_method(method, **params).validate(model, 40)


def test_sepllm_without_separators_raises():
    with pytest.raises(ValueError, match="separator_ids"):
        SepLLM().prefill(tiny("llama"), prompt(8))


def test_unknown_parameter_raises():
    with pytest.raises(ValueError, match="budget"):
        make_method("sepllm", budget=3)


# --- the real model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    model, tok = tokensieve.load_model("smollm2", device="cpu", dtype=torch.float32)
    return model, tok


@pytest.mark.real_model
def test_snapkv_answers_needle_on_smollm2(smollm2):
    from tokensieve.data import read_text
    from tokensieve.evaluation.needle import build_needle_prompt, score_answer

    model, tok = smollm2
    p = build_needle_prompt(tok, read_text(min_chars=20_000), 1500, 0.5)
    res = tokensieve.generate(model, tok, p.messages, method="snapkv", budget=512, max_new_tokens=24)
    assert score_answer(res.text) == 1.0, res.text
    assert res.kv_tokens_prefill == [512] * model.config.num_hidden_layers
    assert res.prompt_tokens > 1400
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert res.kv_bytes_prefill == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * 512 * head_dim * 4  # float32


@pytest.mark.real_model
def test_sepllm_through_runner_derives_separators(smollm2):
    model, tok = smollm2
    text = "The cat sat on the mat. It was warm, and the sun was out; birds sang!\n" * 12
    res = tokensieve.generate(model, tok, text, method="sepllm", n_recent=32, n_initial=4, max_new_tokens=4)
    ids = tokensieve.encode_prompt(tok, text)[0]
    from tokensieve.core.separators import separator_token_ids

    sep = torch.isin(ids, separator_token_ids(tok))
    n = ids.shape[0]
    expect = int(((torch.arange(n) < 4) | sep | (torch.arange(n) >= n - 32)).sum())
    assert 0 < expect < n
    assert res.kv_tokens_prefill == [expect] * model.config.num_hidden_layers
