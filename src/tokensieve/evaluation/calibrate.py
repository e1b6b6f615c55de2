"""Find a GemFilter filter layer and span rule for a model: needle recall of every layer's selection,
then the share of the *answer's* tokens each span rule keeps at the chosen layer.

For a few generated needle prompts, one forward pass records, at every layer,
the scores GemFilter would compute there (both scorings); the recall of a
layer is the fraction of needle tokens inside its top-k selection. The best
layer is the earliest one within ``tolerance`` of the best mean recall (an
earlier layer makes a cheaper filter pass). Scores and selection are
GemFilter's own functions (which call ``tokensieve.core.scoring``), so calibration
measures exactly what GemFilter would keep.

With ``local_windows`` the same is measured for GemFilter's local filter pass
(``filter_attention="local"``: every layer below the filter layer attends to
the first ``n_initial`` tokens and the last ``w``), one forward per window in
which every full-attention layer is local, so layer ``i``'s scores are exactly
those of a local filter pass with ``r = i``. The suggested window is the
smallest whose recall at the chosen layer is within ``tolerance`` of dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokensieve.core.attention import HOOK_KWARG
from tokensieve.core.scoring import span_topk
from tokensieve.evaluation.needle import (
    DEFAULT_EXPECTED,
    DEFAULT_NEEDLE,
    DEFAULT_QUESTION,
    build_needle_prompt,
    find_span,
)
from tokensieve.methods.base import num_layers
from tokensieve.methods.gemfilter import (
    DEFAULT_N_INITIAL,
    DEFAULT_WINDOW_SIZE,
    SCORINGS,
    GemFilter,
    pool_and_select,
    token_scores,
)

# The needles calibrate hides, taken in turn over the prompts: (needle, question, answer phrases). The second
# one's answer is a value after a key, the case where isolated top-k tokens cut the answer.
NEEDLES = (
    (DEFAULT_NEEDLE, DEFAULT_QUESTION, DEFAULT_EXPECTED),
    ("The access code of the north archive is 5183942.", "What is the access code of the north archive?", ("5183942",)),
)
# Span rules measured at the chosen layer: (kernel, pooling, dilation); the first is the paper's.
SPAN_RULES = (
    (5, "avg", 1),
    (15, "avg", 1),
    (31, "avg", 1),
    (15, "max", 1),
    (5, "avg", 15),
    (5, "avg", 31),
    (5, "avg", 63),
)


def span_label(kernel: int, pooling: str, dilation: int) -> str:
    return f"{pooling}{kernel}" + (f"_d{dilation}" if dilation > 1 else "")


from tokensieve.engine.runner import encode_prompt  # noqa: E402


@torch.inference_mode()
def all_layer_scores_by_scoring(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    scorings: tuple[str, ...],
    window_size: int = DEFAULT_WINDOW_SIZE,
    local_window: int | None = None,
    n_initial: int = DEFAULT_N_INITIAL,
) -> dict[str, list[torch.Tensor]]:
    """GemFilter's scores [n] at every layer for each scoring, from one forward (no cache).

    ``local_window``: every full-attention layer attends only to the first ``n_initial`` tokens and
    the last ``local_window`` (GemFilter's local filter pass, ``GemFilter.local_layer_attention``);
    ``None``: dense causal attention.
    """
    out: dict[str, dict[int, torch.Tensor]] = {s: {} for s in scorings}
    local = (
        None
        if local_window is None
        else GemFilter(filter_attention="local", n_initial=n_initial, n_recent=local_window)
    )

    def hook(module, query, key, value, attention_mask, **kwargs):
        for s in scorings:
            out[s][module.layer_idx] = token_scores(query, key, module.scaling, s, window_size)[0]
        return None if local is None else (local.local_layer_attention(module, query, key, value), None)

    model(input_ids=input_ids, use_cache=False, logits_to_keep=1, **{HOOK_KWARG: hook})
    return {s: [out[s][i] for i in range(num_layers(model))] for s in scorings}


def all_layer_scores(
    model: PreTrainedModel, input_ids: torch.Tensor, scoring: str, window_size: int = DEFAULT_WINDOW_SIZE
) -> list[torch.Tensor]:
    """GemFilter's scores [n] (``gemfilter.token_scores``, i.e. ``tokensieve.core.scoring``) at every layer,
    from one full forward (no cache)."""
    return all_layer_scores_by_scoring(model, input_ids, (scoring,), window_size)[scoring]


@dataclass
class Calibration:
    topk: int
    lengths: list[int]
    depths: list[float]
    window_size: int = DEFAULT_WINDOW_SIZE  # scoring queries of the "window" scoring
    recall: dict[str, list[float]] = field(default_factory=dict)  # scoring -> mean recall per layer
    best_layer: int = -1
    best_scoring: str = ""
    n_initial: int = DEFAULT_N_INITIAL  # sinks of the local filter pass
    local_windows: list[int] = field(default_factory=list)
    local_recall: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # str(w) -> scoring -> per layer
    suggested_window: int | None = None  # smallest w within tolerance of dense at (best_layer, best_scoring)
    # span rule label -> {"answer_recall": share of answer tokens kept, "answer_whole": share of prompts whose
    # whole answer was kept}, at the chosen layer and scoring, top-``topk``
    span_recall: dict[str, dict[str, float]] = field(default_factory=dict)
    suggested_span: dict[str, int | str] = field(default_factory=dict)  # kernel, pooling, dilation
    # the last layer against the chosen one (best scoring): a draft model may run all its layers. The chosen
    # layer is the last one whenever every earlier layer is more than the tolerance below the best.
    last_layer_recall: float = 0.0
    last_layer_gain: float = 0.0  # last layer's recall minus the chosen layer's (at most the tolerance)

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
    local_windows: tuple[int, ...] | list[int] = (),
    n_initial: int = DEFAULT_N_INITIAL,
) -> Calibration:
    """Mean needle recall of GemFilter's top-``topk`` selection at every layer, per scoring; the chosen layer.

    The scores and the selection are GemFilter's own (``gemfilter.token_scores`` and
    ``pool_and_select``, i.e. ``tokensieve.core.scoring``), with ``window_size`` scoring queries
    for the "window" scoring. ``local_windows``: also the recall of the local filter pass with
    each window ``w`` (and ``n_initial`` sinks); a window covering the whole prompt reuses the
    dense scores (it is the same pass).
    """
    L = num_layers(model)
    windows = [int(w) for w in local_windows]
    variants: list[int | None] = [None, *windows]
    sums = {(v, s): torch.zeros(L) for v in variants for s in scorings}
    cells = [(n, d) for n in lengths for d in depths]
    kept_scores: list[
        tuple[dict[str, list[torch.Tensor]], torch.Tensor]
    ] = []  # per prompt: dense scores, answer tokens
    for i, (n, d) in enumerate(tqdm(cells, desc="calibrate", disable=not progress)):
        text, question, expected = NEEDLES[i % len(NEEDLES)]
        p = build_needle_prompt(tokenizer, haystack, n, d, text, question)
        ids = encode_prompt(tokenizer, p.messages).to(model.device)
        needle = torch.tensor(p.needle_span)
        dense = all_layer_scores_by_scoring(model, ids, scorings, window_size)
        answer = sorted({j for e in expected for j in find_span(tokenizer, ids[0].tolist(), e)})
        kept_scores.append(({s: [x.cpu() for x in dense[s]] for s in scorings}, torch.tensor(answer)))
        for v in variants:
            by_scoring = (
                dense
                if v is None or v >= ids.shape[1]
                else all_layer_scores_by_scoring(model, ids, scorings, window_size, local_window=v, n_initial=n_initial)
            )
            for s in scorings:
                for layer, sc in enumerate(by_scoring[s]):
                    kept = pool_and_select(sc, topk).cpu()
                    sums[v, s][layer] += torch.isin(needle, kept).float().mean()
    cal = Calibration(topk, lengths, depths, window_size, n_initial=n_initial, local_windows=windows)
    sums_dense = {s: sums[None, s] for s in scorings}
    for w in windows:
        cal.local_recall[str(w)] = {s: [round(x, 4) for x in (sums[w, s] / len(cells)).tolist()] for s in scorings}
    for sc in scorings:
        cal.recall[sc] = [round(x, 4) for x in (sums_dense[sc] / len(cells)).tolist()]
    # Every scoring whose best recall is within tolerance of the best of all competes with its earliest layer
    # within tolerance of that best; the earliest such layer wins (the cheapest filter pass), ties by order.
    top = max(max(v) for v in cal.recall.values())
    s, cal.best_layer = min(
        (
            (sc, next(i for i, x in enumerate(cal.recall[sc]) if x >= top - tolerance))
            for sc in scorings
            if max(cal.recall[sc]) >= top - tolerance
        ),
        key=lambda t: t[1],
    )
    cal.best_scoring = s
    cal.last_layer_recall = cal.recall[s][-1]
    cal.last_layer_gain = round(cal.last_layer_recall - cal.recall[s][cal.best_layer], 4)
    for rule in SPAN_RULES:
        hits = [
            torch.isin(answer, span_topk(scores[s][cal.best_layer], topk, *rule)).float()
            for scores, answer in kept_scores
        ]
        cal.span_recall[span_label(*rule)] = {
            "answer_recall": round(sum(h.mean().item() for h in hits) / len(hits), 4),
            "answer_whole": round(sum(bool(h.all()) for h in hits) / len(hits), 4),
        }
    # the rule that keeps whole answers most often; then more answer tokens; then GemFilter's default rule; then the
    # narrower rule (ties by order)
    default = (GemFilter.kernel, GemFilter.pooling, GemFilter.dilation)
    best_rule = max(
        SPAN_RULES,
        key=lambda r: (
            cal.span_recall[span_label(*r)]["answer_whole"],
            cal.span_recall[span_label(*r)]["answer_recall"],
            r == default,
            -r[2],
            -r[0],
        ),
    )
    cal.suggested_span = {"kernel": best_rule[0], "pooling": best_rule[1], "dilation": best_rule[2]}
    dense_at_best = cal.recall[s][cal.best_layer]
    cal.suggested_window = next(
        (w for w in sorted(windows) if cal.local_recall[str(w)][s][cal.best_layer] >= dense_at_best - tolerance), None
    )
    return cal
