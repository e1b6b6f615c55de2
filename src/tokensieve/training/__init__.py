"""Training under SepLLM's attention rule: the mask (dense and FlexAttention), data packing, the trainer,
and a low-rank adapter (``lora``) for post-training with less memory.

``tokensieve.training.train(TrainConfig(...))`` and ``resume(out)``; the ``tokensieve train`` command.
"""

from tokensieve.training.lora import LoRALinear, add_lora, merge_lora
from tokensieve.training.mask import (
    KERNELS,
    MASKS,
    TrainingMask,
    sepllm_block_mask,
    sepllm_dense_mask,
    sepllm_mask_mod,
    training_hook,
)
from tokensieve.training.trainer import TrainConfig, TrainResult, evaluate, lr_at, resume, save_checkpoint, train

__all__ = [
    "KERNELS",
    "LoRALinear",
    "MASKS",
    "add_lora",
    "merge_lora",
    "TrainConfig",
    "TrainResult",
    "TrainingMask",
    "evaluate",
    "lr_at",
    "resume",
    "save_checkpoint",
    "sepllm_block_mask",
    "sepllm_dense_mask",
    "sepllm_mask_mod",
    "train",
    "training_hook",
]
