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

Eviction on the device. A method that evicts while decoding declares how (``Method.decode_eviction``, a
:class:`DeviceEviction`); its buffer then holds ``budget + 1`` entries: each step writes the new entry into
the slot freed by the previous step, attends over all of them (exactly what the eager cache holds before it
evicts) and picks, on the device, the slot the next step overwrites:

* ``"ring"`` (StreamingLLM: ``n_keep`` = ``n_initial`` sinks + the newest entries): slots ``0 .. n_keep - 1``
  hold the sinks, the rest is a ring and the oldest entry of the ring goes;
* ``"heavy"`` (H2O: heavy hitters + the ``n_keep`` newest entries): every slot carries the attention it has
  received (float32, summed over the query heads that share its KV head, as the eager cache does) and a
  write stamp; per KV head the lowest-scoring slot outside the ``n_keep`` newest stamps goes.
* ``"separators"`` (SepLLM: initial tokens, separators and a window): every slot carries its position and
  whether its token is a separator; the entry that leaves the window goes unless it is an initial token or a
  separator, and then the next unused slot is taken (the buffer is sized for the whole answer, since
  separators accumulate).

No step reads back to the host, so the evicting step is captured like the growing one.

A method that decodes in a way of its own (LazyLLM re-selects its tokens at every step) brings its own decoder
on :class:`CapturedStep` (LazyLLM's is ``methods.lazyllm.LazyDecoder``); ``DecoderPool.get_own`` keeps it.

This module knows no method: a method's ``capabilities.static_decode`` says whether its cache grows, evicts
(``DeviceEviction``) or decodes on its own decoder, and the driver asks (``engine.runner.supports_static``).
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


@dataclass(frozen=True)
class DeviceEviction:
    """How a method evicts while decoding (``tokensieve.decode.static`` does it on the device).

    kind: ``"ring"`` (the first ``n_keep`` entries stay, then the newest; ``budget`` in all), ``"heavy"``
    (the ``n_keep`` newest stay, then the most attended-to; ``budget`` in all) or ``"separators"`` (the
    first ``n_keep`` tokens, every token in ``separator_ids`` and the ``window`` tokens before the next one
    stay: SepLLM; no fixed budget).
    """

    kind: str
    budget: int = 0
    n_keep: int = 0
    window: int = 0
    separator_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        ok = {
            "ring": 0 <= self.n_keep < self.budget,
            "heavy": 0 <= self.n_keep <= self.budget and self.budget >= 1,
            "separators": self.n_keep >= 0 and self.window >= 0,
        }.get(self.kind, False)
        if not ok:
            raise ValueError(f"bad DeviceEviction {self}")


TRACKS = ("none", "heavy", "separators")
ATTENTION_KERNELS = ("auto", "torch", "triton")


def without_needless_eviction(
    eviction: DeviceEviction | None, entries: int, max_new_tokens: int
) -> DeviceEviction | None:
    """``eviction``, or ``None`` when a bounded eviction (ring, heavy) would evict nothing: the ``entries`` the
    prefill kept plus ``max_new_tokens`` fit in its budget, so the answer decodes by plain growth. The one
    place this is decided (the driver sizes the decoder with it, ``StaticDecoder.load`` applies it)."""
    if eviction is not None and eviction.kind != "separators" and entries + max_new_tokens <= eviction.budget:
        return None
    return eviction


def decoder_size(eviction: DeviceEviction | None, entries: int, max_new_tokens: int) -> int:
    """Slots a decoder needs: ``budget + 1`` for a bounded eviction that will evict, else every entry and new
    token (growth; separators may also grow to that)."""
    eviction = without_needless_eviction(eviction, entries, max_new_tokens)
    if eviction is not None and eviction.kind != "separators":
        return eviction.budget + 1
    return entries + max_new_tokens


def tracks_for(eviction: DeviceEviction | None) -> str:
    """The per-slot state a decoder needs for an eviction: ``"heavy"``, ``"separators"`` or ``"none"``."""
    return eviction.kind if eviction is not None and eviction.kind in ("heavy", "separators") else "none"


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
    """Preallocated KV buffers for one model, batch size and capacity, and the captured decoding step."""

    model: PreTrainedModel
    capacity: int
    batch: int = 1
    use_graph: bool | None = None  # None: on CUDA only
    compile: bool = False  # fuse the step's small kernels with torch.compile (inductor) before capturing it
    tracks: str = "none"  # per-slot state of an evicting method: "none", "heavy" (H2O), "separators" (SepLLM)
    attention_kernel: str = (
        "auto"  # the step's attention: "torch", "triton" (decode_kernel) or "auto" (see pick_attention_kernel)
    )
    keys: list[torch.Tensor] = field(init=False)  # per layer [batch, kv_heads, capacity, head_dim]
    values: list[torch.Tensor] = field(init=False)
    filled: torch.Tensor = field(init=False)  # [layers] int64 on the device: entries written per layer (ever)
    ring: torch.Tensor = field(init=False)  # [2] int64: fixed slots before the ring, slots in use (ring's end)
    position: torch.Tensor = field(init=False)  # [batch, 1] int64: position id of the token fed next (per row)
    valid: torch.Tensor = field(init=False)  # [batch, capacity] bool: slots a row may attend to (False: a pad)
    token: torch.Tensor = field(init=False)  # [batch, 1] int64: the token fed next (graph input)
    logits: torch.Tensor | None = field(init=False, default=None)  # [batch, vocab]: the graph's output
    capture_s: float = field(init=False, default=0.0)
    _held_max: int = field(init=False, default=0)
    steps_left: int = field(init=False, default=0)
    _graph: Any = field(init=False, default=None)
    _run: Any = field(init=False, default=None)  # the step function: _forward, or its compiled form
    _kernel: str = field(init=False, default="torch")  # attention_kernel resolved: "torch" or "triton"
    _decode_attention: Any = field(init=False, default=None)  # decode_kernel.decode_attention_triton when "triton"
    _limits: Any = field(init=False, default=None)  # [layers] int64: slots each layer attends this step ("triton")

    def __post_init__(self) -> None:
        cfg = self.model.config.get_text_config()
        dev = self.model.device
        hkv = cfg.num_key_value_heads
        n_layers = cfg.num_hidden_layers
        self.keys, self.values = kv_buffers(self.model, self.batch, self.capacity)
        self.filled = torch.zeros(n_layers, dtype=torch.long, device=dev)
        self.ring = torch.tensor([0, self.capacity], dtype=torch.long, device=dev)
        self.position = torch.zeros(self.batch, 1, dtype=torch.long, device=dev)
        self.valid = torch.ones(self.batch, self.capacity, dtype=torch.bool, device=dev)
        self.token = torch.zeros(self.batch, 1, dtype=torch.long, device=dev)
        self._slots = torch.arange(self.capacity, device=dev)  # [capacity]
        # An evicting method's per-slot state, per layer; its limits are device scalars (one graph for any budget).
        if self.tracks not in TRACKS:
            raise ValueError(f"tracks must be one of {TRACKS}, got {self.tracks!r}")
        if self.tracks == "separators":  # per layer [cap]: positions, separator flags; the next free slot, slots used
            self.stamp = [torch.zeros(self.capacity, dtype=torch.long, device=dev) for _ in range(n_layers)]
            self.is_sep = [torch.zeros(self.capacity, dtype=torch.bool, device=dev) for _ in range(n_layers)]
            self.free = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(n_layers)]
            self.used = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(n_layers)]
            self.sep_limits = torch.zeros(2, dtype=torch.long, device=dev)  # n_initial, window
            self.sep_ids = torch.zeros(0, dtype=torch.long, device=dev)
        if self.heavy:  # attention received [b, hkv, cap] float32, write stamps, the slot the next step writes
            self.acc = [
                torch.zeros(self.batch, hkv, self.capacity, dtype=torch.float32, device=dev) for _ in range(n_layers)
            ]
            self.stamp = [
                torch.zeros(self.batch, hkv, self.capacity, dtype=torch.long, device=dev) for _ in range(n_layers)
            ]
            self.free = [torch.zeros(self.batch, hkv, dtype=torch.long, device=dev) for _ in range(n_layers)]
            self.heavy_limits = torch.zeros(2, dtype=torch.long, device=dev)  # budget, n_keep
        if self.use_graph is None:
            self.use_graph = dev.type == "cuda"
        self._kernel, self._decode_attention = pick_attention_kernel(
            self.attention_kernel, dev, "H2O's eviction needs the attention probabilities" if self.heavy else None
        )
        self._run = torch.compile(self._forward, dynamic=False) if self.compile else self._forward

    @property
    def kernel(self) -> str:
        """The attention path the step runs ("torch" or "triton"), ``attention_kernel`` resolved."""
        return self._kernel

    @property
    def heavy(self) -> bool:
        return self.tracks == "heavy"

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def load(
        self,
        cache: Cache,
        next_position: int | torch.Tensor,
        max_new_tokens: int,
        kv_mask: torch.Tensor | None = None,
        eviction: DeviceEviction | None = None,
    ) -> None:
        """Copy a prefill's KV entries (per layer ``[batch, kv_heads, entries, head_dim]``) into the buffers.

        ``next_position``: one int, or per row [batch, 1] (left-padded batches). ``kv_mask`` [batch, entries]
        marks each row's real entries (``None``: all); pad slots are zeroed and never attended to.
        ``eviction``: how entries go once ``eviction.budget + 1`` are held (the entries must be in position
        order; ``"heavy"`` also reads the cache's accumulated ``scores``); ``None``: grow only.
        """
        entries = max(layer.keys.shape[-2] for layer in cache.layers)
        eviction = without_needless_eviction(eviction, entries, max_new_tokens)
        if tracks_for(eviction) != self.tracks:
            raise ValueError(f"a {eviction} eviction needs a decoder made with tracks={tracks_for(eviction)!r}")
        # (fixed, size): the slots in use are 0 .. size - 1; a ring turns over fixed .. size - 1
        if eviction is None or eviction.kind == "separators":
            fixed, size = 0, self.capacity
        else:
            fixed, size = (eviction.n_keep if eviction.kind == "ring" else 0), eviction.budget + 1
        if not 0 <= fixed < size <= self.capacity:
            raise ValueError(f"slots 0 <= {fixed} < {size} do not fit in capacity {self.capacity}")
        lengths = []
        for i, layer in enumerate(cache.layers):
            k, v = layer.keys, layer.values
            n = k.shape[-2]
            if (n + max_new_tokens if eviction is None or eviction.kind == "separators" else n) > size:
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
        self.ring.copy_(torch.tensor([fixed, size], dtype=torch.long))
        self._held_max = self.capacity if eviction is None or eviction.kind == "separators" else eviction.budget
        if self.tracks == "separators":
            self.sep_limits.copy_(torch.tensor([eviction.n_keep, eviction.window], dtype=torch.long))
            self.sep_ids = torch.tensor(eviction.separator_ids, dtype=torch.long, device=self.sep_limits.device)
            for i, n in enumerate(lengths):
                pos = cache.sync_positions(i)[0, 0]  # [n] original positions (the same in every head)
                self.stamp[i].fill_(-1)
                self.stamp[i][:n].copy_(pos)
                self.is_sep[i].zero_()
                self.is_sep[i][:n].copy_(torch.isin(cache.token_ids[0, pos], self.sep_ids))
                self.free[i].fill_(n)
                self.used[i].fill_(n)
        if self.heavy:
            budget, keep = (eviction.budget, eviction.n_keep) if eviction is not None else (self.capacity, 0)
            self.heavy_limits.copy_(torch.tensor([budget, keep], dtype=torch.long))
            scores = getattr(cache, "scores", {})
            for i, n in enumerate(lengths):
                self.acc[i].zero_()
                if eviction is not None:
                    self.acc[i][:, :, :n].copy_(scores[i])
                self.stamp[i].zero_()
                self.stamp[i][:, :, :n].copy_(torch.arange(n, device=self.stamp[i].device))  # position order
                self.free[i].fill_(n)
        self.valid.fill_(True)
        if kv_mask is not None:
            self.valid[:, : kv_mask.shape[1]].copy_(kv_mask)
        if torch.is_tensor(next_position):
            self.position.copy_(next_position.reshape(self.batch, 1))
        else:
            self.position.fill_(next_position)
        self.steps_left = max_new_tokens

    def entries(self) -> list[int]:
        """Entries held per layer (reads the device: for stats, not inside the loop)."""
        if self.tracks == "separators":  # the slots used, less the one freed for the next step
            return [int(u) - int(f < u) for u, f in zip(self.used, self.free)]
        return self.filled.clamp(max=self._held_max).tolist()

    def _attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """One layer's attention for the fed token: store its key/value in the next slot, attend over the buffer.

        query [batch, q_heads, 1, d]; key/value [batch, kv_heads, 1, d] (post-RoPE). Returns [batch, 1, q_heads, d].
        """
        li = module.layer_idx
        written, fixed, size = self.filled[li : li + 1], self.ring[0:1], self.ring[1:2]  # [1] each, on the device
        keys, values = self.keys[li], self.values[li]
        b, hq, _, d = query.shape
        hkv, cap = keys.shape[1], keys.shape[2]
        if self.heavy:  # per KV head, the slot freed by the previous step (or the next empty one)
            free = self.free[li][:, :, None]  # [b, hkv, 1]
            keys.scatter_(2, free[..., None].expand(b, hkv, 1, d), key)
            values.scatter_(2, free[..., None].expand(b, hkv, 1, d), value)
            self.acc[li].scatter_(2, free, 0.0)  # a new entry starts with no attention received
            self.stamp[li].scatter_(2, free, written.expand(b, hkv, 1))
        elif self.tracks == "separators":  # the slot the previous step freed, or the next unused one
            slot = self.free[li]
            keys.index_copy_(2, slot, key)
            values.index_copy_(2, slot, value)
            self.stamp[li].index_copy_(0, slot, self.position[0])
            self.is_sep[li].index_copy_(0, slot, torch.isin(self.token[0], self.sep_ids))
            self.used[li].copy_(torch.maximum(self.used[li], slot + 1))
        else:  # the first free slot; once all `size` are written, the oldest slot of the ring
            slot = torch.where(written < size, written, fixed + (written - fixed) % (size - fixed))
            keys.index_copy_(2, slot, key)
            values.index_copy_(2, slot, value)
        scaling = kwargs.get("scaling", module.scaling)
        if self._kernel == "triton":  # the visible slots are a prefix (slot < limit) less the pads, as below
            limit = self.used[li] if self.tracks == "separators" else self._limits[li : li + 1]
            out = self._decode_attention(query.reshape(b, hkv, hq // hkv, d), keys, values, limit, self.valid, scaling)
            if self.tracks == "separators":
                self._separator_evict(li)
            return out.view(b, hq, 1, d).transpose(1, 2), None  # [b, 1, hq, d]
        q = query.reshape(b * hkv, hq // hkv, d)  # [b*hkv, group, d]: heads sharing a KV head side by side
        k_t = keys.view(b * hkv, cap, d).transpose(1, 2)  # [b*hkv, d, cap], a view: the keys are read once
        scores = matmul_fp32(q, k_t) * scaling  # [b*hkv, g, cap] float32
        if self.tracks == "separators":
            visible = (self._slots < self.used[li]) & self.valid  # every slot in use: what the cache holds
        else:  # written slots + the new one, no pads
            visible = (self._slots <= torch.minimum(written, size - 1)) & self.valid  # [b, cap]
        scores = scores.view(b, hkv, hq // hkv, cap).masked_fill(~visible[:, None, None], float("-inf"))
        probs32 = scores.view(b * hkv, hq // hkv, cap).softmax(dim=-1)
        if self.heavy:
            self._heavy_evict(li, written, visible, probs32.view(b, hkv, hq // hkv, cap).sum(2))
        elif self.tracks == "separators":
            self._separator_evict(li)
        probs = probs32.to(values.dtype)
        out = torch.bmm(probs, values.view(b * hkv, cap, d))  # [b*hkv, g, d]
        return out.view(b, hq, 1, d).transpose(1, 2), None  # [b, 1, hq, d]

    def _separator_evict(self, li: int) -> None:
        """SepLLM: the entry at position ``p - window`` leaves the next token's view unless it is an initial token
        or a separator; its slot is the next step's, else the next unused slot (on the device)."""
        n_initial, window = self.sep_limits[0:1], self.sep_limits[1:2]
        stamp = self.stamp[li]
        leaving = (stamp == self.position[0] - window) & (stamp >= n_initial) & ~self.is_sep[li]  # [cap], at most one
        self.free[li].copy_(torch.where(leaving.any(), leaving.int().argmax(), self.used[li]))

    def _heavy_evict(self, li: int, written: torch.Tensor, visible: torch.Tensor, received: torch.Tensor) -> None:
        """Add this step's attention [b, hkv, cap] to the slots' scores; once ``budget + 1`` entries are held, free
        each KV head's lowest-scoring slot outside the ``n_keep`` newest for the next step (all on the device)."""
        acc, budget, keep = self.acc[li], self.heavy_limits[0:1], self.heavy_limits[1:2]
        acc.add_(received)
        newest = self.stamp[li] > written - keep  # [b, hkv, cap]: the n_keep most recent writes
        candidates = acc.masked_fill(newest | ~visible[:, None, :], float("inf"))
        victim = candidates.argmin(dim=-1)  # [b, hkv]
        grow = (written + 1).clamp(max=self.capacity - 1).expand_as(victim)  # the next empty slot
        self.free[li].copy_(torch.where(written + 1 > budget, victim, grow))

    def _forward(self) -> torch.Tensor:
        if self._kernel == "triton" and self.tracks != "separators":
            # every layer's slots in use (written + the new one, at most the ring's size), once per step rather
            # than two small kernels per layer: the fill counts advance only after the model ran
            self._limits = torch.minimum(self.filled, self.ring[1:2] - 1) + 1  # [layers]
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
    """Static decoders by (batch, capacity bucket) for one model: a capture is paid once per bucket."""

    model: PreTrainedModel
    use_graph: bool | None = None
    compile: bool = False
    attention_kernel: str = "auto"  # StaticDecoder.attention_kernel of every decoder made
    speculate: bool | None = None  # a decoder of its own may try a fixed-shape step first (None: on CUDA only)
    decoders: dict[tuple[int, int, Any], Any] = field(default_factory=dict)

    def get(self, batch: int, entries: int, tracks: str = "none") -> tuple[StaticDecoder, bool]:
        """A decoder holding ``entries`` (kept + new; ``tracks``: an evicting method's per-slot state, see
        ``tracks_for``); the flag says whether it was made (and captured) now."""
        key = (batch, bucket(entries), tracks)
        made = key not in self.decoders
        if made:
            self.decoders[key] = StaticDecoder(
                self.model, key[1], batch, self.use_graph, self.compile, tracks, self.attention_kernel
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
