"""tokensieve inside other engines: the vLLM adapter and filter-layer-only model loading across devices."""
