"""The fused Triton scoring kernels (``tokensieve.kernels.scoring_kernel``) against the slow reference, and the dispatch.

Triton compiles for a GPU or interprets on the CPU, decided when it is imported (``TRITON_INTERPRET=1``, and
torch imports Triton when it is installed); so the kernels run in a child process started with the variable
set, which writes its results to a file that this process checks. Skipped where Triton is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TEST_DIRS, tiny_model
from test_scoring import qk, random_mask, slow_attention_scores

from tokensieve.core.scoring import KERNEL_MIN_QUERIES, attention_scores
from tokensieve.errors import InputError
from tokensieve.methods import H2O

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (test extra, linux x86_64)")
TESTS = Path(__file__).resolve().parents[1]
SRC = TESTS.parent / "src"

# (b, q_heads, kv_heads, q_len, kv_len, head_dim, dtype, block_m, block_n): lengths that are not multiples of
# the blocks, fewer queries than keys (bottom-right causal), GQA / MQA / MHA, a head_dim under the 16 of tl.dot,
# one query, and the three input dtypes.
CASES = [
    (1, 4, 2, 37, 37, 32, "float32", 16, 16),
    (2, 4, 1, 20, 45, 16, "float16", 16, 32),
    (1, 6, 2, 50, 50, 64, "bfloat16", 32, 16),
    (1, 2, 2, 1, 33, 8, "float32", 16, 16),
    (2, 8, 2, 70, 70, 24, "bfloat16", 16, 16),
]

CHILD = r"""
import sys, torch
from conftest import tiny_model
from test_scoring import qk
from tokensieve.methods import H2O
from tokensieve.core.scoring import attention_scores
from tokensieve.kernels.scoring_kernel import INTERPRETED, attention_scores_triton

assert INTERPRETED
cases, out = eval(sys.argv[1]), {}
for i, (b, hq, hkv, q_len, kv_len, d, dtype, bm, bn) in enumerate(cases):
    q, k = qk(b=b, hq=hq, hkv=hkv, q_len=q_len, kv_len=kv_len, d=d, seed=i)
    q, k = q.to(getattr(torch, dtype)), k.to(getattr(torch, dtype))
    out[i] = attention_scores_triton(q, k, d ** -0.5, block_m=bm, block_n=bn)
# strided inputs, as the attention hook gets them ([b, n, h, d] projections viewed as [b, h, n, d]),
# through the dispatch (kernel="triton")
q, k = qk(b=1, hq=4, hkv=2, q_len=29, kv_len=29, d=16, seed=9)
out["strided"] = attention_scores(q.transpose(1, 2).contiguous().transpose(1, 2),
                                  k.transpose(1, 2).contiguous().transpose(1, 2), 0.3, kernel="triton")
# H2O end to end on a tiny model: prompt scores and kept entries, kernel vs torch path
model, ids = tiny_model(), torch.randint(3, 90, (1, 40), generator=torch.Generator().manual_seed(0))
for kernel in ("triton", "torch"):
    state = H2O(budget=16, n_recent=4, score_kernel=kernel).prefill(model, ids)
    cache = state.cache
    out["h2o_" + kernel] = [(cache.scores[i].clone(), cache.layers[i].keys.clone()) for i in sorted(cache.scores)]
    out["h2o_logits_" + kernel] = state.logits.clone()
