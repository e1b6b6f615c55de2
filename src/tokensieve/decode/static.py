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

LazyLLM re-selects its tokens at every step and may revive pruned ones, so it has its own decoder
(:class:`LazyDecoder`: a slot per token, depths and the aux cache on the device, the selection as a device
top-k; the captured fixed-shape step is re-run on a host-planned path when a token comes back).

Supported: methods whose cache only grows while decoding (full attention, GemFilter, SnapKV), StreamingLLM,
H2O and SepLLM (one prompt at a time) and LazyLLM, on models whose layers all use full attention (Llama,
Mistral, Qwen2/3, Phi-3 class). Sliding-window models and left-padded batches of the evicting methods decode on
the eager path; ``supports_static`` says which.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Cache, PreTrainedModel

from tokensieve.core.attention import HOOK_KWARG, sdpa
from tokensieve.errors import InputError
from tokensieve.methods.base import DeviceEviction, has_sliding_layers
from tokensieve.methods.lazyllm import LazyModules, keep_count
from tokensieve.core.scoring import spans, matmul_fp32

log = logging.getLogger(__name__)

# Capacity buckets: kept entries + new tokens, rounded up to a multiple of this, so that the masked
# tail the step reads is small (at most BUCKET - 1 entries) and prompts of similar size share a graph.
BUCKET = 256
# LazyLLM's host-planned step attends in chunks of this many rows (its mask is [rows, capacity]).
ROW_CHUNK = 1024


