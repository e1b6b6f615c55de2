"""Separator tokens for SepLLM, derived from a tokenizer (no hard-coded ids).

Chen et al., "SepLLM: Accelerate Large Language Models by Compressing One
Segment into One Separator", ICML 2025. The paper's separators for Llama-3 are
``.`` ``,`` ``?`` ``!`` ``;`` ``:``, newline, space and BOS. Here a token is a
separator when its decoded text

* is made only of those punctuation characters, possibly with whitespace
  around them (``"."``, ``" ."``, ``".\\n"``, ``"..."``, ``",\\n\\n"``), or
* is only whitespace and contains a newline (``"\\n"``, ``"\\n\\n"``, ``" \\n"``),

plus the BOS token. A lone space token is included only with ``include_space``
(the paper's Llama-3 list has it; on tokenizers that glue spaces to words it
almost never occurs on its own).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

SEPARATOR_CHARS = frozenset(".,?!;:")


def is_separator_text(text: str, include_space: bool = False) -> bool:
    core = "".join(text.split())
    if core:
        return all(c in SEPARATOR_CHARS for c in core)
    if not text:
        return False
    return "\n" in text or (include_space and text == " ")


def separator_token_ids(tokenizer: PreTrainedTokenizerBase, include_space: bool = False) -> torch.Tensor:
    """Sorted int64 tensor of every token id whose text is a separator, plus BOS."""
    ids = {i for i in range(len(tokenizer)) if is_separator_text(tokenizer.decode([i]), include_space)}
    if tokenizer.bos_token_id is not None:
        ids.add(int(tokenizer.bos_token_id))
    return torch.tensor(sorted(ids), dtype=torch.long)
