"""Triton kernels as torch functions: fused attention scoring and split-KV decode attention.

Optional: imported only where a GPU call may use them. Imports nothing else from tokensieve."""