def bucket(entries: int) -> int:
    return -(-entries // BUCKET) * BUCKET


def supports_static(model: PreTrainedModel, cache: Cache | None, method_name: str) -> str | None:
    """``None`` when this model/cache can decode on the static path, else the reason it cannot."""
    if method_name not in STATIC_METHODS:
        return f"{method_name} evicts or re-selects while decoding (eager path)"
    if method_name in EVICTING_METHODS and getattr(cache, "pad_counts", None):
        return f"{method_name} decodes a left-padded batch on the eager path (its sinks differ per row)"
    cfg = model.config.get_text_config()
    if has_sliding_layers(model):
        return "the model has sliding-window layers (eager path)"
    if getattr(cfg, "attn_logit_softcapping", None):
        return "the model soft-caps attention logits (eager path)"
    if cache is None or not getattr(cache, "layers", None):
        return "the prefill left no KV cache"
    return None


# Methods whose KV cache only grows after the prefill (the static buffers hold exactly what they keep), and
# those that evict while decoding in a way the device can do (see the module docstring).
EVICTING_METHODS = ("streamingllm", "h2o", "sepllm")
STATIC_METHODS = ("full", "gemfilter", "snapkv") + EVICTING_METHODS + ("lazyllm",)  # LazyLLM: ``LazyDecoder``
TRACKS = ("none", "heavy", "separators")
ATTENTION_KERNELS = ("auto", "torch", "triton")


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
    keys = [torch.zeros(batch, cfg.num_key_value_heads, capacity, head_dim, dtype=dtype, device=model.device)
            for _ in range(cfg.num_hidden_layers)]
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


class _CapturedStep:
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
                    warnings.warn(f"CUDA graph capture failed twice ({first_line}); this decoder (capacity "
                                  f"{self.capacity}) runs its step without a graph", RuntimeWarning, stacklevel=3)
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
class StaticDecoder(_CapturedStep):
    """Preallocated KV buffers for one model, batch size and capacity, and the captured decoding step."""

    model: PreTrainedModel
    capacity: int
    batch: int = 1
    use_graph: bool | None = None  # None: on CUDA only
    compile: bool = False  # fuse the step's small kernels with torch.compile (inductor) before capturing it
    tracks: str = "none"  # per-slot state of an evicting method: "none", "heavy" (H2O), "separators" (SepLLM)
    attention_kernel: str = "auto"  # the step's attention: "torch", "triton" (decode_kernel) or "auto" (see pick_attention_kernel)
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
            self.acc = [torch.zeros(self.batch, hkv, self.capacity, dtype=torch.float32, device=dev) for _ in range(n_layers)]
            self.stamp = [torch.zeros(self.batch, hkv, self.capacity, dtype=torch.long, device=dev) for _ in range(n_layers)]
            self.free = [torch.zeros(self.batch, hkv, dtype=torch.long, device=dev) for _ in range(n_layers)]
            self.heavy_limits = torch.zeros(2, dtype=torch.long, device=dev)  # budget, n_keep
        if self.use_graph is None:
            self.use_graph = dev.type == "cuda"
        self._kernel, self._decode_attention = pick_attention_kernel(
            self.attention_kernel, dev, "H2O's eviction needs the attention probabilities" if self.heavy else None)
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
        self, cache: Cache, next_position: int | torch.Tensor, max_new_tokens: int, kv_mask: torch.Tensor | None = None,
        eviction: DeviceEviction | None = None,
    ) -> None:
        """Copy a prefill's KV entries (per layer ``[batch, kv_heads, entries, head_dim]``) into the buffers.

        ``next_position``: one int, or per row [batch, 1] (left-padded batches). ``kv_mask`` [batch, entries]
        marks each row's real entries (``None``: all); pad slots are zeroed and never attended to.
        ``eviction``: how entries go once ``eviction.budget + 1`` are held (the entries must be in position
        order; ``"heavy"`` also reads the cache's accumulated ``scores``); ``None``: grow only.
        """
        if eviction is not None and eviction.kind != "separators" and eviction.budget + 1 > self.capacity:
            eviction = None  # the answer ends before anything is evicted: plain growth
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
                raise ValueError(f"layer {i} holds {n} entries; {n} + {max_new_tokens} new tokens exceed capacity {size}")
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
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        attention_mask: torch.Tensor | None, **kwargs: Any,
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
            input_ids=self.token, position_ids=self.position, use_cache=False, logits_to_keep=1,
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
class LazyDecoder(_CapturedStep):
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
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        attention_mask: torch.Tensor | None, **kwargs: Any,
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
            out = self._decode_attention(query.reshape(1, hkv, hq // hkv, d), keys, values, rows + 1, self._valid, scaling)
            return out.view(1, hq, 1, d).transpose(1, 2), None
        allowed = self.present[None, :] & (self._slots[None, :] <= rows[:, None])  # [t, cap]
        if t == 1:  # the fixed-shape step: one query, the probabilities at hand
            probs32 = self._probs(query, keys, allowed, scaling)  # [hkv, g, cap]
            out = torch.bmm(probs32.to(values.dtype), values[0]).view(1, hq, 1, d).transpose(1, 2)  # [1, 1, hq, d]
        else:  # revived rows too (host-planned): SDPA as on the eager path, rows in chunks (the mask is [rows, cap])
            out = torch.cat([
                sdpa(module, query[:, :, a:b], keys, values, allowed[None, None, a:b], scaling=scaling)[0]
                for a, b in spans(t, ROW_CHUNK)
            ], dim=1)
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
                hidden, attention_mask=None, position_embeddings=dec.rotary_embeddings(hidden, pos_ids, li),
                position_ids=pos_ids, use_cache=False, **{HOOK_KWARG: self._attend},
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


@dataclass
class DecoderPool:
    """Static decoders by (batch, capacity bucket) for one model: a capture is paid once per bucket."""

    model: PreTrainedModel
    use_graph: bool | None = None
    compile: bool = False
    attention_kernel: str = "auto"  # StaticDecoder.attention_kernel of every decoder made
    speculate: bool | None = None  # LazyLLM: try the fixed-shape step first (None: on CUDA only; see LazyDecoder)
    decoders: dict[tuple[int, int, Any], "StaticDecoder | LazyDecoder"] = field(default_factory=dict)

    def get(self, batch: int, entries: int, tracks: str = "none") -> tuple[StaticDecoder, bool]:
        """A decoder holding ``entries`` (kept + new; ``tracks``: an evicting method's per-slot state, see
        ``tracks_for``); the flag says whether it was made (and captured) now."""
        key = (batch, bucket(entries), tracks)
        made = key not in self.decoders
        if made:
            self.decoders[key] = StaticDecoder(self.model, key[1], batch, self.use_graph, self.compile, tracks,
                                               self.attention_kernel)
        return self.decoders[key], made

    def get_lazy(self, entries: int, prune_layers: tuple[int, ...]) -> tuple[LazyDecoder, bool]:
        """LazyLLM's decoder for ``entries`` tokens (prompt + new) and these pruning layers, made (and captured) once."""
        key = (1, bucket(entries), ("lazyllm", tuple(prune_layers)))
        made = key not in self.decoders
        if made:
            self.decoders[key] = LazyDecoder(self.model, key[1], tuple(prune_layers), self.use_graph, self.speculate,
                                             self.attention_kernel, self.compile)
        return self.decoders[key], made
