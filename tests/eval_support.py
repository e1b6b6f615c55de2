"""Helpers for the evaluation tests: a byte-level tokenizer built in memory and tiny random models."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import tokensieve

# A few sentences to build haystacks from (any text works; PG-19 is not needed in tests).
TEXT = " ".join(
    f"Sentence number {i} talks about the {w} near the old {v}. It was a quiet day in town {i % 7}!"
    for i, (w, v) in enumerate(zip(["river", "mill", "garden", "bridge", "school"] * 60, ["tower", "gate", "road", "farm"] * 75))
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (256 ids + <eos>): deterministic, offline, no chat template."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_llama(vocab_size: int = 257, seed: int = 0, max_pos: int = 4096) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos, eos_token_id=vocab_size - 1)
    model = LlamaForCausalLM(cfg).eval()
    tokensieve.use_tokensieve_attention(model)
    return model


def tiny_qwen2(vocab_size: int = 257, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, eos_token_id=vocab_size - 1)
    model = Qwen2ForCausalLM(cfg).eval()
    tokensieve.use_tokensieve_attention(model)
    return model
