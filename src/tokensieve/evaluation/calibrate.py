"""Find a GemFilter filter layer for a model: needle recall of every layer's selection.

For a few generated needle prompts, one forward pass records, at every layer,
the scores GemFilter would compute there (both scorings); the recall of a
layer is the fraction of needle tokens inside its top-k selection. The best
layer is the earliest one within ``tolerance`` of the best mean recall (an
earlier layer makes a cheaper filter pass). Scores and selection are
GemFilter's own functions (which call ``tokensieve.scoring``), so calibration
measures exactly what GemFilter would keep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokensieve.attention import HOOK_KWARG
from tokensieve.evaluation.needle import build_needle_prompt
from tokensieve.methods.base import num_layers
from tokensieve.methods.gemfilter import DEFAULT_WINDOW_SIZE, SCORINGS, pool_and_select, token_scores
from tokensieve.runner import encode_prompt


@torch.inference_mode()
def all_layer_scores(
    model: PreTrainedModel, input_ids: torch.Tensor, scoring: str, window_size: int = DEFAULT_WINDOW_SIZE
) -> list[torch.Tensor]:
    """GemFilter's scores [n] (``gemfilter.token_scores``, i.e. ``tokensieve.scoring``) at every layer,
    from one full forward (no cache)."""
    out: dict[int, torch.Tensor] = {}

    def hook(module, query, key, value, attention_mask, **kwargs):
        out[module.layer_idx] = token_scores(query, key, module.scaling, scoring, window_size)[0]
        return None

    model(input_ids=input_ids, use_cache=False, logits_to_keep=1, **{HOOK_KWARG: hook})
    return [out[i] for i in range(num_layers(model))]


@dataclass
class Calibration:
    topk: int
    lengths: list[int]
    depths: list[float]
    window_size: int = DEFAULT_WINDOW_SIZE  # scoring queries of the "window" scoring
    recall: dict[str, list[float]] = field(default_factory=dict)  # scoring -> mean recall per layer
    best_layer: int = -1
    best_scoring: str = ""

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def calibrate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    haystack: str,
    lengths: list[int],
    depths: list[float],
    topk: int = 1024,
    scorings: tuple[str, ...] = SCORINGS,
    tolerance: float = 0.02,
    progress: bool = True,
    window_size: int = DEFAULT_WINDOW_SIZE,
) -> Calibration:
    """Mean needle recall of GemFilter's top-``topk`` selection at every layer, per scoring; the chosen layer.

    The scores and the selection are GemFilter's own (``gemfilter.token_scores`` and
    ``pool_and_select``, i.e. ``tokensieve.scoring``), with ``window_size`` scoring queries
    for the "window" scoring.
    """
    L = num_layers(model)
    sums = {s: torch.zeros(L) for s in scorings}
    cells = [(n, d) for n in lengths for d in depths]
    for n, d in tqdm(cells, desc="calibrate", disable=not progress):
        p = build_needle_prompt(tokenizer, haystack, n, d)
        ids = encode_prompt(tokenizer, p.messages).to(model.device)
        needle = torch.tensor(p.needle_span)
        for s in scorings:
            for layer, sc in enumerate(all_layer_scores(model, ids, s, window_size)):
                kept = pool_and_select(sc, topk).cpu()
                sums[s][layer] += torch.isin(needle, kept).float().mean()
    cal = Calibration(topk, lengths, depths, window_size)
    best = (-1.0, 0, "")
    for s in scorings:
        mean = (sums[s] / len(cells)).tolist()
        cal.recall[s] = [round(x, 4) for x in mean]
        top = max(mean)
        if top > best[0] + 1e-9:
            best = (top, 0, s)
    top, _, s = best
    cal.best_scoring = s
    cal.best_layer = next(i for i, x in enumerate(cal.recall[s]) if x >= top - tolerance)
    return cal
