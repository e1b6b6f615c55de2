"""Kernels as torch functions: Triton's fused attention scoring and split-KV decode attention (imported only where
a GPU call may use them), and FlexAttention block masks (``flex``: compiled on CUDA, eager elsewhere).

Imports nothing else from tokensieve."""
