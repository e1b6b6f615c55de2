"""LazyLLM: progressive, dynamic, revivable token pruning inside the forward.

Fu et al., "LazyLLM: Dynamic Token Pruning for Efficient Long Context LLM
Inference", Apple, 2024 (arXiv:2407.14057). No official code exists; this is
written from the paper (``docs/lazyllm.md`` describes it and the measured
default schedule).

Algorithm, at every step (the prompt's prefill and each decoding step alike):

1. All tokens so far (prompt + generated) are *present* at layer 0.
2. At each pruning layer ``l``, a token's importance is the attention
   probability from the **last token** to it, averaged over heads (the
   softmax runs over the tokens present at ``l``). The top ``keep_fraction``
   of the present tokens, ``ceil(f * present)``, stay present for layers
   ``l+1 ..``; the others are not computed there in this step (neither as
   queries nor as keys). The last token is never pruned.
3. Every token keeps its original position (RoPE uses the true position).
4. The selection is made again at every step, so a token dropped while
   producing the first token can be needed later.
5. Aux cache: for every token we keep the hidden state entering the first
   layer whose KV it has not got (``depth``). When a later step needs the
   token at layer ``depth``, that layer is computed for it from the stored
   state (and again at the next layer if it is still needed), filling its KV
   on the way. A token's KV at a layer is therefore computed at most once.

The layer loop calls the model's own public modules (``embed_tokens``,
``rotary_emb``, each decoder layer, ``norm``, ``lm_head``) on the subset of
tokens computed at each layer, with a boolean mask built from original
positions; no modelling file is copied. Llama, Mistral, Qwen2/3 and Gemma 3
text models are supported (``SUPPORTED_MODEL_TYPES``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from tokensieve.core.attention import HOOK_KWARG, ensure_tokensieve_attention, sdpa
from tokensieve.core.scoring import attention_scores, head_sum, matmul_fp32, spans
from tokensieve.decode.static import CapturedStep, kv_buffers, pick_attention_kernel
from tokensieve.errors import InputError
from tokensieve.methods.base import Capabilities, DecodeState, Method, cache_kwarg, num_layers

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")

# Chosen by measurement on SmolLM2-135M-Instruct (30 layers), see docs/lazyllm.md
# and benchmarks/results/lazyllm_schedule.json: the most aggressive schedule
# tried that kept full attention's needle accuracy (74% of prompt KV computed,
# TTFT 0.71x at 2k tokens on CPU). Share of the sequence present after each
# pruning layer: 0.8, 0.64, 0.51.
# On a model of another depth the default layers scale with it (8/30, 14/30, 20/30
# of the depth), moved to the nearest full-attention layer where some use a window.
DEFAULT_PRUNE_LAYERS: tuple[int, ...] = (8, 14, 20)
DEFAULT_DEPTH = 30
DEFAULT_KEEP_FRACTIONS: tuple[float, ...] = (0.8, 0.8, 0.8)


def default_prune_layers(n_layers: int, windows: Sequence[int | None]) -> tuple[int, ...]:
    """The default schedule's layers for an ``n_layers``-deep model (see ``DEFAULT_PRUNE_LAYERS``)."""
    allowed = [i for i in range(n_layers - 1) if windows[i] is None] or list(range(n_layers - 1))
    picked = []
    for layer in DEFAULT_PRUNE_LAYERS:
        target = layer * n_layers / DEFAULT_DEPTH
        best = min(allowed, key=lambda i: (abs(i - target), i))
        if best not in picked:
            picked.append(best)
    return tuple(sorted(picked))


def keep_count(fraction: float, present: int) -> int:
    """Tokens kept out of ``present`` at a pruning layer: ``ceil(fraction * present)``, at least 1."""
    # round() first so that e.g. 0.7 * 10 = 7.000000000000001 keeps 7, not 8.
    return max(1, min(present, math.ceil(round(fraction * present, 9))))


