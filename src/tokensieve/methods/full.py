"""Full attention: the reference every method is compared with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from tokensieve.methods.base import Capabilities, DecodeState, Method, batch_prefill, full_prefill


@dataclass
class FullAttention(Method):
    """Plain prefill over the whole prompt, then ordinary decoding (SDPA attention)."""

    name: ClassVar[str] = "full"
    capabilities: ClassVar[Capabilities] = Capabilities(
        batch=True, static_decode="grow", prefix_reuse=True, prompt_only=True
    )

    def prefill(self, model: PreTrainedModel, input_ids: torch.Tensor) -> DecodeState:
        return full_prefill(model, input_ids)

    def prefill_batch(
        self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> DecodeState:
        return batch_prefill(model, input_ids, attention_mask)
