"""Filter-only loading (tokensieve.integrations.filter_model): layers 0..r, spread with a device_map, same kept ids."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from tokensieve.bench.roofline import weights_bytes
from tokensieve.errors import InputError
from tokensieve.integrations.filter_model import filter_config, filter_fraction, filter_layer_of, load_filter_model
from tokensieve.methods.gemfilter import GemFilter

R = 2


def _ids(n: int = 200, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def saved(request, tmp_path_factory):
    model = tiny_model(request.param, layers=6, init=0.2)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return model, folder


def _split_map(r: int) -> dict[str, str]:
    """Two "devices" on a CPU-only machine: the first layers in memory, the filter layer offloaded to disk."""
    dm = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dm.update({f"model.layers.{i}": "cpu" for i in range(r)})
    dm[f"model.layers.{r}"] = "disk"
    return dm


@pytest.mark.parametrize("device_map", [None, "auto", "split"])
def test_same_kept_ids_as_full_model(saved, tmp_path, device_map):
    model, folder = saved
    dm = _split_map(R) if device_map == "split" else device_map
    fm = load_filter_model(folder, R, device_map=dm, dtype="float32", offload_folder=tmp_path / "offload")
    assert len(fm.model.layers) == R + 1 and filter_layer_of(fm) == R
    assert filter_layer_of(model) is None
    for seed, k in ((1, 32), (2, 7), (3, 64)):
        ids = _ids(seed=seed)
        ref = GemFilter(filter_layer=R, topk=k).select(model, ids)
        got = GemFilter(filter_layer=R, topk=k).select(fm, ids)
        assert torch.equal(got.cpu(), ref), (device_map, seed, k)
    # the selection is not trivial: a different layer picks different tokens
    other = GemFilter(filter_layer=R + 1, topk=32).select(model, _ids(seed=1))
    assert not torch.equal(other, GemFilter(filter_layer=R, topk=32).select(fm, _ids(seed=1)))


def test_split_map_really_offloads(saved, tmp_path):
    model, folder = saved
    fm = load_filter_model(folder, R, device_map=_split_map(R), dtype="float32", offload_folder=tmp_path / "off")
    assert fm.hf_device_map[f"model.layers.{R}"] == "disk"
    # its weights stay on disk (transformers reads safetensors checkpoints in place; no copy is written)
    assert all(p.device.type == "meta" for p in fm.model.layers[R].parameters())
    assert all(p.device.type == "cpu" for p in fm.model.layers[0].parameters())


def test_holds_only_filter_layers(saved):
    model, folder = saved
    fm = load_filter_model(folder, R, device_map=None, dtype="float32")
    full_layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    head = 0 if tied else model.lm_head.weight.numel() * 4
    # the full model minus layers r+1..L-1 minus the untied head
    assert weights_bytes(fm) == weights_bytes(model) - (6 - R - 1) * full_layer - head
    for i in range(R + 1):  # the loaded layers hold the checkpoint's weights, not fresh ones
        for (n1, p1), (n2, p2) in zip(fm.model.layers[i].named_parameters(), model.model.layers[i].named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)
    if not tied:
        assert fm.lm_head.weight.device.type == "meta"


def test_filter_fraction(saved):
    model, _ = saved
    f = filter_fraction(model.config, R)
    assert f["layers"] == pytest.approx((R + 1) / 6)
    assert f["total"] < 0.6 and f["filter_params"] < f["full_params"]


def test_filter_config_cuts_layer_types():
    cfg = tiny_model("gemma3", layers=6).config
    out = filter_config(cfg, 3)
    assert out.num_hidden_layers == 4 and len(out.layer_types) == 4
    assert out.layer_types == cfg.layer_types[:4] and cfg.num_hidden_layers == 6  # the original is untouched


@pytest.mark.parametrize("bad", [-1, 6, 2.0, True, "2"])
def test_bad_filter_layer(saved, bad):
    _, folder = saved
    with pytest.raises(InputError, match=repr(bad).replace("(", r"\(").replace(".", r"\.")):
        load_filter_model(folder, bad, device_map=None)


def test_bad_device_map(saved):
    _, folder = saved
    with pytest.raises(InputError, match="'everywhere'"):
        load_filter_model(folder, R, device_map="everywhere")


@pytest.mark.real_model
def test_smollm2_filter_only_same_kept_ids(smollm2):
    from tokensieve.core.models import cache_dir
    from tokensieve.data import read_text
    from tokensieve.engine.runner import encode_prompt
    from tokensieve.evaluation.needle import build_needle_prompt

    model, tok = smollm2
    fm = load_filter_model(cache_dir() / "smollm2", 18, device_map="auto", dtype="float32")
    assert len(fm.model.layers) == 19 and weights_bytes(fm) < 0.75 * weights_bytes(model)
    for length, depth in ((800, 0.4), (1500, 0.8)):
        ids = encode_prompt(
            tok, build_needle_prompt(tok, read_text(None, min_chars=12 * length), length, depth).messages
        )
        ref = GemFilter(filter_layer=18, topk=128).select(model, ids)
        assert torch.equal(GemFilter(filter_layer=18, topk=128).select(fm, ids).cpu(), ref)


# ---- random weights in a shape (build_filter_model): the GPU benchmarks' filter model -------------------


def _llama_config(layers: int = 6):
    return tiny_model("llama", layers=layers).config


def test_built_filter_model_selects_like_the_full_model_with_its_weights():
    """A filter model built from a config holds layers 0..r; the full model given those weights (and any
    weights above r) keeps the same ids: the filter pass reads nothing else."""
    from tokensieve.integrations.filter_model import build_filter_model

    config = _llama_config()
    fm = build_filter_model(config, R, device_map=None, dtype="float32", std=0.2)
    assert len(fm.model.layers) == R + 1 and filter_layer_of(fm) == R
    assert fm.lm_head.weight.device.type == "meta"
    full = tiny_model("llama", layers=6, init=0.2)
    missing, _ = full.load_state_dict(
        {k: v for k, v in fm.state_dict().items() if not k.startswith("lm_head")}, strict=False
    )
    assert all(k.startswith(("lm_head", "model.norm")) or int(k.split(".")[2]) > R for k in missing), missing
    torch.testing.assert_close(fm.model.rotary_emb.inv_freq, full.model.rotary_emb.inv_freq, rtol=0, atol=0)
    for k in (16, 50):
        got = GemFilter(topk=k, filter_layer=R).select(fm, _ids())
        assert torch.equal(got, GemFilter(topk=k, filter_layer=R).select(full, _ids())), k


def test_built_filter_model_same_weights_whatever_the_placement():
    from tokensieve.integrations.filter_model import build_filter_model

    config = _llama_config()
    plain = build_filter_model(config, R, device_map=None, dtype="float32", seed=3)
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    dm |= {f"model.layers.{i}": "cpu" for i in range(R + 1)}
    mapped = build_filter_model(config, R, device_map=dm, dtype="float32", seed=3)
    other = build_filter_model(config, R, device_map=None, dtype="float32", seed=4)
    a, b, c = plain.state_dict(), mapped.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("lm_head"))
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])


def test_device_map_spreads_filter_layers_over_devices():
    """accelerate's placement of the filter layers over two devices' worth of memory (no GPU needed to plan)."""
    from transformers import AutoModelForCausalLM

    from tokensieve.integrations.filter_model import _resolve_device_map

    config = filter_config(_llama_config(layers=8), 5)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    layer = sum(p.numel() * 4 for p in m.model.layers[0].parameters())
    placement = _resolve_device_map(m, "sequential", {0: 4 * layer, 1: 4 * layer, "cpu": 10**9}, torch.float32)
    devices = [placement.get(f"model.layers.{i}") for i in range(6)]
    assert set(devices) == {0, 1}, placement
    assert devices == sorted(devices), placement  # in order: the first layers on device 0


def test_build_filter_model_refuses_disk():
    from tokensieve.integrations.filter_model import build_filter_model

    dm = {"": "disk"}
    with pytest.raises(InputError, match="disk"):
        build_filter_model(_llama_config(), R, device_map=dm)


def test_device_map_passes_accelerate_a_list_of_no_split_classes(monkeypatch):
    """transformers 5 keeps ``_no_split_modules`` as a set; accelerate before 1.14 takes anything but a list or tuple
    as one class name (and then splits decoder layers across devices), so a list must go to accelerate."""
    import accelerate.utils

    from tokensieve.integrations.filter_model import _resolve_device_map

    seen = []
    monkeypatch.setattr(accelerate.utils, "infer_auto_device_map", lambda m, **kw: seen.append(kw) or {"": "cpu"})
    monkeypatch.setattr(accelerate.utils, "get_balanced_memory", lambda m, **kw: seen.append(kw) or {"cpu": 1})
    model = torch.nn.Linear(2, 2)
    model._no_split_modules = {"LlamaDecoderLayer"}
    for strategy in ("sequential", "balanced"):
        _resolve_device_map(model, strategy, {"cpu": 10**9}, torch.float32)
    assert len(seen) == 3 and all(kw["no_split_module_classes"] == ["LlamaDecoderLayer"] for kw in seen)