def last_token_attention(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """LazyLLM's importance: attention probabilities of the last query over all keys, averaged over query heads.

    query: [1, q_heads, q_len, head_dim], key: [1, kv_heads, kv_len, head_dim]
    (post-RoPE, before GQA repetition); attention_mask: None or bool
    [1, 1, q_len, kv_len] (True = may attend). Returns float [kv_len].
    ``scoring.attention_scores`` of the last query (memory linear in ``kv_len``),
    summed over heads and divided by their number.
    """
    last_mask = None if attention_mask is None else attention_mask[..., -1:, :]  # [1, 1, 1, kv_len]
    probs = attention_scores(query[:, :, -1:], key, scaling, attention_mask=last_mask)  # [1, kv_heads, kv_len]
    return head_sum(probs)[0] / query.shape[1]


class LazyModules:
    """The public modules of a supported decoder-only model, and per-layer facts the loop needs."""

    def __init__(self, model: PreTrainedModel):
        cfg = model.config.get_text_config()
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise InputError(
                f"LazyLLM does not support model type {cfg.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        body = getattr(model, "model", None)
        missing = [a for a in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(body, a)]
        if missing or not hasattr(model, "lm_head"):
            raise InputError(
                f"LazyLLM needs model.model.{{embed_tokens, layers, norm, rotary_emb}} and model.lm_head; "
                f"{type(model).__name__} lacks {missing or ['lm_head']}"
            )
        ensure_tokensieve_attention(model)  # its layer loop calls the attention hooks
        self.embed, self.layers, self.norm, self.rotary, self.lm_head = (
            body.embed_tokens,
            body.layers,
            body.norm,
            body.rotary_emb,
            model.lm_head,
        )
        self.num_layers = len(self.layers)
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        layer_types = getattr(cfg, "layer_types", None)
        # Gemma 3 keeps one rotary table per layer type (local/global base frequency).
        self.rotary_by_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self.layer_types: list[str | None] = list(layer_types) if layer_types else [None] * self.num_layers
        window = getattr(cfg, "sliding_window", None)
        self.windows: list[int | None] = [
            (window if t == "sliding_attention" else None) if layer_types else window for t in self.layer_types
        ]

    def rotary_embeddings(
        self, hidden: torch.Tensor, pos: torch.Tensor, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rotary_by_type:
            return self.rotary(hidden, pos, self.layer_types[layer])
        return self.rotary(hidden, pos)


@dataclass(kw_only=True)
class LazyState(DecodeState):
    """Decode state of LazyLLM. Token ``j`` is the token at original position ``j``."""

    decoder: LazyModules
    prompt_len: int
    depth: torch.Tensor  # [N] long: this token's KV exists at layers 0 .. depth-1
    aux: torch.Tensor  # [N, hidden]: hidden state entering layer depth[j] (the aux cache where depth < L)
    kv_tokens: list[torch.Tensor]  # per layer, [entries] long: the token of each KV cache entry, in cache order
    # The same on the host, so that choosing the attention mask never waits for the device.
    kv_tokens_host: list[np.ndarray]
    revived: torch.Tensor  # [N] bool: computed from the aux cache in a later step at least once
    revived_computations: int = 0  # (token, layer) KV entries computed from the aux cache
    present: list[torch.Tensor] = field(default_factory=list)  # last step: [tokens] present at each layer
    computed: list[torch.Tensor] = field(default_factory=list)  # last step: [tokens] computed at each layer


@dataclass
class LazyLLM(Method):
    """LazyLLM (Fu et al., 2024): progressive token pruning, re-selected at every step, with an aux cache.

    Parameters:
        prune_layers: 0-based layers, strictly increasing, each in ``[0, L-2]``
            (``None``: the default schedule scaled to the model's depth),
            whose last-token attention scores the present tokens; the pruning
            takes effect from the next layer on. Must be full-attention layers
            (on Gemma 3: not a sliding-window layer). Accepts "8,14,20".
        keep_fractions: one per pruning layer, each in ``(0, 1]``: the fraction
            of the tokens *present at that layer* that stay (``ceil(f * present)``);
            the fraction of all tokens left after pruning layer ``i`` is the
            product of the first ``i + 1`` fractions. 1.0 everywhere is full attention.
    """

    name: ClassVar[str] = "lazyllm"
    capabilities: ClassVar[Capabilities] = Capabilities(static_decode="own")
    prune_layers: Sequence[int] | None = None
    keep_fractions: Sequence[float] = DEFAULT_KEEP_FRACTIONS

    def __post_init__(self) -> None:
        self.keep_fractions = _as_tuple(self.keep_fractions, float, "keep_fractions")
        for f in self.keep_fractions:
            if not 0.0 < f <= 1.0:
                raise InputError(f"keep_fractions must each be in (0, 1], got {f} in {list(self.keep_fractions)}")
        if self.prune_layers is None:
            if len(self.keep_fractions) != len(DEFAULT_PRUNE_LAYERS):
                raise InputError(
                    f"with the default prune_layers, give {len(DEFAULT_PRUNE_LAYERS)} keep_fractions, got {list(self.keep_fractions)}"
                )
            return
        self.prune_layers = _as_tuple(self.prune_layers, int, "prune_layers")
        if len(self.prune_layers) != len(self.keep_fractions):
            raise InputError(
                f"prune_layers and keep_fractions must have the same length, got {len(self.prune_layers)} "
                f"layers {list(self.prune_layers)} and {len(self.keep_fractions)} fractions {list(self.keep_fractions)}"
            )
        if any(b <= a for a, b in zip(self.prune_layers, self.prune_layers[1:])):
            raise InputError(f"prune_layers must be strictly increasing, got {list(self.prune_layers)}")

    def schedule(self, dec: LazyModules) -> dict[int, float]:
        """{pruning layer: keep fraction} for this model."""
        if self.prune_layers is None:
            layers = default_prune_layers(dec.num_layers, dec.windows)
            return dict(zip(layers, self.keep_fractions))
        return dict(zip(self.prune_layers, self.keep_fractions))

    def validate(self, model: PreTrainedModel, prompt_len: int) -> None:
        n_layers = num_layers(model)
        if self.prune_layers is None:
            return
        for layer in self.prune_layers:
            if not 0 <= layer <= n_layers - 2:
                raise InputError(
                    f"prune_layers must each be in [0, {n_layers - 2}] for this {n_layers}-layer model "
                    f"(pruning after the last layer would do nothing), got {layer} in {list(self.prune_layers)}"
                )
        dec = LazyModules(model)
        for layer in self.prune_layers:
            if dec.windows[layer] is not None:
                full = [i for i, w in enumerate(dec.windows[:-1]) if w is None]
                raise InputError(
                    f"prune layer {layer} is a sliding-window layer (window {dec.windows[layer]}): its last-token "
                    f"attention cannot see older tokens; choose full-attention layers, here {full}"
                )

    def select(self, layer: int, scores: torch.Tensor, candidates: torch.Tensor, keep: int) -> torch.Tensor:
        """Tokens that stay after pruning layer ``layer``.

        scores: [N] importance of every token (only ``candidates`` are read);
        candidates: [c] sorted present tokens, the last token last; keep: how many stay.
        Returns [keep] token indices, sorted.
        """
        s = scores[candidates].clone()
        s[-1] = float("inf")  # the last token is never pruned
        return torch.sort(candidates[torch.topk(s, keep).indices]).values

    @torch.inference_mode()
    def prefill(self, model: PreTrainedModel, input_ids: torch.Tensor) -> LazyState:
        if input_ids.shape[0] != 1:
            raise InputError(f"LazyLLM runs one prompt at a time, got batch size {input_ids.shape[0]}")
        n = input_ids.shape[1]
        self.validate(model, n)
        dec = LazyModules(model)
        dev, hidden = input_ids.device, dec.embed.embedding_dim
        st = LazyState(
            logits=torch.empty(0),
            cache=DynamicCache(),  # no config: plain growing layers (no sliding-window truncation)
            next_position=0,
            decoder=dec,
            prompt_len=n,
            depth=torch.zeros(0, dtype=torch.long, device=dev),
            aux=torch.zeros(0, hidden, dtype=dec.embed.weight.dtype, device=dev),
            kv_tokens=[torch.zeros(0, dtype=torch.long, device=dev) for _ in range(dec.num_layers)],
            kv_tokens_host=[np.zeros(0, dtype=np.int64) for _ in range(dec.num_layers)],
            revived=torch.zeros(0, dtype=torch.bool, device=dev),
        )
        self._step(st, input_ids)
        present_last = st.present[-1]
        st.kept_indices = present_last[present_last < n]  # prompt tokens present at the last layer
        st.details.update(
            prune_layers=list(self.schedule(dec)),
            keep_fractions=list(self.schedule(dec).values()),
            kept_tokens=int(st.kept_indices.numel()),
            tokens_per_layer_first_token=[int(p.numel()) for p in st.present],
            prompt_computed_pct_first_token=self.prompt_computed_pct(st),
        )
        self._update_details(st)
        return st

    @torch.inference_mode()
    def static_decoder(self, pool: Any, state: DecodeState, max_new_tokens: int) -> tuple[Any, bool]:
        """A slot per token (the prompt and the answer): the pool's ``LazyDecoder`` for the pruned layers."""
        prune = tuple(state.details["prune_layers"])
        return pool.get_own(
            ("lazyllm", prune),
            state.next_position + max_new_tokens,
            lambda capacity: LazyDecoder(
                pool.model, capacity, prune, pool.use_graph, pool.speculate, pool.attention_kernel, pool.compile
            ),
        )

    def load_static(self, decoder: Any, state: DecodeState, max_new_tokens: int) -> None:
        decoder.load(state, max_new_tokens, tuple(state.details["keep_fractions"]))

    def step(self, model: PreTrainedModel, state: DecodeState, token_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(state, LazyState):
            raise ValueError(f"LazyLLM.step needs the state its prefill returned, got {type(state).__name__}")
        self._step(state, token_ids)
        self._update_details(state)
        return state.logits

    @staticmethod
    def prompt_computed_pct(st: LazyState) -> float:
        """100 x (prompt (token, layer) KV entries computed so far) / (L x n)."""
        n, n_layers = st.prompt_len, st.decoder.num_layers
        return 100.0 * float(st.depth[:n].sum()) / (n_layers * n)

    def _update_details(self, st: LazyState) -> None:
        st.details.update(
            prompt_computed_pct_total=self.prompt_computed_pct(st),
            revived_tokens=int(st.revived.sum()),
            revived_kv_computations=st.revived_computations,
        )

    def _step(self, st: LazyState, new_ids: torch.Tensor) -> None:
        """Feed ``new_ids`` [1, q] at positions ``next_position ..``; set ``st.logits`` [1, vocab]."""
        dec = st.decoder
        start, q = st.next_position, new_ids.shape[1]
        total = start + q
        dev = new_ids.device
        st.aux = torch.cat([st.aux, dec.embed(new_ids)[0]])  # new tokens enter layer 0 with their embeddings
        st.depth = torch.cat([st.depth, torch.zeros(q, dtype=torch.long, device=dev)])
        st.revived = torch.cat([st.revived, torch.zeros(q, dtype=torch.bool, device=dev)])
        present = torch.ones(total, dtype=torch.bool, device=dev)  # [N]
        candidates = torch.arange(total, device=dev)  # [c] present tokens, sorted; the last token is last
        prune_at = self.schedule(dec)
        scores: list[torch.Tensor] = []

        def hook(module, query, key, value, attention_mask, **kwargs):
            scores.append(last_token_attention(query, key, attention_mask, module.scaling))
            return None  # attention itself runs as usual

        st.present, st.computed = [], []
        segment: _Segment | None = None
        for layer_idx, layer in enumerate(dec.layers):
            if segment is None:  # first layer after a prune: one host read plans the layers up to the next
                segment = _Segment(candidates, st.depth[candidates], total)
            # Every present token has KV at layers < layer_idx; those without it here are computed now:
            # the new tokens, and tokens revived from the aux cache.
            todo, todo_host = segment.computed(layer_idx)  # [t] sorted, on the device and on the host
            old = int((todo_host < start).sum())
            if old:
                st.revived[todo] |= todo < start
                st.revived_computations += old
            st.kv_tokens[layer_idx] = torch.cat([st.kv_tokens[layer_idx], todo])
            st.kv_tokens_host[layer_idx] = np.concatenate([st.kv_tokens_host[layer_idx], todo_host])
            hidden = st.aux[todo][None]  # [1, t, hidden]
            pos = todo[None]  # [1, t]: original positions
            window = dec.windows[layer_idx]
            causal = _plain_causal(todo_host, st.kv_tokens_host[layer_idx], segment.present, window)
            mask = None if causal else _attention_mask(todo, st.kv_tokens[layer_idx], present, window)
            kwargs: dict[str, Any] = {HOOK_KWARG: hook} if layer_idx in prune_at else {}
            out = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=dec.rotary_embeddings(hidden, pos, layer_idx),
                position_ids=pos,
                **cache_kwarg(layer, st.cache),
                use_cache=True,
                **kwargs,
            )
            out = out[0] if isinstance(out, tuple) else out
            st.aux[todo] = out[0]
            st.depth[todo] = layer_idx + 1
            st.present.append(candidates)
            st.computed.append(todo)
            if layer_idx in prune_at:
                if not scores:
                    raise RuntimeError(f"layer {layer_idx} never called tokensieve attention; is the model using it?")
                token_scores = torch.zeros(total, device=dev)  # [N]
                token_scores[st.kv_tokens[layer_idx]] = scores.pop()
                candidates = self.select(
                    layer_idx, token_scores, candidates, keep_count(prune_at[layer_idx], candidates.numel())
                )
                present = torch.zeros_like(present)
                present[candidates] = True
                segment = None
        last = dec.norm(st.aux[total - 1][None, None])  # [1, 1, hidden]
        logits = dec.lm_head(last)[:, -1].float()  # [1, vocab]
        if dec.softcap is not None:
            logits = torch.tanh(logits / dec.softcap) * dec.softcap
        st.logits = logits
        st.next_position = total


class _Segment:
    """The layers of one step from a pruning layer's successor to the next pruning layer, planned from one host read.

    Within a segment the present set does not change, and a present token whose depth was ``d`` at the
    segment's first layer is computed at every layer ``l >= d`` of it (each computed layer raises its
    depth by one, and it stays present). So the tokens computed at layer ``l`` are the candidates whose
    starting depth is ``<= l``: known on the host for every layer of the segment after reading the
    candidates and their depths once, instead of one boolean-mask read per layer (each of which waits
    for the GPU queue to drain).
    """

    def __init__(self, candidates: torch.Tensor, depth: torch.Tensor, total: int):
        host = torch.stack([candidates, depth]).cpu().numpy()  # [2, c]: the segment's one host read
        self.candidates_host, self.depth_host = host[0], host[1]
        self.candidates = candidates
        self.order = torch.argsort(depth, stable=True)  # [c] on the device: candidates by starting depth
        self.present = np.zeros(total, dtype=bool)  # [N] host copy of this segment's present set
        self.present[self.candidates_host] = True

    def computed(self, layer: int) -> tuple[torch.Tensor, np.ndarray]:
        """The tokens computed at ``layer``, sorted: [t] on the device (built without a host read) and on the host."""
        host = self.candidates_host[self.depth_host <= layer]
        if host.size == self.candidates_host.size:
            return self.candidates, host
        # The host knows how many there are (t); the first t by starting depth are those tokens.
        return torch.sort(self.candidates[self.order[: host.size]]).values, host


def _plain_causal(q_tok: np.ndarray, kv_tok: np.ndarray, present: np.ndarray, window: int | None) -> bool:
    """Whether plain causal attention is ``_attention_mask``'s mask, decided on host copies of its inputs.

    True when every cache entry's token is present, the window (if any) reaches back to the oldest
    entry, and the queries are one token or exactly the cache's tokens (prefill without gaps).
    """
    if not present[kv_tok].all() or (window is not None and not int(q_tok[-1] - kv_tok.min()) < window):
        return False
    return q_tok.size == 1 or np.array_equal(q_tok, kv_tok)  # q_tok is sorted, so kv_tok is too


def _attention_mask(
    q_tok: torch.Tensor, kv_tok: torch.Tensor, present: torch.Tensor, window: int | None
) -> torch.Tensor:
    """Bool [1, 1, t, m] mask (True = attend) for queries ``q_tok`` [t] over cache entries ``kv_tok`` [m].

    A query attends to a cache entry when its token is present in this step,
    not later than the query (original positions) and, on sliding-window
    layers, less than ``window`` positions back. Built on the device without
    reading anything back; where ``_plain_causal`` holds the caller passes no
    mask instead, so SDPA's fused causal kernel runs as for full attention.
    """
    allowed = (kv_tok[None, :] <= q_tok[:, None]) & present[kv_tok][None, :]  # [t, m]
    if window is not None:
        allowed &= q_tok[:, None] - kv_tok[None, :] < window
    return allowed[None, None]


def _as_tuple(value: Any, kind: type, name: str) -> tuple:
    """``"8,14"``, ``[8, 14]`` or ``8`` -> ``(8, 14)`` / ``(8,)`` of ``kind``."""
    if isinstance(value, str):
        value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    out = []
    for v in value:
        try:
            x = kind(v)
        except (TypeError, ValueError):
            raise InputError(f"{name} must be a list of {kind.__name__}s, got {value!r}") from None
        if kind is int and isinstance(v, float) and v != x:
            raise InputError(f"{name} must be a list of ints, got {value!r}")
        out.append(x)
    return tuple(out)


# ----------------------------------------------------------------------------- the static decoder
# LazyLLM's own decoder on static KV buffers (``capabilities.static_decode == "own"``), built on
# ``decode.static.CapturedStep`` and kept by ``DecoderPool.get_own``.

# LazyLLM's host-planned step attends in chunks of this many rows (its mask is [rows, capacity]).
ROW_CHUNK = 1024


@dataclass
class LazyDecoder(CapturedStep):
    """LazyLLM's decoding step on KV buffers we own, captured as a CUDA graph where the step allows it.

    Every token has a slot (slot ``j`` = position ``j``) in every layer's buffer ``[1, kv_heads, capacity,
    head_dim]``; ``depth[j]`` says at how many layers its KV exists (``LazyState.depth``), ``aux[j]`` is the
    hidden state entering layer ``depth[j]`` (the aux cache). A step is LazyLLM's (``LazyLLM._step``): all
    tokens are present at layer 0; at each pruning layer the last token's attention, averaged over heads,
    keeps the top ``ceil(f * present)`` present tokens for the layers after it (the new token always stays);
    a present token without KV at a layer is computed there from the aux cache (revived).

    The step's shape depends on how many tokens come back from the aux cache, which the device decides.
    So a step first runs on the fixed shape of the common case, where the new token is the only one
    computed at every layer: top-k by ranks against keep counts the host computes (they follow from the
    position alone), masks from ``depth`` and the present set, nothing read back; on CUDA that step is the
    captured graph. It also records on the device whether some present token lacked its KV at a layer;
    then (one read per step, with the token's) the step runs again on the host-planned path, which computes
    the revived tokens with the new one (``exact``), from the same state: the fixed-shape run changed only
    the new token's slot, which the second run rewrites. On the CPU (``speculate=False``) every step takes
    the host-planned path directly. Both give the eager path's tokens (tests).

    A layer that computes the new token alone and is not a pruning layer attends with the split-KV kernel where
    ``attention_kernel`` resolves to "triton" (the present set as its visible slots); ``compile=True`` fuses the
    fixed-shape step with ``torch.compile`` before it is captured.
    """

    model: PreTrainedModel
    capacity: int
    prune_layers: tuple[int, ...]
    use_graph: bool | None = None  # None: on CUDA only
    speculate: bool | None = None  # None: on CUDA only (see the class docstring)
    attention_kernel: str = "auto"  # one-token layers' attention (see pick_attention_kernel); pruning layers: torch
    compile: bool = False  # fuse the fixed-shape step with torch.compile before capturing it
    capture_s: float = field(init=False, default=0.0)
    logits: torch.Tensor | None = field(init=False, default=None)
    steps_left: int = field(init=False, default=0)
    replays: int = field(init=False, default=0)  # steps the fixed-shape run answered
    reruns: int = field(init=False, default=0)  # steps that ran again on the host-planned path (revivals)
    _graph: Any = field(init=False, default=None)
    kernel: str = field(init=False, default="torch")  # attention_kernel resolved: "torch" or "triton"

    def __post_init__(self) -> None:
        self.dec = LazyModules(self.model)  # LazyLLM's view of the model (its public modules)
        dev, cap = self.model.device, self.capacity
        self.keys, self.values = kv_buffers(self.model, 1, cap)  # slot j: the token at position j
        self.depth = torch.zeros(cap, dtype=torch.long, device=dev)  # [cap]
        self.aux = torch.zeros(cap, self.dec.embed.embedding_dim, dtype=self.dec.embed.weight.dtype, device=dev)
        self.revived = torch.zeros(cap, dtype=torch.bool, device=dev)
        self.present = torch.zeros(cap, dtype=torch.bool, device=dev)  # the present set at the current layer
        self.position = torch.zeros(1, dtype=torch.long, device=dev)  # the new token's position (= its slot)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.keeps = torch.ones(max(1, len(self.prune_layers)), dtype=torch.long, device=dev)  # this step's keep counts
        self.lacking = torch.zeros((), dtype=torch.bool, device=dev)  # a present token lacked its KV (fixed-shape run)
        self._slots = torch.arange(cap, device=dev)
        self._rows = self.position  # the tokens computed at the current layer, [t]
        self._scores: torch.Tensor | None = None  # [cap]: the last pruning layer's importance
        self._prune_index = {layer: i for i, layer in enumerate(self.prune_layers)}
        if self.use_graph is None:
            self.use_graph = dev.type == "cuda"
        if self.speculate is None:
            self.speculate = dev.type == "cuda"
        if self.use_graph and not self.speculate:
            raise ValueError("a captured LazyLLM step needs speculate=True (the host-planned step reads the device)")
        self.kernel, self._decode_attention = pick_attention_kernel(self.attention_kernel, dev)
        self._valid = self.present[None]  # [1, cap], a view: the present set as the kernel's visible slots
        fixed = lambda: self._run(False)  # noqa: E731 - the fixed-shape step
        self._fixed = torch.compile(fixed, dynamic=False) if self.compile else fixed

    def load(self, state: Any, max_new_tokens: int, fractions: tuple[float, ...]) -> None:
        """Copy a LazyLLM prefill's state (``LazyState``: its cache entries, depths, aux cache) into the slots."""
        n = state.next_position
        if n + max_new_tokens > self.capacity:
            raise ValueError(f"{n} tokens + {max_new_tokens} new exceed capacity {self.capacity}")
        if len(fractions) != len(self.prune_layers):
            raise ValueError(f"{len(fractions)} keep fractions for {len(self.prune_layers)} pruning layers")
        for i, layer in enumerate(state.cache.layers):
            tokens = state.kv_tokens[i]  # the token of each entry, in cache order
            self.keys[i].index_copy_(2, tokens, layer.keys)
            self.values[i].index_copy_(2, tokens, layer.values)
        self.depth.zero_()
        self.depth[:n].copy_(state.depth)
        self.aux[:n].copy_(state.aux)
        self.revived.zero_()
        self.revived[:n].copy_(state.revived)
        self.position.fill_(n)
        self.fractions = tuple(fractions)
        self.prompt_len, self.next_host, self.revived_computations = state.prompt_len, n, state.revived_computations
        self.replays = self.reruns = 0
        self.steps_left = max_new_tokens

    def _attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """One layer's attention for the rows computed here: store their keys/values in their slots, attend over the
        present tokens at or before each row. query [1, q_heads, t, d]; key/value [1, kv_heads, t, d]."""
        li = module.layer_idx
        rows, keys, values = self._rows, self.keys[li], self.values[li]
        keys.index_copy_(2, rows, key)
        values.index_copy_(2, rows, value)
        _, hq, t, d = query.shape
        scaling = kwargs.get("scaling", module.scaling)
        prune = li in self._prune_index
        if t == 1 and not prune and self.kernel == "triton":  # one pass over the present slots up to the token
            hkv = keys.shape[1]
            out = self._decode_attention(
                query.reshape(1, hkv, hq // hkv, d), keys, values, rows + 1, self._valid, scaling
            )
            return out.view(1, hq, 1, d).transpose(1, 2), None
        allowed = self.present[None, :] & (self._slots[None, :] <= rows[:, None])  # [t, cap]
        if t == 1:  # the fixed-shape step: one query, the probabilities at hand
            probs32 = self._probs(query, keys, allowed, scaling)  # [hkv, g, cap]
            out = torch.bmm(probs32.to(values.dtype), values[0]).view(1, hq, 1, d).transpose(1, 2)  # [1, 1, hq, d]
        else:  # revived rows too (host-planned): SDPA as on the eager path, rows in chunks (the mask is [rows, cap])
            out = torch.cat(
                [
                    sdpa(module, query[:, :, a:b], keys, values, allowed[None, None, a:b], scaling=scaling)[0]
                    for a, b in spans(t, ROW_CHUNK)
                ],
                dim=1,
            )
            probs32 = self._probs(query[:, :, -1:], keys, allowed[-1:], scaling) if prune else None
        if prune:  # LazyLLM's importance: the new token's attention, mean over the query heads
            self._scores = probs32.sum((0, 1)) / hq
        return out, None

    @staticmethod
    def _probs(query: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention probabilities (float32, [kv_heads, group, cap]) of one query row [1, q_heads, 1, d] over the slots
        ``allowed`` [1, cap]; grouped heads by a reshape, the keys read once."""
        hkv = keys.shape[1]
        q = query.reshape(hkv, query.shape[1] // hkv, query.shape[-1])
        scores = matmul_fp32(q, keys[0].transpose(1, 2)) * scaling  # [hkv, g, cap]
        return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)

    def _select(self, i: int) -> None:
        """The top ``keeps[i]`` present tokens by importance stay present (the new token always), on the device."""
        s = self._scores.masked_fill(~self.present, float("-inf")).index_fill(0, self.position, float("inf"))
        order = torch.argsort(s, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(0, order, self._slots)
        self.present.copy_(rank < self.keeps[i])

    def _run(self, exact: bool) -> torch.Tensor:
        """One step for ``self.token``; ``exact``: compute every present token lacking KV (host-planned rows),
        else the new token only, recording in ``lacking`` whether that was not enough."""
        pos, dec = self.position, self.dec
        self.present.copy_(self._slots <= pos)
        self.depth.index_fill_(0, pos, 0)
        self.aux.index_copy_(0, pos, dec.embed(self.token)[0])
        self.lacking.zero_()
        for li, layer in enumerate(dec.layers):
            todo = self.present & (self.depth <= li)  # present here, without KV here: computed now
            if exact:
                rows = todo.nonzero()[:, 0]  # reads the device: the host-planned path
                old = rows[:-1]  # the new token is the last row; the others come back from the aux cache
                if old.numel():
                    self.revived[old] = True
                    self.revived_computations += old.numel()
            else:
                rows = pos
                self.lacking.logical_or_((todo & (self._slots != pos)).any())
            self._rows = rows
            hidden = self.aux.index_select(0, rows)[None]  # [1, t, hidden]
            pos_ids = rows[None]
            out = layer(
                hidden,
                attention_mask=None,
                position_embeddings=dec.rotary_embeddings(hidden, pos_ids, li),
                position_ids=pos_ids,
                use_cache=False,
                **{HOOK_KWARG: self._attend},
            )
            out = out[0] if isinstance(out, tuple) else out
            self.aux.index_copy_(0, rows, out[0])
            self.depth.index_fill_(0, rows, li + 1)
            if li in self._prune_index:
                self._select(self._prune_index[li])
        logits = dec.lm_head(dec.norm(self.aux.index_select(0, pos)[None]))[:, -1].float()  # [1, vocab]
        if dec.softcap is not None:
            logits = torch.tanh(logits / dec.softcap) * dec.softcap
        self.position.add_(1)
        return logits

    def capture(self) -> None:
        """Record the fixed-shape step as a CUDA graph (on zeroed state; ``load`` sets the real one)."""
        self._capture(self._fixed, [self.position, self.depth])

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed ``token`` [1, 1]; return the next logits [1, vocab]."""
        self._feed(token)
        present, keeps = self.next_host + 1, []
        for f in self.fractions:  # the keep counts follow from the number of tokens alone
            present = keep_count(f, present)
            keeps.append(present)
        if keeps:
            self.keeps.copy_(torch.tensor(keeps, dtype=torch.long))
        self.next_host += 1
        if self.speculate:
            logits = self._replay_or_run(self._fixed)
            if not bool(self.lacking):  # one read per step (the token is read anyway)
                self.replays += 1
                return logits
            self.reruns += 1
            self.position.sub_(1)
        return self._run(True)

    def entries(self) -> list[int]:
        """KV entries computed per layer (reads the device)."""
        n = self.next_host
        layers = torch.arange(self.dec.num_layers, device=self.depth.device)
        return (self.depth[None, :n] > layers[:, None]).sum(1).tolist()

    def details(self) -> dict[str, Any]:
        """LazyLLM's counters after decoding (as ``LazyLLM`` reports them on the eager path), and the reruns."""
        n, n_layers = self.prompt_len, self.dec.num_layers
        return {
            "prompt_computed_pct_total": 100.0 * float(self.depth[:n].sum()) / (n_layers * n),
            "revived_tokens": int(self.revived.sum()),
            "revived_kv_computations": self.revived_computations,
            "decode_fixed_shape_steps": self.replays,
            "decode_revival_reruns": self.reruns,
        }
