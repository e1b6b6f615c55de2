"""GemFilter's selection from a draft model (``filter_model``): the draft runs the filter pass, the model answers.

A draft with the model's own weights must give exactly the self-filter's selection and tokens; another draft's
selection must be GemFilter's own selection on that draft; tokenizers that differ are refused; the prefix cache
and the local filter pass work on the draft; the CLI and the server take the option.
"""

from __future__ import annotations

import copy
import json
import sys
import types

import pytest
import torch
from conftest import TinyTokenizer, patch_model_load, random_ids, tiny_model
from conftest import run_cli as cli
from eval_support import TEXT, byte_model, byte_tokenizer, save_model_dir

from tokensieve.core.draft import DraftModel, check_same_tokenizer
from tokensieve.engine.prefix_cache import PrefixReuse, PrefixStore
from tokensieve.engine.runner import generate, generate_batch
from tokensieve.errors import InputError
from tokensieve.methods import GemFilter, make_method
from tokensieve.methods.base import full_prefill


def other_draft(family: str = "llama", layers: int = 3, seed: int = 7) -> torch.nn.Module:
    """A draft of another shape and other weights over the suite's vocabulary (narrower, fewer layers)."""
    return tiny_model(family, layers=layers, hidden=32, heads=2, kv_heads=1, seed=seed, init=0.2)


