"""Shared fixtures: tiny random-weight models of several families and a minimal tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3TextConfig,
    Gemma3ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import tokensieve

VOCAB = 96


def tiny_model(family: str = "llama", layers: int = 6, seed: int = 0, max_pos: int = 512) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    elif family == "gemma3":
        model = Gemma3ForCausalLM(
            Gemma3TextConfig(**common, head_dim=16, sliding_window=16, layer_types=None, query_pre_attn_scalar=16)
        )
    else:
        raise ValueError(family)
    model.eval()
    # Random weights give near-uniform logits; scale the head up so greedy choices are not near-ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0) if not model.config.tie_word_embeddings else None
    tokensieve.use_tokensieve_attention(model)
    model.generation_config.eos_token_id = None  # never stop early on random weights
    return model


class TinyTokenizer:
    """Just enough tokenizer for the runner: ids are their own text."""

    eos_token_id = None
    bos_token_id = 1
    chat_template = None

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(str(int(i)) for i in ids)

    def __call__(self, text: str, return_tensors=None, add_special_tokens=True):
        ids = [int(t) % VOCAB for t in text.split()]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def __len__(self) -> int:
        return VOCAB


@pytest.fixture
def tok() -> TinyTokenizer:
    return TinyTokenizer()


def random_ids(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, n), generator=g)


@pytest.fixture(scope="session")
def smollm2():
    try:
        return tokensieve.load_model("smollm2")
    except tokensieve.ModelLoadError as exc:
        pytest.skip(str(exc))
