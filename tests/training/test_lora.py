"""The low-rank adapter: identity at init, only adapters train, merge equals the wrapped model, save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import tokensieve
from tokensieve.errors import InputError
from tokensieve.training.lora import (
    ATTN_NAMES,
    MLP_NAMES,
    LoRALinear,
    adapter_state,
    add_lora,
    count_parameters,
    load_adapter_state,
    lora_layers,
    merge_lora,
    unwrapped,
)


def _ids(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (2, n), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("targets", ["attn", "attn+mlp"])
def test_the_wrapped_model_equals_the_original_exactly_at_init(family, targets):
    model = tiny_model(family, layers=2, dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        before = _logits(model, ids)
        n = add_lora(model, rank=4, alpha=8.0, targets=targets)
        after = _logits(model, ids)
    names = ATTN_NAMES if targets == "attn" else ATTN_NAMES + MLP_NAMES
    assert n == 2 * len(names) == len(lora_layers(model))
    assert {name.rsplit(".", 1)[-1] for name, _ in lora_layers(model)} == set(names)
    assert torch.equal(before, after)  # B = 0: bit for bit
    assert all(m.lora_A.abs().max() > 0 for _, m in lora_layers(model))  # A is random, not zero


def test_only_the_adapters_require_and_receive_gradients():
    model = tiny_model("llama", layers=2, dtype=torch.float32)
    add_lora(model, rank=4, alpha=4.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * 4 * 2  # A and B of q/k/v/o in two layers
    model.train()
    ids = _ids()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            assert p.grad.abs().sum() > 0, name
        elif name.endswith("lora_A"):
            assert p.grad is not None and p.grad.abs().sum() == 0, name  # B = 0: A's gradient is zero at first
        else:
            assert p.grad is None, name
    n_train, n_total = count_parameters(model)
    hidden, kv = 64, 32  # tiny_model: 4 heads of 16, 2 KV heads
    per_layer = 4 * (hidden + hidden) + 4 * (hidden + kv) * 2 + 4 * (hidden + hidden)  # q, k, v, o
    assert n_train == 2 * per_layer and n_total > 20 * n_train


def test_lora_training_lowers_the_loss_and_leaves_the_base_weights_alone():
    model = tiny_model("llama", layers=2, dtype=torch.float32)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, rank=8, alpha=16.0, targets="attn+mlp")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(32)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5
    with unwrapped(model):
        for n, p in model.named_parameters():
            assert torch.equal(p, base[n]), n  # frozen: the update lives only in A and B


def test_merge_gives_the_wrapped_models_logits_with_plain_linear_layers():
    model = tiny_model("qwen2", layers=2, dtype=torch.float32)
    add_lora(model, rank=4, alpha=8.0, targets="attn+mlp")
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.normal_(0, 0.05)  # a trained-looking adapter: the update is not zero
    ids = _ids()
    with torch.no_grad():
        wrapped = _logits(model, ids)
        with unwrapped(model):
            base = _logits(model, ids)
        assert (wrapped - base).abs().max() > 1e-2  # the adapter changes the output: the check below is not vacuous
        assert merge_lora(model) == 14
        merged = _logits(model, ids)
    torch.testing.assert_close(merged, wrapped, atol=1e-5, rtol=1e-5)
    assert not lora_layers(model)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith(ATTN_NAMES + MLP_NAMES))
    assert all(p.requires_grad for p in model.parameters())


def test_the_merged_model_saves_as_a_standard_folder_that_load_model_reads(tmp_path):
    from tokensieve.testing import byte_tokenizer

    tok = byte_tokenizer()
    model = tiny_model("llama", layers=2, vocab=len(tok), ids={"eos_token_id": tok.eos_token_id})
    add_lora(model, rank=2, alpha=2.0)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.normal_(0, 0.05)
    ids = torch.tensor([list(b"a separator, then more; text.")])
    with torch.no_grad():
        wrapped = _logits(model, ids)
    merge_lora(model)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = tokensieve.load_model(str(tmp_path), device="cpu", dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(_logits(loaded, ids), wrapped, atol=1e-5, rtol=1e-5)
    assert not any("lora" in k or ".base." in k for k in loaded.state_dict())


def test_adapter_state_round_trips_and_refuses_another_shape():
    a = tiny_model("llama", layers=2, dtype=torch.float32)
    b = tiny_model("llama", layers=2, dtype=torch.float32)
    add_lora(a, rank=4, alpha=8.0, seed=1)
    add_lora(b, rank=4, alpha=8.0, seed=2)
    with torch.no_grad():
        for _, m in lora_layers(a):
            m.lora_B.normal_(0, 0.05)
    assert not torch.equal(lora_layers(a)[0][1].lora_A, lora_layers(b)[0][1].lora_A)  # the seed draws A
    load_adapter_state(b, adapter_state(a))
    for (_, ma), (_, mb) in zip(lora_layers(a), lora_layers(b)):
        assert torch.equal(ma.lora_A, mb.lora_A) and torch.equal(ma.lora_B, mb.lora_B)
    c = tiny_model("llama", layers=2, dtype=torch.float32)
    add_lora(c, rank=2, alpha=8.0)
    with pytest.raises(InputError, match="has shape"):
        load_adapter_state(c, adapter_state(a))
    d = tiny_model("llama", layers=2, dtype=torch.float32)
    add_lora(d, rank=4, alpha=8.0, targets="attn+mlp")
    with pytest.raises(InputError, match="does not fit this model"):
        load_adapter_state(d, adapter_state(a))


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(rank=0), "lora_rank 0 means no adapter"),
        (dict(rank=1025), "lora_rank must be an integer in \\[0, 1024\\]"),
        (dict(rank=40), "exceeds the smallest adapted projection's side \\(32\\)"),
        (dict(alpha=0.0), "lora_alpha"),
        (dict(targets="mlp"), "lora_targets must be one of"),
    ],
)
def test_bad_adapter_settings_are_refused(kw, needle):
    model = tiny_model("llama", layers=1, dtype=torch.float32)
    with pytest.raises(InputError, match=needle):
        add_lora(model, **(dict(rank=4, alpha=8.0, targets="attn") | kw))
    assert not lora_layers(model)


def test_a_model_without_attention_projections_or_already_wrapped_is_refused():
    with pytest.raises(InputError, match="no q_proj/k_proj/v_proj/o_proj"):
        add_lora(tiny_model("gpt2", layers=1), rank=2, alpha=2.0)
    model = tiny_model("llama", layers=1)
    add_lora(model, rank=2, alpha=2.0)
    with pytest.raises(InputError, match="already holds a LoRA adapter"):
        add_lora(model, rank=2, alpha=2.0)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
