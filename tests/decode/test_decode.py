"""Static KV buffers and the captured decoding step: same tokens as the eager path, updated in place."""

from __future__ import annotations

import pytest
import torch
from cases import STATIC_FAMILIES, case_params, params_of
from conftest import TinyTokenizer, random_ids, tiny_model

from tokensieve.decode.static import BUCKET, DecoderPool, StaticDecoder, bucket
from tokensieve.engine.runner import STATIC_METHODS, generate, score_continuation, supports_static
from tokensieve.errors import InputError
from tokensieve.methods import METHODS

LAZY = params_of("lazyllm", "schedule")  # LazyLLM's decoder tests: prune layers 1, 2, 4


@pytest.fixture(scope="module", params=STATIC_FAMILIES)
def model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("method,params", case_params(lambda caps: caps.static_decode is not None))
def test_static_decoding_gives_the_eager_tokens(model, method, params):
    tok, ids = TinyTokenizer(), random_ids(80, seed=4)
    eager = generate(model, tok, ids, method, max_new_tokens=24, decode="eager", **params)
    static = generate(model, tok, ids, method, max_new_tokens=24, decode="static", **params)
    assert eager.details["decode_path"] == "eager" and static.details["decode_path"] == "static"
    assert static.token_ids == eager.token_ids
    assert static.kv_tokens_final == eager.kv_tokens_final and static.kv_bytes_final == eager.kv_bytes_final
    # teacher forcing: the same losses on both paths
    target = ids[0, -12:]
    a = score_continuation(model, tok, ids[:, :-12], target, method, decode="eager", **params)
    b = score_continuation(model, tok, ids[:, :-12], target, method, decode="static", **params)
    torch.testing.assert_close(torch.tensor(b.nll), torch.tensor(a.nll), rtol=1e-5, atol=1e-5)


def test_every_static_method_is_in_the_decode_cases():
    """The registry's cases cover every method that decodes on the static path (a new one joins by its case)."""
    covered = {p.values[0] for p in case_params(lambda caps: caps.static_decode is not None)}
    assert covered == set(STATIC_METHODS) and len(covered) >= 6


