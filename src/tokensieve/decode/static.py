"""Decoding at the hardware's pace: KV buffers we own, updated in place, and one step captured as a CUDA graph.

After a method's prefill, the KV entries it kept (all of them for full attention, ``k`` for GemFilter's
second pass, ``budget`` for SnapKV) are copied once into preallocated buffers
``[batch, kv_heads, capacity, head_dim]`` per layer, sized to the kept entries plus the tokens still to
generate. Each decoding step then

1. runs the model's own modules on one token (``use_cache=False``: no ``transformers`` cache is involved,
   so no cache API can change under us between releases),
2. in every layer's attention (tokensieve's hook), writes the new key and value into the next free slot
   (``index_copy_`` at a device-side index) and attends over the buffer with a mask of the filled slots,
   grouped-query heads handled by a reshape (the keys and values are read once, never repeated); on CUDA by
   default a split-KV Triton kernel (``decode_kernel``) that reads only the slots in use, in one pass,
3. advances the per-layer fill counts and the position on the device.

Nothing in a step reads a value back to the host, so on CUDA the whole step is captured once as a
``torch.cuda.CUDAGraph`` and replayed: one launch per token instead of hundreds, and the step reads the
weights plus the kept KV entries and nothing else. On the CPU the same code runs without a graph.

The capture is paid once per decoder (a model, a batch size and a capacity); ``DecoderPool`` keeps
decoders by capacity bucket so later prompts of a similar size reuse the captured graph. Its cost is
reported separately (``capture_s``), never as decode time.

Batches: rows are left-padded; ``valid`` [batch, capacity] marks each row's real slots (a pad slot is
never attended to) and ``position`` holds each row's own next position, so one captured step serves
rows of different lengths.

Eviction on the device. The decoder is generic over a *slot policy* (``decode.slots``): a method that evicts
while decoding returns one (``Method.slot_policy()``, a ``SlotPolicy`` whose ``state_type`` holds the per-slot
state on the device and the step's rule). The decoder asks the state where the new entry goes, which slots the
token attends to, and gives it the attention afterwards so it picks the slot the next step overwrites. A bounded
policy's buffer holds ``budget + 1`` entries: exactly what the eager cache holds before it evicts. The policies
live next to their eager rules (``methods/streamingllm.py``, ``methods/h2o.py``, ``methods/sepllm.py``). No step
reads back to the host, so the evicting step is captured like the growing one.

A method that decodes in a way of its own brings its own decoder on :class:`CapturedStep` (e.g.
``methods.lazyllm.LazyDecoder``); ``DecoderPool.get_own`` keeps it.

This module knows no method: a method's ``capabilities.static_decode`` says whether its cache grows, evicts
(``slot_policy()``) or decodes on its own decoder, and the driver asks (``engine.runner.supports_static``).
Models whose layers all use full attention (Llama, Mistral, Qwen2/3, Phi-3 class) decode here;
sliding-window models and left-padded batches of the evicting methods decode on the eager path
(``model_refusal``).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Cache, PreTrainedModel

from tokensieve.core.attention import HOOK_KWARG
from tokensieve.core.hf import has_sliding_layers
from tokensieve.core.scoring import matmul_fp32
from tokensieve.decode.slots import (  # noqa: F401  (re-exported: the driver sizes decoders with them)
    SlotPolicy,
    SlotState,
    decoder_size,
    slot_state_for,
    without_needless_eviction,
)
from tokensieve.errors import InputError

log = logging.getLogger(__name__)

# Capacity buckets: kept entries + new tokens, rounded up to a multiple of this, so that the masked
# tail the step reads is small (at most BUCKET - 1 entries) and prompts of similar size share a graph.
BUCKET = 256


def __getattr__(name: str) -> Any:  # names that moved out of this module, served for one release
    from tokensieve._moved import moved_name

    return moved_name(__name__, name)


def bucket(entries: int) -> int:
    return -(-entries // BUCKET) * BUCKET


def model_refusal(model: PreTrainedModel, cache: Cache | None) -> str | None:
    """``None`` when this model and prefill cache can decode on the static path, else the reason it cannot
    (what a method can do is the driver's question: ``engine.runner.supports_static``)."""
    cfg = model.config.get_text_config()
    if has_sliding_layers(model):
        return "the model has sliding-window layers (eager path)"
    if getattr(cfg, "attn_logit_softcapping", None):
        return "the model soft-caps attention logits (eager path)"
    if cache is None or not getattr(cache, "layers", None):
        return "the prefill left no KV cache"
    return None


ATTENTION_KERNELS = ("auto", "torch", "triton")


def capture_graph(run: Any, state: list[torch.Tensor]) -> tuple[Any, torch.Tensor, float]:
    """Record ``run()`` as a CUDA graph: three warm-up runs on a side stream (the first compiles, when compiling),
    then the capture; the ``state`` tensors the runs advance are restored after each. Returns the graph, the
    output tensor the graph writes at each replay, and the seconds it all took (reported as ``capture_s``)."""
    t0 = time.perf_counter()
    saved = [t.clone() for t in state]

    def restore() -> None:
        for t, v in zip(state, saved):
            t.copy_(v)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    restore()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph), torch.inference_mode():
            out = run()
    finally:
        restore()  # capture does not run kernels, but be exact about the state (also when it failed)
    torch.cuda.synchronize()
    return graph, out, time.perf_counter() - t0