def swapped_tokenizer():
    """A byte tokenizer whose ids of 'a' and 'b' are exchanged: same size, another vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


# ---------------------------------------------------------------- the draft is the model: the self-filter exactly


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("params", [{"topk": 48}, {"topk": 40, "filter_layer": 4, "scoring": "paper", "dilation": 1}])
def test_draft_with_the_models_weights_gives_the_self_filters_selection_and_tokens(family, params):
    model = tiny_model(family, init=0.2)
    draft = copy.deepcopy(model)  # the same weights, another object: the draft path runs
    tok = TinyTokenizer()
    for seed in (1, 2):
        ids = random_ids(160, seed=seed)
        own = GemFilter(**params)
        drafted = GemFilter(**params, filter_model=draft)
        assert torch.equal(drafted.select(model, ids), own.select(model, ids))
        ref = generate(model, tok, ids, own, max_new_tokens=8)
        got = generate(model, tok, ids, drafted, max_new_tokens=8)
        assert got.token_ids == ref.token_ids and got.kept_indices == ref.kept_indices
        assert got.details["filter_layer"] == ref.details["filter_layer"]
        assert got.details["filter_model"] == ("LlamaForCausalLM" if family == "llama" else "Qwen2ForCausalLM")
        assert "filter_model" not in ref.details
        assert got.params["filter_model"] == got.details["filter_model"] and ref.params["filter_model"] is None


def test_draft_with_the_models_weights_in_a_batch_gives_the_self_filters_rows():
    model = tiny_model("llama", init=0.2)
    tok = TinyTokenizer()
    prompts = [random_ids(150, seed=3), random_ids(110, seed=4)]
    ref = generate_batch(model, tok, prompts, GemFilter(topk=40), max_new_tokens=6)
    got = generate_batch(model, tok, prompts, GemFilter(topk=40, filter_model=copy.deepcopy(model)), max_new_tokens=6)
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    assert [r.kept_indices for r in got] == [r.kept_indices for r in ref]


# ---------------------------------------------------------------- another draft: its selection, the model's answer


def test_another_draft_selects_with_its_own_layers_and_the_model_answers_on_the_kept_ids():
    model = tiny_model("llama", init=0.2)
    draft = other_draft()
    ids = random_ids(200, seed=5)
    g = GemFilter(topk=50, filter_layer=2, filter_model=draft)  # layer 2 is the draft's last layer
    idx = g.select(model, ids)
    # the selection is GemFilter's own on the draft (same code, same rule) ...
    assert torch.equal(idx, GemFilter(topk=50, filter_layer=2).select(draft, ids))
    # ... and not what the model would select itself (so the draft really ran)
    assert not torch.equal(idx, GemFilter(topk=50, filter_layer=2).select(model, ids))
    state = g.prefill(model, ids)
    assert torch.equal(state.kept_indices, idx)
    ref = full_prefill(model, ids[:, idx])  # the model's second pass on the kept ids at positions 0..k-1
    torch.testing.assert_close(state.logits, ref.logits, rtol=0, atol=0)
    assert state.next_position == 50 and state.details["filter_layer"] == 2


def test_filter_layer_is_the_drafts_and_the_default_is_the_drafts_known_layer():
    model = tiny_model("llama", layers=6)
    draft = other_draft(layers=3)
    g = GemFilter(topk=16, filter_model=draft)
    assert g.resolved_layer(model) == 1 == GemFilter().resolved_layer(draft)  # int(0.45 * 3), not the model's 2
    GemFilter(topk=16, filter_layer=2, filter_model=draft).validate(model, 100)  # the draft's last layer: allowed
    with pytest.raises(InputError, match=r"filter_layer must be in \[0, 2\] for the filter model, got 4"):
        GemFilter(topk=16, filter_layer=4, filter_model=draft).validate(
            model, 100
        )  # a layer of the model, not the draft
    short = other_draft()
    short.config.max_position_embeddings = 64
    with pytest.raises(InputError, match="more than the filter model's 64 positions"):
        GemFilter(topk=16, filter_model=short).validate(model, 100)


def test_bad_filter_model_values_are_refused():
    for bad in (3, "", object(), (1, 2)):
        with pytest.raises(InputError, match="filter_model must be"):
            GemFilter(filter_model=bad)


# ---------------------------------------------------------------- tokenizers


def test_draft_of_another_tokenizer_is_refused_with_a_clear_error():
    model, tok = byte_model(), byte_tokenizer()
    draft = byte_model(seed=3)
    ids = tok("The vault code is 4711. " * 20, return_tensors="pt")["input_ids"]
    with pytest.raises(InputError, match=r"filter_model's tokenizer is not the model's: .* 2 differ \(e.g. 'a': id"):
        generate(model, tok, ids, GemFilter(topk=32, filter_model=(draft, swapped_tokenizer())), max_new_tokens=2)
    other_eos = byte_tokenizer()
    other_eos.add_special_tokens({"pad_token": "<eos>"})
    with pytest.raises(InputError, match="pad_token_id 256, the model's None"):
        check_same_tokenizer(tok, other_eos)
    check_same_tokenizer(tok, byte_tokenizer())  # another instance of the same tokenizer: accepted
    GemFilter(topk=32, filter_model=(draft, byte_tokenizer())).prepare(model, tok)
    # a bare model (no tokenizer) is compared by its config
    with pytest.raises(InputError, match="filter_model's config has vocab_size 96, the model's 257"):
        generate(model, tok, ids, GemFilter(topk=32, filter_model=tiny_model(layers=2)), max_new_tokens=2)


def test_draft_given_by_path_is_loaded_once_on_the_models_device(tmp_path):
    model, tok = byte_model(), byte_tokenizer()
    draft = byte_model(layers=2, seed=11)
    draft.save_pretrained(tmp_path / "d")
    tok.save_pretrained(tmp_path / "d")
    swapped_tokenizer().save_pretrained(tmp_path / "bad")
    draft.save_pretrained(tmp_path / "bad")
    ids = tok(TEXT[:300], return_tensors="pt")["input_ids"]
    g = GemFilter(topk=64, filter_layer=1, filter_model=str(tmp_path / "d"))
    got = generate(model, tok, ids, g, max_new_tokens=4)
    assert isinstance(g.filter_model, DraftModel) and g.filter_model.model is not model
    loaded = g.filter_model.model
    ref = generate(model, tok, ids, GemFilter(topk=64, filter_layer=1, filter_model=(draft, tok)), max_new_tokens=4)
    assert got.kept_indices == ref.kept_indices and got.token_ids == ref.token_ids
    generate(model, tok, ids, g, max_new_tokens=1)
    assert g.filter_model.model is loaded  # not loaded again
    with pytest.raises(InputError, match="tokenizer is not the model's"):
        generate(model, tok, ids, GemFilter(topk=64, filter_model=str(tmp_path / "bad")), max_new_tokens=1)


# ---------------------------------------------------------------- prefix cache and local filter pass on the draft


@pytest.mark.parametrize("scoring", ["window", "paper"])
def test_prefix_reuse_with_a_draft_equals_no_reuse(scoring):
    model, draft = tiny_model("llama", init=0.2), other_draft()
    tok = TinyTokenizer()
    doc = random_ids(200, seed=3)
    store = PrefixStore(1 << 30)
    params = dict(topk=48, filter_layer=2, scoring=scoring)

    def ask(ids, method, cache=None):
        m = PrefixReuse(method, cache, 200) if cache is not None else method
        return generate(model, tok, ids, m, max_new_tokens=6)

    for i, q_len in enumerate([20, 3, 12]):
        ids = torch.cat([doc, random_ids(q_len, seed=10 + i)], dim=1)
        ref = ask(ids, GemFilter(**params, filter_model=draft))
        got = ask(ids, GemFilter(**params, filter_model=draft), store)
        assert got.kept_indices == ref.kept_indices and got.token_ids == ref.token_ids
        assert (got.details["prefix_cached_tokens"] > 0) == (i > 0)
    (entry,) = store.entries()
    # the entry is the draft's state: its layers 0..1 keys/values and layer 2's keys, at the draft's width
    assert entry.source is not None and len(entry.keys) == 3 and len(entry.values) == 2
    assert entry.keys[0].shape[1] == draft.config.num_key_value_heads
    # the model's own GemFilter never takes the draft's entry (nor the other way round)
    ids = torch.cat([doc, random_ids(9, seed=30)], dim=1)
    own = ask(ids, GemFilter(**params), store)
    assert own.details["prefix_cached_tokens"] == 0 and own.kept_indices == ask(ids, GemFilter(**params)).kept_indices
    again = ask(ids, GemFilter(**params, filter_model=draft), store)
    assert again.details["prefix_cached_tokens"] > 0 and len(store) == 2


@pytest.mark.parametrize("chunk_size", [None, 64])
def test_local_filter_pass_runs_on_the_draft(chunk_size):
    model, draft = tiny_model("llama", init=0.2), other_draft(layers=3)
    ids = random_ids(300, seed=6)
    local = dict(topk=60, filter_layer=2, filter_attention="local", n_initial=4, n_recent=32, chunk_size=chunk_size)
    got = GemFilter(**local, filter_model=draft).scores(model, ids)
    torch.testing.assert_close(
        got, GemFilter(**local).scores(draft, ids), rtol=1e-5, atol=1e-6
    )  # the draft's local pass
    dense = GemFilter(topk=60, filter_layer=2, chunk_size=chunk_size).scores(draft, ids)
    assert not torch.allclose(got, dense, rtol=1e-3, atol=1e-5)  # the local pass really ran (a 32-token window)


# ---------------------------------------------------------------- vLLM behind a draft's selection (stand-in engine)


def test_vllm_adapter_hands_the_drafts_selection_to_the_engine(monkeypatch):
    from tokensieve.integrations.vllm_adapter import generate_with_vllm, select_tokens

    mod = types.ModuleType("vllm")
    mod.SamplingParams = lambda **kw: ("params", kw)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    mod.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)

    class FakeLLM:
        def generate(self, prompts, sampling_params, use_tqdm=True):
            self.prompts = prompts
            ids = prompts[0]["prompt_token_ids"]
            return [
                types.SimpleNamespace(
                    prompt_token_ids=ids,
                    outputs=[types.SimpleNamespace(text="x", token_ids=ids[-2:], finish_reason="length")],
                )
            ]

    model, draft, tok = tiny_model(init=0.2), other_draft(), TinyTokenizer()
    ids = random_ids(120, seed=8)
    llm = FakeLLM()
    res = generate_with_vllm(llm, model, tok, ids, GemFilter(topk=20, filter_layer=2, filter_model=draft))
    want = GemFilter(topk=20, filter_layer=2).select(draft, ids).tolist()
    assert res.kept_indices == want and llm.prompts == [{"prompt_token_ids": [ids[0, i].item() for i in want]}]
    assert str(res.params["filter_model"]) == "LlamaForCausalLM"
    # the transformers side may hold the draft alone (the model itself lives in vLLM only): the same selection
    assert select_tokens(draft, tok, ids, topk=20, filter_layer=2).kept_indices == want


# ---------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("draft-cli")
    target = save_model_dir(root / "target")
    byte_model(layers=2, seed=11).save_pretrained(root / "draft")
    byte_tokenizer().save_pretrained(root / "draft")
    byte_model(layers=2, seed=11).save_pretrained(root / "other")
    swapped_tokenizer().save_pretrained(root / "other")
    doc = root / "doc.txt"
    doc.write_text(TEXT[:2500])
    return target, root / "draft", root / "other", doc


def test_cli_ask_with_a_draft_equals_the_python_api(dirs, capsys):
    from tokensieve.core.models import load_model

    target, draft, _, doc = dirs
    code, out, err = cli(
        [
            "ask",
            "--model",
            str(target),
            "--file",
            str(doc),
            "--question",
            "Which river?",
            "--method",
            "gemfilter",
            "--topk",
            "128",
            "--filter-model",
            str(draft),
            "--filter-layer",
            "1",
            "--max-new-tokens",
            "4",
            "--json",
            "--show-selection",
        ],
        capsys,
    )
    assert code == 0, err
    assert f"loading {draft} ..." in err
    res = json.loads(out)
    assert res["details"]["filter_model"] == str(draft) and res["details"]["filter_layer"] == 1
    assert res["params"]["filter_model"] == str(draft) and res["kept_tokens"] == 128
    model, tok = load_model(str(target))
    d, _ = load_model(str(draft))
    messages = [
        {
            "role": "user",
            "content": f"{doc.read_text()}\n\nAnswer the question from the text above.\nQuestion: Which river?",
        }
    ]
    ref = generate(model, tok, messages, GemFilter(topk=128, filter_layer=1, filter_model=(d, tok)), max_new_tokens=4)
    assert res["kept_indices"] == list(ref.kept_indices) and res["answer"] == ref.text


def test_cli_draft_errors_exit_2(dirs, capsys):
    target, draft, other, doc = dirs
    base = ["ask", "--model", str(target), "--file", str(doc), "--question", "q", "--max-new-tokens", "1"]
    code, _, err = cli([*base, "--method", "full", "--filter-model", str(draft)], capsys)
    assert code == 2 and "--filter-model is a gemfilter option" in err
    code, _, err = cli([*base, "--method", "gemfilter", "--filter-model", str(other)], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        "tokensieve ask: error: filter_model's tokenizer is not the model's"
    )
    code, _, err = cli([*base, "--method", "gemfilter", "--filter-model", str(draft), "--filter-layer", "2"], capsys)
    assert code == 2 and "filter_layer must be in [0, 1] for the filter model, got 2" in err
    code, _, err = cli([*base, "--method", "gemfilter", "--filter-model", " "], capsys)
    assert code == 2 and "expected a model name or path" in err
    code, _, err = cli(
        ["serve", "--model", "/nonexistent/m", "--filter-model", str(draft), "--filter-model", str(draft)], capsys
    )
    assert code == 2 and "each draft once" in err
    code, _, err = cli(["bench", "--shape", "tiny", "--methods", "gemfilter", "--filter-model", str(draft)], capsys)
    assert code == 2 and "--filter-model needs --model" in err


def test_cli_calibrate_measures_every_layer_of_the_draft(dirs, capsys, tmp_path):
    target, draft, other, _ = dirs
    argv = [
        "calibrate",
        "--model",
        str(target),
        "--filter-model",
        str(draft),
        "--lengths",
        "600",
        "--depths",
        "0.5",
        "--topk",
        "128",
        "--haystack",
        str(target / "hay.txt"),
        "--json",
    ]
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["filter_model"] == str(draft) and all(
        len(v) == 2 for v in res["recall"].values()
    )  # the draft's 2 layers
    best = res["recall"][res["best_scoring"]]
    assert res["last_layer_recall"] == best[-1] and res["last_layer_gain"] == round(
        best[-1] - best[res["best_layer"]], 4
    )
    code, _, err = cli(argv[:4] + [str(other)] + argv[5:], capsys)
    assert code == 2 and "tokenizer is not the model's" in err


# ---------------------------------------------------------------- server


@pytest.fixture(scope="module")
def draft_server():
    from test_serve import serving

    from tokensieve.serve.app import create_app

    model, tok = byte_model(max_pos=1024), byte_tokenizer()
    draft = byte_model(layers=2, seed=11, max_pos=1024)
    app = create_app(
        model,
        tok,
        model_name="tiny",
        method="gemfilter",
        method_params={"topk": 64, "filter_model": "small"},
        filter_models={"small": DraftModel(draft, byte_tokenizer(), "small")},
        default_max_tokens=6,
    )
    with serving(app) as base:
        yield base, model, draft, tok


def test_server_default_and_per_request_draft(draft_server):
    import httpx2

    base, model, draft, tok = draft_server
    prompt = TEXT[:400]

    def complete(ext=None):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0}
        if ext is not None:
            body["tokensieve"] = ext
        return httpx2.post(f"{base}/v1/completions", json=body, timeout=60)

    def text(method):  # what the server must answer: the runner alone, stop tokens dropped
        from tokensieve.engine.runner import stop_token_ids

        ids = tok(prompt, return_tensors="pt")["input_ids"]
        res = generate(model, tok, ids, method, max_new_tokens=6)
        stops = stop_token_ids(model, tok)
        return tok.decode([t for t in res.token_ids if t not in stops], skip_special_tokens=True)

    assert httpx2.get(f"{base}/health").json()["filter_models"] == ["small"]
    r = complete()
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == text(GemFilter(topk=64, filter_model=(draft, tok)))
    r = complete({"method": "gemfilter", "topk": 32, "filter_model": "small", "filter_layer": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == text(
        GemFilter(topk=32, filter_layer=0, filter_model=(draft, tok))
    )
    r = complete({"filter_model": None})  # the server's default method on the model itself
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == text(GemFilter(topk=64))
    for bad, needle in [
        ("/tmp/some/model", "filter model this server loaded (small)"),
        (3, "got 3"),
        ("big", "or null for the model itself, got 'big'"),
    ]:
        r = complete({"filter_model": bad})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    r = complete({"method": "snapkv", "filter_model": "small"})
    assert r.status_code == 400 and "gemfilter parameter" in r.json()["error"]["message"]
    r = complete({"filter_model": "small", "filter_layer": 2})
    assert r.status_code == 400 and "[0, 1] for the filter model" in r.json()["error"]["message"]


def test_cli_serve_loads_the_drafts_and_requests_pick_them(dirs, capsys, monkeypatch):
    import httpx2
    from test_serve import serving

    from tokensieve.core.models import load_model
    from tokensieve.engine.runner import stop_token_ids
    from tokensieve.serve.server import DrainingServer

    target, draft, other, _ = dirs
    apps = []
    monkeypatch.setattr(DrainingServer, "run", lambda self: apps.append(self.config.app))
    code, _, err = cli(
        [
            "serve",
            "--model",
            str(target),
            "--method",
            "gemfilter",
            "--topk",
            "64",
            "--filter-model",
            str(draft),
            "--port",
            "0",
        ],
        capsys,
    )
    assert code == 0, err
    assert f"loading {draft} ..." in err
    model, tok = load_model(str(target))
    d, _ = load_model(str(draft))
    prompt = TEXT[:500]
    ids = tok(prompt, return_tensors="pt")["input_ids"]

    def want(method):
        res = generate(model, tok, ids, method, max_new_tokens=5)
        stops = stop_token_ids(model, tok)
        return tok.decode([t for t in res.token_ids if t not in stops], skip_special_tokens=True)

    with serving(apps[0]) as base:
        assert httpx2.get(f"{base}/health").json()["filter_models"] == [str(draft)]
        body = {"model": "m", "prompt": prompt, "max_tokens": 5, "temperature": 0}
        r = httpx2.post(f"{base}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want(
            GemFilter(topk=64, filter_model=(d, tok))
        )
        r = httpx2.post(f"{base}/v1/completions", json={**body, "tokensieve": {"filter_model": str(other)}}, timeout=60)
        assert r.status_code == 400 and f"filter model this server loaded ({draft})" in r.json()["error"]["message"]
    code, _, err = cli(["serve", "--model", str(target), "--method", "gemfilter", "--filter-model", str(other)], capsys)
    assert code == 2 and "tokenizer is not the model's" in err and len(apps) == 1


def test_cli_serve_vllm_with_a_draft_loads_only_the_draft_in_transformers(dirs, capsys, monkeypatch):
    """``serve --engine vllm --filter-model``: vLLM gets the model's folder, transformers holds the draft alone
    (a stand-in for vLLM's engine arguments: vLLM itself is not installed here)."""
    from tokensieve.core.models import load_model
    from tokensieve.integrations.vllm_adapter import select_tokens
    from tokensieve.serve.server import DrainingServer

    target, draft, other, _ = dirs
    seen: dict = {}

    class EngineArgs:
        disable_log_stats, enable_log_requests = True, False

        def __init__(self, **kw):
            seen.update(kw)

        def create_engine_config(self):
            return types.SimpleNamespace(
                model_config=types.SimpleNamespace(max_model_len=2048),
                scheduler_config=types.SimpleNamespace(max_num_seqs=2),
            )

    vllm = types.ModuleType("vllm")
    engine_mod, arg_utils = types.ModuleType("vllm.engine"), types.ModuleType("vllm.engine.arg_utils")
    arg_utils.AsyncEngineArgs = EngineArgs
    for name, mod in [("vllm", vllm), ("vllm.engine", engine_mod), ("vllm.engine.arg_utils", arg_utils)]:
        monkeypatch.setitem(sys.modules, name, mod)

    def no_target(*a, **k):
        raise AssertionError("the model itself was loaded in transformers")

    patch_model_load(monkeypatch, no_target)
    apps = []
    monkeypatch.setattr(DrainingServer, "run", lambda self: apps.append(self.config.app))
    code, _, err = cli(
        [
            "serve",
            "--engine",
            "vllm",
            "--model",
            str(target),
            "--method",
            "gemfilter",
            "--topk",
            "64",
            "--filter-model",
            str(draft),
        ],
        capsys,
    )
    assert code == 0, err
    engine = apps[0].state.engine
    assert seen["model"] == str(target)  # vLLM answers with the model ...
    assert engine.model is engine.filter_models[str(draft)].model  # ... the filter pass runs on the draft
    d, tok = load_model(str(draft))
    ids = tok(TEXT[:600], return_tensors="pt")["input_ids"]
    got = select_tokens(engine.model, engine.tokenizer, ids, make_method("gemfilter", **engine.preparer.default_params))
    assert got.kept_indices == GemFilter(topk=64).select(d, ids).tolist()
    code, _, err = cli(
        ["serve", "--engine", "vllm", "--model", str(target), "--method", "gemfilter", "--filter-model", str(other)],
        capsys,
    )
    assert code == 2 and "tokenizer is not the model's" in err


def test_padded_vocabulary_is_accepted_when_the_tokenizers_match():
    """Qwen2.5's 7B pads its embedding to 152064 rows, the 0.5B to 151936, one tokenizer: a draft whose embedding
    is larger than the model's is accepted once the tokenizers are compared (and later calls without them)."""
    model, tok = byte_model(), byte_tokenizer()
    draft = tiny_model(layers=2, vocab=300, hidden=32, ids={"eos_token_id": 256}, seed=4)
    ids = tok(TEXT[:400], return_tensors="pt")["input_ids"]
    g = GemFilter(topk=64, filter_layer=1, filter_model=(draft, byte_tokenizer()))
    res = generate(model, tok, ids, g, max_new_tokens=2)
    assert res.kept_indices == GemFilter(topk=64, filter_layer=1).select(draft, ids).tolist()
    assert torch.equal(g.select(model, ids), torch.tensor(res.kept_indices))  # no tokenizer here: already checked
    small = tiny_model(layers=2, vocab=200, hidden=32, seed=4)  # fewer rows than the tokenizer's 257 ids
    with pytest.raises(InputError, match="filter_model embeds 200 token ids, fewer than the draft tokenizer's 257"):
        GemFilter(topk=64, filter_model=(small, byte_tokenizer())).prepare(model, tok)