def assert_static_evicts_as_eager(model, ids, method, new, seed_losses=True, **params):
    """The static path with eviction on the device gives the eager path's tokens, kept counts and (when
    ``seed_losses``) teacher-forced losses; returns the static decoder that ran."""
    tok = TinyTokenizer()
    eager = generate(model, tok, ids, method, max_new_tokens=new, decode="eager", **params)
    pool = DecoderPool(model)
    static = generate(model, tok, ids, method, max_new_tokens=new, decode="static", decoders=pool, **params)
    assert static.details["decode_path"] == "static" and static.token_ids == eager.token_ids
    assert static.kv_tokens_final == eager.kv_tokens_final and static.kv_tokens_prefill == eager.kv_tokens_prefill
    if seed_losses:  # the eviction decisions agree at every step, not only on the argmax
        t = min(12, ids.shape[1] // 2)
        a = score_continuation(model, tok, ids[:, :-t], ids[0, -t:], method, decode="eager", **params)
        b = score_continuation(model, tok, ids[:, :-t], ids[0, -t:], method, decode="static", **params)
        torch.testing.assert_close(torch.tensor(b.nll), torch.tensor(a.nll), rtol=1e-5, atol=1e-5)
    (dec,) = pool.decoders.values()
    return dec, static


@pytest.mark.parametrize(
    "prompt,budget,n_initial,new",
    [
        (80, 40, 4, 60),  # the ring wraps more than once
        (80, 40, 0, 30),  # no sinks: a pure window
        (10, 16, 4, 30),  # a short prompt: the cache grows to the budget while decoding, then the ring turns
        (30, 200, 4, 20),  # the budget holds everything: never evicts (full attention)
        (3, 12, 4, 20),  # fewer prompt tokens than sinks: the first generated tokens become sinks
    ],
)
def test_streamingllm_ring_gives_the_eager_tokens_and_holds_the_budget(model, prompt, budget, n_initial, new):
    """Device-side eviction (a ring over the window) sees exactly what the eager cache sees before it evicts."""
    ids = random_ids(prompt, seed=7)
    dec, static = assert_static_evicts_as_eager(
        model, ids, "streamingllm", new, seed_losses=prompt >= 24, budget=budget, n_initial=n_initial
    )
    assert dec.capacity <= bucket(min(prompt + new, budget + 1))  # never sized to the whole answer
    if prompt + new <= budget:
        full = generate(model, TinyTokenizer(), ids, "full", max_new_tokens=new, decode="eager")
        assert static.token_ids == full.token_ids


@pytest.mark.parametrize(
    "prompt,budget,n_recent,new",
    [
        (80, 40, 20, 60),  # evicts every step, heavy hitters and a recent window
        (80, 40, 0, 30),  # no recent window: the new entry itself may go
        (80, 24, 24, 30),  # only the recent window: a sliding window
        (10, 16, 8, 30),  # a short prompt: grows to the budget while decoding, then evicts
        (30, 200, None, 20),  # the budget holds everything: never evicts (full attention)
    ],
)
def test_h2o_device_eviction_gives_the_eager_tokens_and_holds_the_budget(model, prompt, budget, n_recent, new):
    """Heavy hitters chosen on the device (scores accumulated per slot, argmin outside the newest stamps) evict
    what the eager cache evicts."""
    dec, _ = assert_static_evicts_as_eager(
        model, random_ids(prompt, seed=8), "h2o", new, budget=budget, n_recent=n_recent
    )
    assert dec.capacity <= bucket(min(prompt + new, budget + 1))


def test_h2o_device_eviction_matches_the_eager_cache_entries(model):
    """After decoding, each layer and KV head holds the same keys as the eager cache (as sets of rows)."""
    from tokensieve.methods import make_method
    from tokensieve.methods.h2o import HeavyHitterPolicy, HeavyHitterSlots

    ids = random_ids(60, seed=9)
    m = make_method("h2o", budget=24, n_recent=8)
    with torch.inference_mode():
        state = m.prefill(model, ids)
        token = state.logits.argmax(-1, keepdim=True)
        dec = StaticDecoder(model, bucket(25), slots=HeavyHitterSlots)
        dec.load(state.cache, state.next_position, 10, policy=HeavyHitterPolicy(24, 8))
        for _ in range(10):
            a = dec.step(token)
            b = m.step(model, state, token)
            token = b.argmax(-1, keepdim=True)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        for li, layer in enumerate(state.cache.layers):
            held = dec.keys[li][0, :, :25]  # [hkv, 25, d]: 24 kept + the slot freed for the next step
            free = dec.state.free[li][0]  # [hkv]
            for h in range(held.shape[0]):
                mine = torch.cat([held[h, : free[h]], held[h, free[h] + 1 :]])  # drop the freed slot
                theirs = layer.keys[0, h]
                assert mine.shape == theirs.shape
                # the same entries up to float rounding (the new tokens' keys come from two computations)
                dist = torch.cdist(theirs.float(), mine.float())  # [24, 24]
                nearest = dist.argmin(dim=1)
                assert dist.min(dim=1).values.max() < 1e-4 and nearest.unique().numel() == len(nearest), (li, h)


@pytest.mark.parametrize(
    "prompt,n_initial,n_recent,new,seps",
    [
        (80, 4, 16, 60, (3, 4, 5, 6, 7, 8)),  # many separators: the cache grows while the window turns over
        (80, 2, 0, 30, (3, 4, 5)),  # no window: each token sees initial tokens, separators and itself
        (60, 4, 8, 40, (95,)),  # separators rarer than the window: a window of slots reused step after step
        (20, 30, 8, 20, (3,)),  # every token initial: never evicts
        (30, 4, 200, 20, (3, 4)),  # the window holds everything: full attention
    ],
)
def test_sepllm_device_eviction_gives_the_eager_tokens(model, prompt, n_initial, n_recent, new, seps):
    """SepLLM's window turned over on the device (a leaving non-separator's slot is reused, separators stay)."""
    assert_static_evicts_as_eager(
        model, random_ids(prompt, seed=10), "sepllm", new, n_initial=n_initial, n_recent=n_recent, separator_ids=seps
    )


def test_streamingllm_batches_decode_eagerly(model):
    from tokensieve.engine.runner import generate_batch

    tok = TinyTokenizer()
    res = generate_batch(
        model,
        tok,
        [random_ids(30, seed=1), random_ids(20, seed=2)],
        "streamingllm",
        max_new_tokens=4,
        budget=16,
        n_initial=2,
    )
    assert {r.details["decode_path"] for r in res} == {"eager"}


def test_buffers_are_updated_in_place_and_masked(model):
    tok, ids = TinyTokenizer(), random_ids(30, seed=5)
    pool = DecoderPool(model)
    res = generate(model, tok, ids, "full", max_new_tokens=6, decode="static", decoders=pool)
    (dec,) = pool.decoders.values()
    assert dec.capacity == bucket(30 + 5) == BUCKET
    ptrs = [k.data_ptr() for k in dec.keys]
    res2 = generate(model, tok, ids, "full", max_new_tokens=6, decode="static", decoders=pool)
    assert list(pool.decoders.values()) == [dec] and [k.data_ptr() for k in dec.keys] == ptrs  # reused, not reallocated
    assert res2.token_ids == res.token_ids and dec.entries() == [35] * len(dec.keys)
    # the slots past the filled ones never influence a step: poison them and decode again
    with torch.inference_mode():  # the buffers are inference tensors
        for k, v in zip(dec.keys, dec.values):
            k[:, :, 40:].fill_(1e4)
            v[:, :, 40:].fill_(-1e4)
    assert (
        generate(model, tok, ids, "full", max_new_tokens=6, decode="static", decoders=pool).token_ids == res.token_ids
    )


def test_capacity_is_enforced(model):
    dec = StaticDecoder(model, capacity=BUCKET)
    with torch.inference_mode():
        state = METHODS["full"]().prefill(model, random_ids(BUCKET - 2, seed=1))
    with pytest.raises(ValueError, match="exceed capacity"):
        dec.load(state.cache, BUCKET - 2, max_new_tokens=3)


def test_a_method_without_a_static_path_decodes_eagerly(model):
    with torch.inference_mode():
        state = METHODS["full"]().prefill(model, random_ids(8))
    assert "eager path" in supports_static(model, state.cache, "some_new_method")
    assert supports_static(model, state.cache, "full") is None


@pytest.mark.parametrize(
    "method,params", [("full", {}), ("lazyllm", {"prune_layers": (1, 3), "keep_fractions": (0.5, 0.5)})]
)
def test_sliding_window_models_decode_eagerly(method, params):
    model = tiny_model("gemma3", layer_types=["sliding_attention", "full_attention"] * 3)
    tok, ids = TinyTokenizer(), random_ids(24, seed=6)
    assert generate(model, tok, ids, method, max_new_tokens=3, **params).details["decode_path"] == "eager"
    with pytest.raises(InputError, match="static decoding is not available"):
        generate(model, tok, ids, method, max_new_tokens=3, decode="static", **params)


def test_bad_decode_mode():
    with pytest.raises(InputError, match="decode must be one of"):
        generate(tiny_model("llama"), TinyTokenizer(), random_ids(8), "full", max_new_tokens=2, decode="fast")


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3"])
@pytest.mark.parametrize("speculate", [False, True])
def test_lazyllm_static_step_revives_as_the_eager_step(family, speculate):
    """LazyLLM on its static decoder: the eager path's tokens, losses, KV computed per layer and revivals, whether
    each step is host-planned or first tried on the fixed shape (then re-run where a token came back)."""
    model = tiny_model(family, init=0.2)
    tok, ids, params = TinyTokenizer(), random_ids(80, seed=4), LAZY
    eager = generate(model, tok, ids, "lazyllm", max_new_tokens=30, decode="eager", **params)
    pool = DecoderPool(model, speculate=speculate)
    static = generate(model, tok, ids, "lazyllm", max_new_tokens=30, decode="static", decoders=pool, **params)
    assert static.details["decode_path"] == "static" and static.token_ids == eager.token_ids
    assert static.kv_tokens_final == eager.kv_tokens_final  # each token's KV computed at the same layers
    for key in ("revived_tokens", "revived_kv_computations", "prompt_computed_pct_total"):
        assert static.details[key] == eager.details[key], key
    assert eager.details["revived_kv_computations"] > 0  # the schedule makes tokens come back
    steps = len(static.token_ids) - 1
    fixed, reruns = static.details["decode_fixed_shape_steps"], static.details["decode_revival_reruns"]
    if speculate:  # both kinds of step ran: fixed-shape steps that sufficed, and re-runs for revivals
        assert fixed > 0 and reruns > 0 and fixed + reruns == steps
    else:
        assert fixed == reruns == 0
    t = 12
    a = score_continuation(model, tok, ids[:, :-t], ids[0, -t:], "lazyllm", decode="eager", **params)
    b = score_continuation(model, tok, ids[:, :-t], ids[0, -t:], "lazyllm", decode="static", decoders=pool, **params)
    torch.testing.assert_close(torch.tensor(b.nll), torch.tensor(a.nll), rtol=1e-5, atol=1e-5)


def test_lazyllm_static_step_keeping_everything_is_full_attention(model):
    """Keep fractions of 1.0: nothing is pruned, no token ever comes back, every step is the fixed-shape one."""
    tok, ids = TinyTokenizer(), random_ids(60, seed=2)
    params = {"prune_layers": (1, 3), "keep_fractions": (1.0, 1.0)}
    static = generate(
        model,
        tok,
        ids,
        "lazyllm",
        max_new_tokens=20,
        decode="static",
        decoders=DecoderPool(model, speculate=True),
        **params,
    )
    full = generate(model, tok, ids, "full", max_new_tokens=20, decode="eager")
    assert static.token_ids == full.token_ids
    assert static.details["decode_fixed_shape_steps"] == len(static.token_ids) - 1
    assert static.details["decode_revival_reruns"] == 0 and static.details["revived_kv_computations"] == 0


def test_lazyllm_decoder_is_reused_and_refuses_overflow(model):
    tok, params = TinyTokenizer(), LAZY
    pool = DecoderPool(model)
    a = generate(
        model, tok, random_ids(50, seed=1), "lazyllm", max_new_tokens=8, decode="static", decoders=pool, **params
    )
    b = generate(
        model, tok, random_ids(60, seed=2), "lazyllm", max_new_tokens=8, decode="static", decoders=pool, **params
    )
    assert len(pool.decoders) == 1  # one bucket, one decoder (one capture on CUDA)
    alone = generate(model, tok, random_ids(60, seed=2), "lazyllm", max_new_tokens=8, decode="eager", **params)
    assert b.token_ids == alone.token_ids and a.details["decode_path"] == "static"
    (dec,) = pool.decoders.values()
    with pytest.raises(RuntimeError, match="used up"):
        dec.step(torch.tensor([[1]]))


def test_grow_instead_of_evicting_is_decided_in_one_place():
    """A bounded eviction whose budget holds the prefill's entries and every new token evicts nothing: the
    driver sizes the decoder for growth and ``StaticDecoder.load`` decodes by growth (one rule, both ask it)."""
    from tokensieve.decode.slots import decoder_size, without_needless_eviction
    from tokensieve.methods.h2o import HeavyHitterPolicy
    from tokensieve.methods.sepllm import SeparatorPolicy
    from tokensieve.methods.streamingllm import SinkRingPolicy

    ring, heavy = SinkRingPolicy(40, 4), HeavyHitterPolicy(40, 8)
    seps = SeparatorPolicy(n_initial=4, n_recent=8, separator_ids=(5,))
    for ev in (ring, heavy):
        assert without_needless_eviction(ev, 30, 10) is None and decoder_size(ev, 30, 10) == 40  # fits: grow
        assert without_needless_eviction(ev, 30, 11) is ev and decoder_size(ev, 30, 11) == 41  # budget + 1 slots
    assert without_needless_eviction(seps, 30, 10) is seps and decoder_size(seps, 30, 10) == 40  # may grow to all
    assert without_needless_eviction(None, 30, 10) is None and decoder_size(None, 30, 10) == 40


class _ReplayedRun:
    """Stands in for a captured CUDA graph on the CPU: a replay runs the step and writes the output in place."""

    def __init__(self, run, out):
        self.run, self.out = run, out

    def replay(self):
        self.out.copy_(self.run())


@pytest.mark.parametrize("failures", [1, 2])
def test_a_failed_capture_is_retried_then_runs_without_a_graph(model, monkeypatch, failures):
    """A capture the driver invalidates is tried once more; failing twice, the decoder steps without a graph
    (with a warning). Either way the tokens are those of the graph-free decoder."""
    import tokensieve.decode.static as decode

    calls = []

    def flaky_capture(run, state):
        calls.append(1)
        if len(calls) <= failures:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture\nmore")
        with torch.inference_mode():
            saved = [t.clone() for t in state]
            out = run().clone()
            for t, v in zip(state, saved):  # like capture_graph: the state the run advanced is restored
                t.copy_(v)
        return _ReplayedRun(run, out), out, 0.0

    tok, ids = TinyTokenizer(), random_ids(30, seed=8)
    plain = generate(
        model, tok, ids, "full", max_new_tokens=5, decode="static", decoders=DecoderPool(model, use_graph=False)
    )
    monkeypatch.setattr(decode, "capture_graph", flaky_capture)
    pool = DecoderPool(model, use_graph=True)
    if failures == 2:
        with pytest.warns(RuntimeWarning, match="capture failed twice.*without a graph"):
            res = generate(model, tok, ids, "full", max_new_tokens=5, decode="static", decoders=pool)
    else:
        res = generate(model, tok, ids, "full", max_new_tokens=5, decode="static", decoders=pool)
    (dec,) = pool.decoders.values()
    assert len(calls) == 2 and res.token_ids == plain.token_ids
    assert dec.use_graph is (failures == 1) and (dec._graph is None) is (failures == 2)


def step_tensors(obj: object, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors an object holds (attributes, and lists of tensors), by name."""
    out = {}
    for k, v in vars(obj).items():
        if torch.is_tensor(v):
            out[f"{prefix}.{k}"] = v
        elif isinstance(v, list) and v and all(torch.is_tensor(t) for t in v):
            out.update({f"{prefix}.{k}[{i}]": t for i, t in enumerate(v)})
    return out


@pytest.mark.parametrize(
    "method,params", case_params(lambda caps: caps.static_decode in ("grow", "evict"), variants=False)
)
def test_load_fills_the_step_state_in_place(model, method, params):
    """The driver captures a decoder once and loads it for every later prompt; a captured graph reads the step's
    tensors by address, so ``load`` (the decoder's and its slot state's) writes into them and never replaces one."""
    tok, pool = TinyTokenizer(), DecoderPool(model)
    generate(model, tok, random_ids(80, seed=1), method, max_new_tokens=24, decode="static", decoders=pool, **params)
    (dec,) = pool.decoders.values()
    before: dict[str, torch.Tensor] = {}
    load = dec.load

    def watched_load(*args, **kwargs):
        before.update(step_tensors(dec, "decoder") | step_tensors(dec.state, "state"))
        load(*args, **kwargs)

    dec.load = watched_load
    again = generate(
        model, tok, random_ids(80, seed=2), method, max_new_tokens=24, decode="static", decoders=pool, **params
    )
    assert len(pool.decoders) == 1 and again.details["decode_path"] == "static" and len(before) > 4
    after = step_tensors(dec, "decoder") | step_tensors(dec.state, "state")
    assert [k for k, t in before.items() if after.get(k) is not t] == []
