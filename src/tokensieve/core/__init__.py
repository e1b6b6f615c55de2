"""Transformers glue with no method knowledge: the attention hook, the eviction cache, scoring, RoPE tables,
peak memory, model loading and separator tokens. Imports nothing above it (only ``errors`` and ``kernels``)."""