torch.save(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """The child process's results (kernels run by Triton's interpreter)."""
    path = tmp_path_factory.mktemp("kernel") / "out.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(SRC), *map(str, TEST_DIRS)])}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, repr(CASES), str(path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(path)


@needs_triton
@pytest.mark.parametrize("i", range(len(CASES)))
def test_kernel_matches_slow_reference(interpreted, i):
    b, hq, hkv, q_len, kv_len, d, dtype, _, _ = CASES[i]
    q, k = qk(b=b, hq=hq, hkv=hkv, q_len=q_len, kv_len=kv_len, d=d, seed=i)
    q, k = q.to(getattr(torch, dtype)), k.to(getattr(torch, dtype))  # the reference sees the same rounded inputs
    got = interpreted[i]
    assert got.shape == (b, hkv, kv_len) and got.dtype == torch.float32
    ref = slow_attention_scores(q, k, d**-0.5)
    torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-5)
    # every (query head, query) row is a distribution: the columns add up to the number of rows
    torch.testing.assert_close(
        got.sum(-1).double(), torch.full((b, hkv), hq // hkv * q_len, dtype=torch.float64), rtol=1e-5, atol=0
    )


@needs_triton
def test_kernel_reads_strided_inputs(interpreted):
    q, k = qk(b=1, hq=4, hkv=2, q_len=29, kv_len=29, d=16, seed=9)
    torch.testing.assert_close(interpreted["strided"].double(), slow_attention_scores(q, k, 0.3), rtol=2e-5, atol=2e-5)


@needs_triton
def test_h2o_with_the_kernel_keeps_what_the_torch_path_keeps(interpreted):
    """H2O's prompt with score_kernel="triton": the attention keeps each row's log-sum-exp (flash kernel) and
    the scores skip their own first pass; scores, kept entries and logits match the torch path."""
    kernel, reference = interpreted["h2o_triton"], interpreted["h2o_torch"]
    assert len(kernel) == len(reference) > 0
    for (s_k, keys_k), (s_t, keys_t) in zip(kernel, reference):
        assert keys_k.shape[-2] == 16  # evicted to the budget
        torch.testing.assert_close(s_k, s_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(keys_k, keys_t)  # the same entries kept, per layer and KV head
    # the prompt's attention (flash kernel keeping the rows' log-sum-exp for the scores) is the same attention
    torch.testing.assert_close(interpreted["h2o_logits_triton"], interpreted["h2o_logits_torch"], rtol=1e-5, atol=1e-5)


# --- dispatch (no Triton needed) ---------------------------------------------------------------


def test_auto_stays_on_torch_off_the_gpu():
    """On the CPU, "auto" is the torch path (here Triton, when installed, was imported to compile, not interpret:
    a wrong dispatch would raise)."""
    q, k = qk(q_len=KERNEL_MIN_QUERIES, kv_len=KERNEL_MIN_QUERIES + 3, hq=2, hkv=1, b=1)
    torch.testing.assert_close(
        attention_scores(q, k, 0.2, kernel="auto"), attention_scores(q, k, 0.2, kernel="torch"), rtol=0, atol=0
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kernel="cuda"), "kernel must be one of .*'cuda'"),
        (dict(kernel="triton", attention_mask=random_mask(2, 9, 23)), "takes no attention_mask"),
    ],
)
def test_bad_kernel_arguments(kwargs, match):
    q, k = qk()
    with pytest.raises(ValueError, match=match):
        attention_scores(q, k, 0.4, **kwargs)


def test_h2o_rejects_an_unknown_score_kernel():
    with pytest.raises(InputError, match="score_kernel must be one of .*'fused'"):
        H2O(score_kernel="fused").validate(tiny_model(), 8)


@needs_triton
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_kernels_compile_for_an_h100(dtype):
    """Both kernels lower to an sm_90 binary (no GPU needed): the GPU-only code path (tensor-core tl.dot,
    loops with run-time bounds) at Llama's head dim, in the autotuner's largest block shape."""
    from tokensieve.kernels import scoring_kernel as sk

    if sk.INTERPRETED:
        pytest.skip("this process imported Triton in interpreter mode")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bm, bn, warps, stages = max(sk.GPU_CONFIGS)
    scalars = dict.fromkeys(
        ["q_len", "kv_len", "offset", "group", "hkv", "sqb", "sqh", "sqn", "sqd", "skb", "skh", "skn", "skd"], "i32"
    ) | {"scale2": "fp32"}
    const = dict(D=128, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=128, PRECISION="tf32", UPCAST=False)
    for fn, ptrs in ((sk._ROW_LSE, ["Q", "K", "LSE"]), (sk._COLUMN_SUMS, ["Q", "K", "LSE", "OUT"])):
        sig = (
            {p: f"*{dtype}" if p in ("Q", "K") else "*fp32" for p in ptrs} | scalars | dict.fromkeys(const, "constexpr")
        )
        compiled = triton.compile(
            ASTSource(fn=fn, signature=sig, constexprs=const),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": warps, "num_stages": stages, "enable_fp_fusion": True},
        )
        assert compiled.asm["cubin"] and compiled.metadata.shared > 0


def test_h2o_asks_for_triton_when_it_is_missing(monkeypatch):
    from tokensieve.kernels import scoring_kernel

    monkeypatch.setattr(scoring_kernel, "triton", None)
    with pytest.raises(InputError, match="score_kernel='triton' needs Triton"):
        H2O(score_kernel="triton").validate(tiny_model(), 8)
    H2O(score_kernel="auto").validate(tiny_model(), 8)  # auto falls back to the torch path
