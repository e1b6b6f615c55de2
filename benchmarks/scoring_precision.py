"""Precision of scoring.attention_scores on the GPU: bf16 inputs with float32 accumulation vs float32 inputs, both against float64."""

import sys

import torch

sys.path.insert(0, "src")
from tokensieve.core.scoring import attention_scores

torch.manual_seed(0)
q = torch.randn(1, 32, 4096, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
a = attention_scores(q, k, 128**-0.5)
b = attention_scores(q.double(), k.double(), 128**-0.5)
print("scores rel error bf16-native vs float64:", float((a.double() - b).norm() / b.norm()))
c = attention_scores(q.float(), k.float(), 128**-0.5)
print("scores rel error float32 vs float64:", float((c.double() - b).norm() / b.norm()))
