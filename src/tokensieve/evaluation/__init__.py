"""Accuracy evaluation: needle-in-a-haystack (and, later, RULER-style tasks, perplexity)."""
