"""Slot policies: how a method's KV entries occupy a static decoder's slots while it decodes.

``decode.static.StaticDecoder`` is generic over a slot policy. A policy has two parts:

* :class:`SlotPolicy`, the parameters, returned by the method (``Method.slot_policy()``; ``None`` for a method whose
  cache only grows after the prefill). ``budget`` says whether it is bounded (at most ``budget`` entries held
  between steps, so the decoder needs ``budget + 1`` slots) or may grow (``None``).
* :class:`SlotState`, the per-decoder state on the device and the step's graph-safe part: where the new entry goes
  (``write``), which slots the new token attends to (``visible`` / ``limit``), and what the attention tells the
  policy for the next step (``after``). The step reads the parameters only from device tensors that ``load``
  fills, so one captured graph serves any parameters of one policy type (``SlotPolicy.state_type``), and
  ``decode.static.DecoderPool`` keys its decoders by that type.

The base :class:`SlotState` is growth: each new entry takes the next slot and every written slot is visible. An
evicting method subclasses both next to its eager rule (``methods/streamingllm.py``, ``methods/h2o.py``,
``methods/sepllm.py``). Whether a bounded policy would evict at all is decided here once
(:func:`without_needless_eviction`): the driver sizes the decoder with it and ``StaticDecoder.load`` applies it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers import Cache


class SlotState:
    """A decoder's slot state on the device; this base grows (every entry stays, the next one takes the next slot).

    Made once per decoder (``state_type(decoder)``; it reads the decoder's ``keys``, ``values``, ``filled``,
    ``position``, ``token``, ``valid``, ``capacity``, ``batch``), loaded once per answer (``load``), and called
    inside the captured step, where nothing may read back to the host.

    needs_probabilities: why the step needs the attention probabilities (``after`` receives them; the Triton
    attention kernel, which never forms them, is then refused), or ``None``.
    """

    needs_probabilities: ClassVar[str | None] = None

    def __init__(self, decoder: Any) -> None:
        self.decoder = decoder
        dev = decoder.keys[0].device
        self.size = torch.tensor([decoder.capacity], dtype=torch.long, device=dev)  # [1]: slots that may be held
        self.held_max = decoder.capacity  # entries held between steps, at most
        self._limits: torch.Tensor | None = None

    def load(self, policy: SlotPolicy | None, cache: Cache, lengths: list[int]) -> None:
        """Fill the state for a prefill whose layers hold ``lengths`` entries (in the buffers' first slots, in
        position order); ``policy`` is ``None`` for growth. Outside the step: may read the cache and the host."""
        bounded = policy is not None and policy.budget is not None
        self.size.fill_(policy.budget + 1 if bounded else self.decoder.capacity)
        self.held_max = policy.budget if bounded else self.decoder.capacity

    def begin_step(self) -> None:
        """Once per step, before the layers: every layer's visible prefix for the Triton kernel (written + the new
        one, at most ``size``), one small kernel rather than two per layer."""
        self._limits = torch.minimum(self.decoder.filled, self.size - 1) + 1  # [layers]

    def write(self, li: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store layer ``li``'s new key and value [batch, kv_heads, 1, d] in their slot."""
        slot = self.decoder.filled[li : li + 1]  # [1]: entries written so far
        self.decoder.keys[li].index_copy_(2, slot, key)
        self.decoder.values[li].index_copy_(2, slot, value)

    def visible(self, li: int) -> torch.Tensor:
        """[batch, capacity] bool: the slots the new token attends to in layer ``li`` (the pads excluded)."""
        written = self.decoder.filled[li : li + 1]
        return (self.decoder.slot_ids <= torch.minimum(written, self.size - 1)) & self.decoder.valid

    def limit(self, li: int) -> torch.Tensor:
        """[1]: the visible slots of layer ``li`` are those below this (less the pads), for the Triton kernel."""
        return self._limits[li : li + 1]

    def after(self, li: int, visible: torch.Tensor | None, received: torch.Tensor | None) -> None:
        """After layer ``li`` attended: choose the next step's slot. ``received`` [batch, kv_heads, capacity] float32
        (the attention each slot received, summed over the query heads of its KV head) and ``visible`` are given
        when ``needs_probabilities`` is set; otherwise both may be ``None``."""

    def entries(self) -> list[int]:
        """Entries held per layer (reads the device: for stats, not inside the loop)."""
        return self.decoder.filled.clamp(max=self.held_max).tolist()


class SlotPolicy:
    """An evicting method's slot policy: its parameters (subclasses are frozen dataclasses) and the type of the
    decoder state that applies them (``state_type``).

    budget: bounded policies hold at most ``budget`` entries between steps (each step writes the new entry into the
    slot the previous step freed and attends over ``budget + 1``, what the eager cache holds before it evicts);
    ``None``: the policy may grow to every entry and new token (e.g. SepLLM's separators accumulate). Every
    subclass sets it (a field, or a class attribute ``None``).
    """

    budget: int | None  # annotation only: a dataclass subclass's field must not inherit a default
    state_type: ClassVar[type[SlotState]] = SlotState

    def evicts(self, entries: int, max_new_tokens: int) -> bool:
        """Whether decoding ``max_new_tokens`` after a prefill that kept ``entries`` may evict: an unbounded policy
        may; a bounded one only when they exceed its budget."""
        return self.budget is None or entries + max_new_tokens > self.budget


def without_needless_eviction(policy: SlotPolicy | None, entries: int, max_new_tokens: int) -> SlotPolicy | None:
    """``policy``, or ``None`` when it would evict nothing: the ``entries`` the prefill kept plus ``max_new_tokens``
    fit in its budget, so the answer decodes by plain growth. The one place this is decided (the driver sizes the
    decoder with it, ``StaticDecoder.load`` applies it)."""
    if policy is not None and not policy.evicts(entries, max_new_tokens):
        return None
    return policy


def decoder_size(policy: SlotPolicy | None, entries: int, max_new_tokens: int) -> int:
    """Slots a decoder needs: ``budget + 1`` for a bounded policy that will evict, else every entry and new token
    (growth; an unbounded policy may also grow to that)."""
    policy = without_needless_eviction(policy, entries, max_new_tokens)
    if policy is not None and policy.budget is not None:
        return policy.budget + 1
    return entries + max_new_tokens


def slot_state_for(policy: SlotPolicy | None) -> type[SlotState]:
    """The decoder state a policy needs (growth's ``SlotState`` for ``None``): what ``DecoderPool`` keys by."""
    return SlotState if policy is None else policy.state_type
