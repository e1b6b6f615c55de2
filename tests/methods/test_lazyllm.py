"""LazyLLM: exactness at keep 1.0, pruned sets vs an eager reference, KV computed once, revival, schedules."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import PLAIN, tiny_model

from tokensieve import use_tokensieve_attention
from tokensieve.methods import LazyLLM, make_method
from tokensieve.methods.base import cache_kwarg

torch.set_num_threads(1)

VOCAB, N_LAYERS = 97, 6
GEMMA_TYPES = [
    "sliding_attention",
    "full_attention",
    "sliding_attention",
    "full_attention",
    "sliding_attention",
    "full_attention",
]


def build(family: str) -> torch.nn.Module:
    """A 6-layer random model with peaked attention (init 0.2); Mistral without a sliding window.

    Gemma 3's sliding window (12) is shorter than the prompts, so the window logic is exercised.
    """
    return tiny_model(
        family, layers=N_LAYERS, vocab=VOCAB, init=0.2, sliding_window=12, layer_types=GEMMA_TYPES, **PLAIN
    )


# Pruning layers must be full-attention layers on Gemma 3 (1 and 3 here).
SCHEDULE = {"gemma3": ((1, 3), (0.5, 0.6))}
DEFAULT_SCHEDULE = ((1, 2, 4), (0.6, 0.7, 0.5))


def schedule(family: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    return SCHEDULE.get(family, DEFAULT_SCHEDULE)


def prompt(n: int = 40, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, n), generator=g)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_keep_all_equals_full_attention(family):
    model = build(family)
    ids = prompt()
    layers = schedule(family)[0]
    full, lazy = make_method("full"), make_method("lazyllm", prune_layers=layers, keep_fractions=[1.0] * len(layers))
    with torch.inference_mode():
        a, b = full.prefill(model, ids), lazy.prefill(model, ids)
        torch.testing.assert_close(b.logits, a.logits.float())
        for _ in range(6):
            token = a.logits.argmax(-1, keepdim=True)
            assert torch.equal(token, b.logits.argmax(-1, keepdim=True))
            full.step(model, a, token)
            lazy.step(model, b, token)
            torch.testing.assert_close(b.logits, a.logits.float())
    assert b.details["prompt_computed_pct_total"] == 100.0
    assert b.details["revived_tokens"] == 0


def reference_present_sets(model, ids, prune_layers, keep_fractions, layer_types=None, window=None):
    """Slow reference for the prefill: every layer runs on all n tokens with eager attention and a dense
    float mask that hides pruned tokens as keys; importance = eager probabilities of the last row, head mean."""
    body = model.model
    n = ids.shape[1]
    model.set_attn_implementation("eager")
    try:
        h = body.embed_tokens(ids)
        pos = torch.arange(n)[None]
        present = torch.ones(n, dtype=torch.bool)
        sets = []
        for l, layer in enumerate(body.layers):
            lt = layer_types[l] if layer_types else None
            allowed = (pos[0][None, :] <= pos[0][:, None]) & present[None, :]  # [n, n]
            if lt == "sliding_attention":
                allowed &= pos[0][:, None] - pos[0][None, :] < window
            mask = torch.zeros(1, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
            cos_sin = body.rotary_emb(h, pos, lt) if lt else body.rotary_emb(h, pos)
            seen = {}
            handle = layer.self_attn.register_forward_hook(lambda mod, args, out: seen.update(w=out[1]))
            h = layer(h, attention_mask=mask, position_embeddings=cos_sin, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
            handle.remove()
            cand = present.nonzero().squeeze(1)
            sets.append(cand)
            if l in prune_layers:
                probs = seen["w"][0, :, -1, :].mean(0)  # [n]: eager attention of the last token, mean over heads
                s = probs[cand].clone()
                s[-1] = math.inf
                k = max(1, math.ceil(round(keep_fractions[prune_layers.index(l)] * len(cand), 9)))
                order = torch.argsort(s, descending=True)
                # The test is only meaningful if the cut is not a near-tie.
                if k < len(cand):
                    assert s[order[k - 1]] - s[order[k]] > 1e-6
                present = torch.zeros(n, dtype=torch.bool)
                present[cand[order[:k]]] = True
        return sets
    finally:
        use_tokensieve_attention(model)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_pruned_sets_match_eager_reference(family):
    model = build(family)
    ids = prompt(48, seed=3)
    layers, fracs = schedule(family)
    lazy = LazyLLM(prune_layers=layers, keep_fractions=fracs)
    with torch.inference_mode():
        st = lazy.prefill(model, ids)
        cfg = model.config
        ref = reference_present_sets(
            model,
            ids,
            list(layers),
            list(fracs),
            getattr(cfg, "layer_types", None) if family == "gemma3" else None,
            getattr(cfg, "sliding_window", None),
        )
    assert len(st.present) == N_LAYERS
    for l in range(N_LAYERS):
        assert st.present[l].tolist() == ref[l].tolist(), f"layer {l}"
    # Pruning really happened, and the counts follow ceil(f * present).
    sizes = [len(p) for p in st.present]
    assert sizes[-1] < sizes[0]
    expected_pct = 100 * sum(sizes) / (N_LAYERS * ids.shape[1])
    assert st.details["prompt_computed_pct_first_token"] == pytest.approx(expected_pct)
    assert st.details["tokens_per_layer_first_token"] == sizes
    assert st.kept_indices.tolist() == st.present[-1].tolist()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_each_kv_computed_once_per_layer(family):
    """Instrumented run: record the positions every decoder layer computes; none twice at a layer."""
    model = build(family)
    ids = prompt(40, seed=5)
    layers, fracs = schedule(family)
    lazy = LazyLLM(prune_layers=layers, keep_fractions=fracs)
    seen: list[list[int]] = [[] for _ in range(N_LAYERS)]
    handles = [
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: seen[i].extend(kwargs["position_ids"][0].tolist()), with_kwargs=True
        )
        for i, layer in enumerate(model.model.layers)
    ]
    revived_entries = 0  # entries computed in a decoding step for tokens older than that step's new token
    try:
        with torch.inference_mode():
            st = lazy.prefill(model, ids)
            for _ in range(10):
                before, start = [len(s) for s in seen], st.next_position
                lazy.step(model, st, st.logits.argmax(-1, keepdim=True))
                revived_entries += sum(sum(1 for p in s[b:] if p < start) for s, b in zip(seen, before))
    finally:
        for h in handles:
            h.remove()
    total = ids.shape[1] + 10
    assert st.details["revived_tokens"] > 0, "the run should revive tokens, or it proves nothing"
    for l in range(N_LAYERS):
        assert len(seen[l]) == len(set(seen[l])), f"layer {l} computed a token twice"
        assert seen[l] == st.kv_tokens[l].tolist()
        assert st.cache.layers[l].keys.shape[-2] == len(seen[l])
        # depth says exactly which tokens have KV at this layer
        assert sorted(seen[l]) == (st.depth > l).nonzero().squeeze(1).tolist()
    assert len(seen[0]) == total  # every token is computed at layer 0
    prompt_entries = sum(sum(1 for p in s if p < ids.shape[1]) for s in seen)
    assert st.details["prompt_computed_pct_total"] == pytest.approx(100 * prompt_entries / (N_LAYERS * ids.shape[1]))
    assert st.details["revived_kv_computations"] == revived_entries > 0


class PruneOneThenKeepAll(LazyLLM):
    """Test schedule: in the prefill, drop only token ``victim`` at the first pruning layer; later keep all."""

    def __init__(self, victim: int, **kw):
        super().__init__(**kw)
        self.victim, self.calls = victim, 0

    def select(self, layer, scores, candidates, keep):
        self.calls += 1
        if self.calls == 1:
            return candidates[candidates != self.victim]
        return candidates


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_revived_kv_equals_from_scratch(family):
    """A token pruned at layer p in the prefill and needed in the next step is resumed from the aux cache.

    Tokens before it never see it (causal), so everything it attends to is the full model's; its KV at
    layers > p must then equal a from-scratch full prefill's, and be computed exactly once.
    """
    model = build(family)
    ids = prompt(32, seed=7)
    victim, p = 13, 1
    lazy = PruneOneThenKeepAll(victim, prune_layers=(p, 3), keep_fractions=(0.9, 0.9))
    with torch.inference_mode():
        ref = make_method("full").prefill(model, ids).cache
        st = lazy.prefill(model, ids)
        assert victim not in st.present[p + 1].tolist()
        assert int(st.depth[victim]) == p + 1
        lazy.step(model, st, st.logits.argmax(-1, keepdim=True))
    assert bool(st.revived[victim]) and int(st.depth[victim]) == N_LAYERS
    assert st.details["revived_tokens"] == 1  # tokens after the victim were computed everywhere already
    for l in range(N_LAYERS):
        entries = (st.kv_tokens[l] == victim).nonzero().squeeze(1)
        assert entries.numel() == 1, f"layer {l}: victim's KV stored {entries.numel()} times"
        i = int(entries)
        torch.testing.assert_close(st.cache.layers[l].keys[:, :, i], ref.layers[l].keys[:, :, victim])
        torch.testing.assert_close(st.cache.layers[l].values[:, :, i], ref.layers[l].values[:, :, victim])


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(prune_layers=(2,), keep_fractions=(0.0,)), "(0, 1]"),
        (dict(prune_layers=(2,), keep_fractions=(1.5,)), "(0, 1]"),
        (dict(prune_layers=(2,), keep_fractions=(-0.2,)), "(0, 1]"),
        (dict(prune_layers=(3, 2), keep_fractions=(0.5, 0.5)), "strictly increasing"),
        (dict(prune_layers=(2, 2), keep_fractions=(0.5, 0.5)), "strictly increasing"),
        (dict(prune_layers=(1, 2), keep_fractions=(0.5,)), "same length"),
        (dict(prune_layers="a,b", keep_fractions=(0.5, 0.5)), "list of ints"),
    ],
)
def test_bad_schedules_raise(params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        make_method("lazyllm", **params)


@pytest.mark.parametrize("layer", [-1, N_LAYERS - 1, N_LAYERS])
def test_layer_out_of_range_raises(layer):
    model = build("llama")
    with pytest.raises(ValueError, match=rf"prune_layers must each be in \[0, {N_LAYERS - 2}\].*got {layer}"):
        LazyLLM(prune_layers=(layer,), keep_fractions=(0.5,)).validate(model, 10)


def test_sliding_window_layer_and_unsupported_model_raise():
    with pytest.raises(ValueError, match="sliding-window layer"):
        LazyLLM(prune_layers=(2,), keep_fractions=(0.5,)).validate(build("gemma3"), 10)
    gpt2 = tiny_model("gpt2", layers=4, vocab=VOCAB, hidden=32, heads=2)
    with pytest.raises(ValueError, match="does not support model type 'gpt2'"):
        LazyLLM(prune_layers=(1,), keep_fractions=(0.5,)).prefill(gpt2, prompt(8))


def test_schedule_from_cli_strings():
    m = make_method("lazyllm", prune_layers="4, 9", keep_fractions="[0.5,0.25]")
    assert m.prune_layers == (4, 9) and m.keep_fractions == (0.5, 0.25)
    assert dataclasses.asdict(m) == {"prune_layers": (4, 9), "keep_fractions": (0.5, 0.25)}


class KeepAllThenDrop(LazyLLM):
    """Test schedule: keep everything in the prefill; in the first decoding step drop ``dropped`` at every pruning layer."""

    def __init__(self, dropped: list[int], **kw):
        super().__init__(**kw)
        self.dropped, self.prefill_done = torch.tensor(dropped), False

    def select(self, layer, scores, candidates, keep):
        if not self.prefill_done:
            return candidates
        return candidates[~torch.isin(candidates, self.dropped)]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_decode_step_hides_pruned_tokens(family):
    """In a decoding step, tokens pruned at layer p are not attended to at layers > p.

    Reference: the plain model's decode with a hand-written eager attention (softmax over the cache with
    the dropped keys masked out at layers after the pruning layer).
    """
    model = build(family)
    ids = prompt(20, seed=11)  # longer than Gemma's window (12)
    p = schedule(family)[0][0]
    dropped = [0, 3, 4, 9, 15]
    lazy = KeepAllThenDrop(dropped, prune_layers=(p,), keep_fractions=(0.5,))
    windows = [12 if family == "gemma3" and t == "sliding_attention" else None for t in GEMMA_TYPES]

    def reference_attention(module, query, key, value, attention_mask, **kwargs):
        groups = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)  # [1, heads, kv, d]
        new_pos = ids.shape[1]
        kv_pos = torch.arange(new_pos + 1 - key.shape[2], new_pos + 1)  # Gemma's sliding layers keep only the last keys
        allowed = torch.ones(key.shape[2], dtype=torch.bool)
        if module.layer_idx > p:
            allowed &= ~torch.isin(kv_pos, torch.tensor(dropped))
        if family == "gemma3" and windows[module.layer_idx] is not None:
            allowed &= kv_pos[-1] - kv_pos < windows[module.layer_idx]
        w = (query @ k.transpose(-1, -2) * module.scaling).masked_fill(~allowed, -math.inf).softmax(-1)
        return (w @ v).transpose(1, 2), w

    full = make_method("full")
    with torch.inference_mode():
        a, b = full.prefill(model, ids), lazy.prefill(model, ids)
        torch.testing.assert_close(b.logits, a.logits.float())
        lazy.prefill_done = True
        token = a.logits.argmax(-1, keepdim=True)
        out = model(
            input_ids=token,
            **cache_kwarg(model, a.cache),
            position_ids=torch.tensor([[ids.shape[1]]]),
            use_cache=True,
            tokensieve_hook=reference_attention,
        )
        got = lazy.step(model, b, token)
    assert b.present[p + 1].tolist() == [i for i in range(ids.shape[1] + 1) if i not in dropped]
    torch.testing.assert_close(got, out.logits[:, -1].float())
    assert b.details["revived_tokens"] == 0


@pytest.mark.real_model
def test_smollm2_runner_and_cli(tmp_path, capsys):
    """Through the common runner and CLI: keep 1.0 reproduces full's tokens; a real schedule reports its stats."""
    import json

    from tokensieve.cli import main
    from tokensieve.core.models import load_model
    from tokensieve.engine.runner import generate

    model, tok = load_model("smollm2", device="cpu")
    doc = "The vault code is 4417. " + "The weather was mild and the town was quiet. " * 30
    messages = [{"role": "user", "content": doc + "\nQuestion: what is the vault code?"}]
    full = generate(model, tok, messages, method="full", max_new_tokens=8)
    same = generate(
        model, tok, messages, method="lazyllm", max_new_tokens=8, prune_layers=[8, 20], keep_fractions=[1.0, 1.0]
    )
    assert same.token_ids == full.token_ids
    lazy = generate(model, tok, messages, method="lazyllm", max_new_tokens=8)
    d = lazy.details
    assert 0 < d["prompt_computed_pct_first_token"] < 100
    assert d["prompt_computed_pct_first_token"] <= d["prompt_computed_pct_total"] <= 100
    assert lazy.kept_tokens == d["tokens_per_layer_first_token"][-1] < lazy.prompt_tokens
    assert lazy.kv_tokens_prefill[0] == lazy.prompt_tokens > lazy.kv_tokens_prefill[-1]

    path = tmp_path / "doc.txt"
    path.write_text(doc)
    rc = main(
        [
            "ask",
            "--file",
            str(path),
            "--question",
            "what is the vault code?",
            "--method",
            "lazyllm",
            "--param",
            "prune_layers=4,10",
            "--param",
            "keep_fractions=[0.5,0.5]",
            "--max-new-tokens",
            "4",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "lazyllm" and out["params"] == {"prune_layers": [4, 10], "keep_fractions": [0.5, 0.5]}
    assert out["details"]["prompt_computed_pct_first_token"] < 50
    assert "revived_tokens" in out["details"] and out["ttft_s"] > 0


def test_default_schedule_scales_with_depth():
    from tokensieve.methods.lazyllm import default_prune_layers

    assert default_prune_layers(30, [None] * 30) == (8, 14, 20)  # the measured SmolLM2 schedule
    assert default_prune_layers(32, [None] * 32) == (9, 15, 21)
    assert default_prune_layers(3, [None] * 3) == (1,)  # collapses on shallow models, stays in [0, L-2]
    windows = [16 if (i + 1) % 6 else None for i in range(18)]  # Gemma-3-like: full attention at 5, 11, 17
    assert default_prune_layers(18, windows) == (5, 11)


# Tensor methods that read a value back to the host (on CUDA each waits for the queued kernels).
HOST_READS = ["nonzero", "item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"]


def host_reads_in_one_decode_step(monkeypatch, layers: int, prune_layers, keep_fractions) -> int:
    """Host reads (HOST_READS and ``torch.equal``) made by one ``LazyLLM.step`` after a prefill and two steps."""
    model = tiny_model("llama", layers=layers, vocab=VOCAB, init=0.2, **PLAIN)
    method = LazyLLM(prune_layers=prune_layers, keep_fractions=keep_fractions)
    state = method.prefill(model, prompt(40))
    for _ in range(2):  # let pruned prompt tokens be revived in the counted step too
        method.step(model, state, state.logits.argmax(-1, keepdim=True))
    token = state.logits.argmax(-1, keepdim=True)
    count = [0]

    def counted(original):
        def wrapper(*args, **kwargs):
            count[0] += 1
            return original(*args, **kwargs)

        return wrapper

    with monkeypatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
        m.setattr(torch, "equal", counted(torch.equal))
        method.step(model, state, token)
    return count[0]


def test_decode_step_host_reads_do_not_grow_with_depth(monkeypatch):
    """One decoding step reads the device O(prune layers + 1) times, not once or more per layer."""
    prune_layers, keep_fractions = (1, 2), (0.6, 0.7)
    shallow = host_reads_in_one_decode_step(monkeypatch, 4, prune_layers, keep_fractions)
    deep = host_reads_in_one_decode_step(monkeypatch, 8, prune_layers, keep_fractions)
    assert deep == shallow, f"host reads grow with depth: {shallow} at 4 layers, {deep} at 8"
    # One read per segment between prunes (a .cpu() and its .numpy()), plus the two details totals.
    assert shallow <= 2 * (len(prune_layers) + 1) + 2, shallow