def kv_buffers(model: PreTrainedModel, batch: int, capacity: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, zeroed key and value buffers ``[batch, kv_heads, capacity, head_dim]`` in the model's dtype and device
    (zeros, not empty: a masked slot gets probability 0, and 0 * value must stay 0, never NaN)."""
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    keys = [
        torch.zeros(batch, cfg.num_key_value_heads, capacity, head_dim, dtype=dtype, device=model.device)
        for _ in range(cfg.num_hidden_layers)
    ]
    return keys, [torch.zeros_like(k) for k in keys]


def pick_attention_kernel(choice: str, dev: torch.device, why_not: str | None = None) -> tuple[str, Any]:
    """A step's attention path and its function: ``("triton", decode_kernel.decode_attention_triton)`` (one pass
    over the visible slots) or ``("torch", None)``.

    ``choice``: "auto" takes Triton on CUDA when it imported and ``why_not`` is None (``why_not``: why this step
    needs the torch path, e.g. H2O's eviction reads the probabilities themselves); "triton" insists (``InputError``
    where it cannot run); "torch" never takes it. Under ``compile`` the kernel is a torch op traced into the graph.
    """
    if choice not in ATTENTION_KERNELS:
        raise InputError(f"attention_kernel must be one of {ATTENTION_KERNELS}, got {choice!r}")
    if choice == "torch" or (choice == "auto" and dev.type != "cuda"):
        return "torch", None
    from tokensieve.kernels import decode_kernel  # optional Triton, imported only when the kernel may be used

    why = "Triton is not installed" if not decode_kernel.available() else why_not
    if choice == "triton" and why is not None:
        raise InputError(f"attention_kernel='triton' cannot be used here: {why}")
    if choice == "triton" or why is None:
        return "triton", decode_kernel.decode_attention_triton
    return "torch", None


class CapturedStep:
    """What both decoders do around their step function: capture it once, count the steps left, feed the token,
    replay the graph (or run the function where there is none). Needs ``use_graph``, ``capacity``, ``steps_left``,
    ``token``, ``logits``, ``capture_s`` and ``_graph`` on the decoder."""

    def _capture(self, run: Any, state: list[torch.Tensor]) -> None:
        """Capture ``run`` once. A capture the CUDA driver invalidates is tried once more (what the first attempt
        loaded, e.g. a kernel's module, is then in place); if that fails too, this decoder runs its step without
        a graph from then on, with a warning: the tokens are the same, only slower."""
        if not self.use_graph or self._graph is not None:
            return
        for attempt in (1, 2):
            try:
                self._graph, self.logits, self.capture_s = capture_graph(run, state)
                return
            except RuntimeError as err:  # torch.AcceleratorError and Triton's launch errors are RuntimeErrors
                first_line = (str(err).splitlines() or [type(err).__name__])[0]
                if attempt == 2:
                    warnings.warn(
                        f"CUDA graph capture failed twice ({first_line}); this decoder (capacity "
                        f"{self.capacity}) runs its step without a graph",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    self.use_graph = False
                    return
                log.warning("CUDA graph capture failed (%s); trying once more", first_line)

    def _feed(self, token: torch.Tensor) -> None:
        if self.steps_left <= 0:
            raise RuntimeError(f"the decoder's capacity ({self.capacity}) is used up")
        self.steps_left -= 1
        self.token.copy_(token)

    def _replay_or_run(self, run: Any) -> torch.Tensor:
        if self._graph is not None:
            self._graph.replay()
            return self.logits
        return run()


@dataclass
class StaticDecoder(CapturedStep):
    """Preallocated KV buffers for one model, batch size and capacity, and the captured decoding step.

    ``slots``: the slot state type (``decode.slots.SlotState``: growth; an evicting method's policy names its own,
    ``SlotPolicy.state_type``); ``load`` takes a policy of that type (or ``None`` with growth's)."""

    model: PreTrainedModel
    capacity: int
    batch: int = 1
    use_graph: bool | None = None  # None: on CUDA only
    compile: bool = False  # fuse the step's small kernels with torch.compile (inductor) before capturing it
    slots: type[SlotState] = SlotState  # the per-slot state and its step rule (a slot policy's state_type)
    attention_kernel: str = (
        "auto"  # the step's attention: "torch", "triton" (decode_kernel) or "auto" (see pick_attention_kernel)
    )
    keys: list[torch.Tensor] = field(init=False)  # per layer [batch, kv_heads, capacity, head_dim]
    values: list[torch.Tensor] = field(init=False)
    filled: torch.Tensor = field(init=False)  # [layers] int64 on the device: entries written per layer (ever)
    position: torch.Tensor = field(init=False)  # [batch, 1] int64: position id of the token fed next (per row)
    valid: torch.Tensor = field(init=False)  # [batch, capacity] bool: slots a row may attend to (False: a pad)
    token: torch.Tensor = field(init=False)  # [batch, 1] int64: the token fed next (graph input)
    slot_ids: torch.Tensor = field(init=False)  # [capacity] int64: 0 .. capacity - 1
    state: SlotState = field(init=False)  # the slot policy's state on the device (``slots(self)``)
    logits: torch.Tensor | None = field(init=False, default=None)  # [batch, vocab]: the graph's output
    capture_s: float = field(init=False, default=0.0)
    steps_left: int = field(init=False, default=0)
    _graph: Any = field(init=False, default=None)
    _run: Any = field(init=False, default=None)  # the step function: _forward, or its compiled form
    _kernel: str = field(init=False, default="torch")  # attention_kernel resolved: "torch" or "triton"
    _decode_attention: Any = field(init=False, default=None)  # decode_kernel.decode_attention_triton when "triton"

    def __post_init__(self) -> None:
        cfg = self.model.config.get_text_config()
        dev = self.model.device
        n_layers = cfg.num_hidden_layers
        if not (isinstance(self.slots, type) and issubclass(self.slots, SlotState)):
            raise ValueError(f"slots must be a SlotState subclass (a slot policy's state_type), got {self.slots!r}")
        self.keys, self.values = kv_buffers(self.model, self.batch, self.capacity)
        self.filled = torch.zeros(n_layers, dtype=torch.long, device=dev)
        self.position = torch.zeros(self.batch, 1, dtype=torch.long, device=dev)
        self.valid = torch.ones(self.batch, self.capacity, dtype=torch.bool, device=dev)
        self.token = torch.zeros(self.batch, 1, dtype=torch.long, device=dev)
        self.slot_ids = torch.arange(self.capacity, device=dev)  # [capacity]
        self.state = self.slots(self)  # its limits are device scalars: one graph for any parameters
        if self.use_graph is None:
            self.use_graph = dev.type == "cuda"
        self._kernel, self._decode_attention = pick_attention_kernel(
            self.attention_kernel, dev, self.slots.needs_probabilities
        )
        self._run = torch.compile(self._forward, dynamic=False) if self.compile else self._forward

    @property
    def kernel(self) -> str:
        """The attention path the step runs ("torch" or "triton"), ``attention_kernel`` resolved."""
        return self._kernel

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def load(
        self,
        cache: Cache,
        next_position: int | torch.Tensor,
        max_new_tokens: int,
        kv_mask: torch.Tensor | None = None,
        policy: SlotPolicy | None = None,
    ) -> None:
        """Copy a prefill's KV entries (per layer ``[batch, kv_heads, entries, head_dim]``) into the buffers.

        ``next_position``: one int, or per row [batch, 1] (left-padded batches). ``kv_mask`` [batch, entries]
        marks each row's real entries (``None``: all); pad slots are zeroed and never attended to.
        ``policy``: how entries go while decoding (a ``SlotPolicy`` whose ``state_type`` is this decoder's
        ``slots``; the entries must be in position order); ``None``: grow only.
        """
        entries = max(layer.keys.shape[-2] for layer in cache.layers)
        policy = without_needless_eviction(policy, entries, max_new_tokens)
        if slot_state_for(policy) is not self.slots:
            raise ValueError(
                f"a {policy} slot policy needs a decoder made with slots={slot_state_for(policy).__name__}, "
                f"this one has {self.slots.__name__}"
            )
        bounded = policy is not None and policy.budget is not None
        size = policy.budget + 1 if bounded else self.capacity  # the slots in use are 0 .. size - 1
        if size > self.capacity:
            raise ValueError(f"{size} slots do not fit in capacity {self.capacity}")
        lengths = []
        for i, layer in enumerate(cache.layers):
            k, v = layer.keys, layer.values
            n = k.shape[-2]
            if (n if bounded else n + max_new_tokens) > size:
                raise ValueError(
                    f"layer {i} holds {n} entries; {n} + {max_new_tokens} new tokens exceed capacity {size}"
                )
            if k.shape[0] != self.batch:
                raise ValueError(f"the cache holds {k.shape[0]} rows; this decoder was made for batch {self.batch}")
            if kv_mask is not None:
                real = kv_mask[:, None, :, None]  # [batch, 1, entries, 1]
                k, v = k.masked_fill(~real, 0), v.masked_fill(~real, 0)
            self.keys[i][:, :, :n].copy_(k)
            self.values[i][:, :, :n].copy_(v)
            lengths.append(n)
        self.filled.copy_(torch.tensor(lengths, dtype=torch.long))
        self.valid.fill_(True)
        if kv_mask is not None:
            self.valid[:, : kv_mask.shape[1]].copy_(kv_mask)
        if torch.is_tensor(next_position):
            self.position.copy_(next_position.reshape(self.batch, 1))
        else:
            self.position.fill_(next_position)
        self.state.load(policy, cache, lengths)
        self.steps_left = max_new_tokens

    def entries(self) -> list[int]:
        """Entries held per layer (reads the device: for stats, not inside the loop)."""
        return self.state.entries()

    def _attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """One layer's attention for the fed token: store its key/value in its slot, attend over the visible slots,
        let the slot policy choose the next step's slot.

        query [batch, q_heads, 1, d]; key/value [batch, kv_heads, 1, d] (post-RoPE). Returns [batch, 1, q_heads, d].
        """
        li, state = module.layer_idx, self.state
        keys, values = self.keys[li], self.values[li]
        b, hq, _, d = query.shape
        hkv, cap = keys.shape[1], keys.shape[2]
        state.write(li, key, value)
        scaling = kwargs.get("scaling", module.scaling)
        if self._kernel == "triton":  # the visible slots are a prefix (slot < limit) less the pads
            limit = state.limit(li)
            out = self._decode_attention(query.reshape(b, hkv, hq // hkv, d), keys, values, limit, self.valid, scaling)
            state.after(li, None, None)
            return out.view(b, hq, 1, d).transpose(1, 2), None  # [b, 1, hq, d]
        q = query.reshape(b * hkv, hq // hkv, d)  # [b*hkv, group, d]: heads sharing a KV head side by side
        k_t = keys.view(b * hkv, cap, d).transpose(1, 2)  # [b*hkv, d, cap], a view: the keys are read once
        scores = matmul_fp32(q, k_t) * scaling  # [b*hkv, g, cap] float32
        visible = state.visible(li)  # [b, cap]
        scores = scores.view(b, hkv, hq // hkv, cap).masked_fill(~visible[:, None, None], float("-inf"))
        probs32 = scores.view(b * hkv, hq // hkv, cap).softmax(dim=-1)
        if state.needs_probabilities:
            state.after(li, visible, probs32.view(b, hkv, hq // hkv, cap).sum(2))
        else:
            state.after(li, None, None)
        probs = probs32.to(values.dtype)
        out = torch.bmm(probs, values.view(b * hkv, cap, d))  # [b*hkv, g, d]
        return out.view(b, hq, 1, d).transpose(1, 2), None  # [b, 1, hq, d]

    def _forward(self) -> torch.Tensor:
        if self._kernel == "triton":
            self.state.begin_step()
        out = self.model(
            input_ids=self.token,
            position_ids=self.position,
            use_cache=False,
            logits_to_keep=1,
            **{HOOK_KWARG: self._attend},
        )
        self.filled.add_(1)
        self.position.add_(1)
        return out.logits[:, -1]  # [batch, vocab]

    def capture(self) -> None:
        """Record one step as a CUDA graph (warm-up runs first; the state they advance is restored)."""
        self._capture(self._run, [self.filled, self.position])

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed ``token`` [batch, 1]; return the next logits [batch, vocab] (a buffer the next step overwrites)."""
        self._feed(token)
        return self._replay_or_run(self._run)


@dataclass
class DecoderPool:
    """Static decoders by (batch, capacity bucket, slot state type) for one model: a capture is paid once per bucket."""

    model: PreTrainedModel
    use_graph: bool | None = None
    compile: bool = False
    attention_kernel: str = "auto"  # StaticDecoder.attention_kernel of every decoder made
    speculate: bool | None = None  # a decoder of its own may try a fixed-shape step first (None: on CUDA only)
    decoders: dict[tuple[int, int, Any], Any] = field(default_factory=dict)

    def get(self, batch: int, entries: int, slots: type[SlotState] = SlotState) -> tuple[StaticDecoder, bool]:
        """A decoder holding ``entries`` (kept + new; ``slots``: the slot policy's state type, see
        ``decode.slots.slot_state_for``); the flag says whether it was made (and captured) now."""
        key = (batch, bucket(entries), slots)
        made = key not in self.decoders
        if made:
            self.decoders[key] = StaticDecoder(
                self.model, key[1], batch, self.use_graph, self.compile, slots, self.attention_kernel
            )
        return self.decoders[key], made

    def get_own(self, kind: Any, entries: int, make: Any) -> tuple[Any, bool]:
        """A method's own decoder (``capabilities.static_decode == "own"``) of ``kind`` (a hashable the method
        chooses) for ``entries`` tokens: ``make(capacity)`` builds it once per capacity bucket; the flag says
        whether it was made (and is to be captured) now."""
        key = (1, bucket(entries), kind)
        made = key not in self.decoders
        if made:
            self.decoders[key] = make(key[1])
        return self.decoders[key], made
