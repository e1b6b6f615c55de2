"""One request, prompt to tokens: the driver (``runner``: generate, generate_batch, score_continuation,
sampling), the prefix cache and the position-shifted streaming cache."""
