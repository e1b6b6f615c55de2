"""kernels.flex.block_mask: the eager mask on the CPU; on CUDA one torch.compile of create_block_mask per process
(never torch's deprecated ``_compile`` flag)."""

import warnings

import pytest
import torch

from tokensieve.kernels import flex


def band(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) & (kv_idx > q_idx - 40)


def test_eager_block_mask_is_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    got = flex.block_mask(band, None, None, 300, 300, device="cpu", compiled=False)
    ref = create_block_mask(band, None, None, 300, 300, device="cpu")
    assert torch.equal(got.to_dense(), ref.to_dense())


def test_compiled_block_mask_compiles_once_without_the_deprecated_flag(monkeypatch):
    compiled = []

    def fake_compile(fn, **kwargs):  # stands in for torch.compile: records what is compiled, runs it eagerly
        compiled.append(fn)
        return fn

    monkeypatch.setattr(flex, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", fake_compile)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        a = flex.block_mask(band, None, None, 300, 300, device="cpu", compiled=True)
        b = flex.block_mask(band, None, None, 256, 300, device="cpu", compiled=True, BLOCK_SIZE=64)
    from torch.nn.attention.flex_attention import create_block_mask

    assert [f.__name__ for f in compiled] == ["create_block_mask"]
    assert torch.equal(a.to_dense(), create_block_mask(band, None, None, 300, 300, device="cpu").to_dense())
    assert b.BLOCK_SIZE == (64, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled mask and kernel run on CUDA")
def test_cuda_compiled_mask_and_local_flex_attention_match_the_eager_rule():
    from tokensieve.methods.gemfilter import local_attention

    eager = flex.block_mask(band, None, None, 1000, 1000, device="cpu", compiled=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        built = flex.block_mask(band, None, None, 1000, 1000, device="cuda", compiled=True)
    assert torch.equal(built.to_dense().cpu(), eager.to_dense())
    torch.manual_seed(0)
    n, d, n_initial, n_recent = 3000, 64, 4, 300
    q, k, v = (torch.randn(1, h, n, d, device="cuda") for h in (8, 2, 2))
    pos = torch.arange(n, device="cuda")
    visible = (pos[None] <= pos[:, None]) & ((pos[None] < n_initial) | (pos[None] > pos[:, None] - n_recent))
    kr, vr = (x.repeat_interleave(4, dim=1) for x in (k, v))
    scores = (q @ kr.transpose(-1, -2)) * 0.125
    ref = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ vr
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        got = local_attention(q[:, :, -700:], k, v, 0.125, n_initial, n_recent, kernel="flex")
    torch.testing.assert_close(got, ref[:, :, -700:], rtol=2e-3, atol=2e-3)
