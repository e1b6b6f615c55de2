"""The split-KV decode attention kernel (``tokensieve.kernels.decode_kernel``) against a slow reference, and through the
static decoder against its torch path.

As in ``test_scoring_kernel``: Triton interprets or compiles depending on how it was imported, so the kernels run
in a child process started with ``TRITON_INTERPRET=1`` that writes its results to a file checked here. Skipped
where Triton is not installed.
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

from tokensieve.decode.static import DecoderPool, StaticDecoder
from tokensieve.errors import InputError
from tokensieve.methods.h2o import HeavyHitterSlots

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (test extra, linux x86_64)")
TESTS = Path(__file__).resolve().parents[1]
SRC = TESTS.parent / "src"

# (batch, kv_heads, group, head_dim, capacity, limit, pads, dtype, split_len): a capacity that is not a multiple
# of the 16-key block, limit below the capacity (and 1), pads in the middle and on the left, group 1 / 4 / 8,
# head dims 16 / 64 / 128, the three dtypes, several splits (the last ones wholly beyond limit) and the default
# split rule (one split).
CASES = [
    (1, 2, 4, 16, 37, 37, "none", "float32", 16),
    (2, 2, 4, 64, 70, 45, "left+middle", "bfloat16", 32),
    (1, 1, 1, 128, 40, 1, "none", "float16", 16),
    (2, 1, 8, 64, 50, 33, "middle", "float32", None),
    (1, 2, 4, 128, 90, 61, "left", "bfloat16", 16),
    (3, 1, 1, 16, 33, 20, "left+middle", "float16", 16),
]
JUNK = 3e3  # keys and values at or beyond limit and in pad slots: any weight on them shows in the output


def case_inputs(i: int) -> tuple[torch.Tensor, ...]:
    """q [b, hkv, g, d], keys, values [b, hkv, cap, d] (junk where not visible), limit [1], valid [b, cap]."""
    b, hkv, g, d, cap, limit, pads, dtype, _ = CASES[i]
    gen = torch.Generator().manual_seed(i)
    q = torch.randn(b, hkv, g, d, generator=gen)
    keys = torch.randn(b, hkv, cap, d, generator=gen)
    values = torch.randn(b, hkv, cap, d, generator=gen)
    valid = torch.ones(b, cap, dtype=torch.bool)
    if "left" in pads:  # row r has r + 2 left pads
        for r in range(b):
            valid[r, : r + 2] = False
    if "middle" in pads:
        valid[:, limit // 2] = False
    hidden = (torch.arange(cap) >= limit) | ~valid  # [b, cap]
    keys[hidden[:, None].expand_as(keys[..., 0])] = JUNK
    values[hidden[:, None].expand_as(values[..., 0])] = -JUNK
    dt = getattr(torch, dtype)
    return q.to(dt), keys.to(dt), values.to(dt), torch.tensor([limit]), valid


def slow_decode_attention(q, keys, values, limit, valid, scaling) -> torch.Tensor:
    """Plain softmax attention over the visible slots (slot < limit and valid), in float64."""
    visible = (torch.arange(keys.shape[2]) < int(limit)) & valid  # [b, cap]
    logits = torch.einsum("bhgd,bhnd->bhgn", q.double(), keys.double()) * scaling
    probs = logits.masked_fill(~visible[:, None, None], float("-inf")).softmax(-1)
    return torch.einsum("bhgn,bhnd->bhgd", probs, values.double())


CHILD = r"""
import sys, torch
from conftest import tiny_model
from test_decode_kernel import CASES, case_inputs
from tokensieve.decode.slots import decoder_size, slot_state_for, without_needless_eviction
from tokensieve.decode.static import StaticDecoder, bucket
from tokensieve.kernels.decode_kernel import decode_attention_triton
from tokensieve.methods import make_method
from tokensieve.methods.base import cache_stats
from tokensieve.kernels.scoring_kernel import INTERPRETED

assert INTERPRETED
out = {}
for i, case in enumerate(CASES):
    q, k, v, limit, valid = case_inputs(i)
    out[i] = decode_attention_triton(q, k, v, limit, valid, case[3] ** -0.5, split_len=case[-1])
# a row with nothing visible (every slot a pad) next to a normal row: zeros, no NaN
q, k, v, limit, valid = case_inputs(0)
valid = torch.ones(2, k.shape[2], dtype=torch.bool)
valid[0] = False
out["empty"] = decode_attention_triton(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                                       limit, valid, 0.25, split_len=16)


def decode(model, name, params, kernel, steps, rows):
    # the runner's static path by hand: prefill, buffers sized as the runner sizes them, greedy steps
    m = make_method(name, **params)
    gen = torch.Generator().manual_seed(5)
    if len(rows) == 1:
        state = m.prefill(model, torch.randint(3, 90, (1, rows[0]), generator=gen))
    else:  # left-padded batch
        n = max(rows)
        ids = torch.zeros(len(rows), n, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for r, length in enumerate(rows):
            ids[r, n - length:] = torch.randint(3, 90, (length,), generator=gen)
            mask[r, n - length:] = 1
        state = m.prefill_batch(model, ids, mask)
    held = max(cache_stats(state.cache)[0])
    ev = without_needless_eviction(m.slot_policy(), held, steps)
    dec = StaticDecoder(model, bucket(decoder_size(ev, held, steps)), batch=len(rows), use_graph=False,
                        slots=slot_state_for(ev), attention_kernel=kernel)
    dec.load(state.cache, state.next_position if state.positions is None else state.positions, steps, state.kv_mask, ev)
    token, logits = state.logits.argmax(-1, keepdim=True), []
    for _ in range(steps):
        logits.append(dec.step(token).clone())
        token = logits[-1].argmax(-1, keepdim=True)
    return dec.kernel, torch.stack(logits)


model = tiny_model()
runs = {"full": ("full", {}, (40,)), "full_batch": ("full", {}, (30, 19)),
        "ring": ("streamingllm", {"budget": 24, "n_initial": 4}, (40,)),
        "separators": ("sepllm", {"separator_ids": (3, 4, 5, 6, 7, 8), "n_recent": 8, "n_initial": 4}, (40,))}
with torch.inference_mode():
    for label, (name, params, rows) in runs.items():
        for kernel in ("torch", "triton"):
            out[label, kernel] = decode(model, name, params, kernel, 20, rows)
# LazyLLM's decoder: the kernel in its one-token layers (pruning layers keep the probabilities' path), through the
# runner, the fixed-shape try first (so both its steps and the host-planned re-runs use it)
from conftest import TinyTokenizer, random_ids
from tokensieve.decode.static import DecoderPool
from tokensieve.engine.runner import generate, score_continuation

lazy, tok, ids = tiny_model("llama", init=0.2), TinyTokenizer(), random_ids(60, seed=4)
params = {"prune_layers": (1, 2, 4), "keep_fractions": (0.6, 0.7, 0.5)}
for kernel in ("torch", "triton"):
    pool = DecoderPool(lazy, attention_kernel=kernel, speculate=True)
    g = generate(lazy, tok, ids, "lazyllm", max_new_tokens=16, decode="static", decoders=pool, **params)
    sc = score_continuation(lazy, tok, ids[:, :-10], ids[0, -10:], "lazyllm", decode="static", decoders=pool, **params)
    out["lazy", kernel] = ([d.kernel for d in pool.decoders.values()], g.token_ids, torch.tensor(sc.nll),
                           g.details["decode_fixed_shape_steps"], g.details["decode_revival_reruns"])
torch.save(out, sys.argv[1])
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """The child process's results (kernels run by Triton's interpreter)."""
    path = tmp_path_factory.mktemp("decode_kernel") / "out.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(SRC), *map(str, TEST_DIRS)])}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(path)


@needs_triton
@pytest.mark.parametrize("i", range(len(CASES)))
def test_kernel_matches_slow_reference(interpreted, i):
    q, k, v, limit, valid = case_inputs(i)  # the reference sees the same rounded inputs (and the junk)
    got = interpreted[i]
    assert got.shape == q.shape and got.dtype == q.dtype
    ref = slow_decode_attention(q, k, v, limit, valid, CASES[i][3] ** -0.5)
    # float32 accumulation, then one rounding to the output dtype
    tol = 2e-6 if q.dtype == torch.float32 else torch.finfo(q.dtype).eps
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


@needs_triton
def test_kernel_gives_zeros_for_a_row_with_nothing_visible(interpreted):
    got = interpreted["empty"]
    assert torch.isfinite(got).all()
    assert (got[0] == 0).all()
    q, k, v, limit, valid = case_inputs(0)
    torch.testing.assert_close(
        got[1:].double(), slow_decode_attention(q, k, v, limit, valid, 0.25), rtol=2e-6, atol=2e-6
    )


@needs_triton
@pytest.mark.parametrize("label", ["full", "full_batch", "ring", "separators"])
def test_decoder_with_the_kernel_gives_the_torch_path_tokens(interpreted, label):
    """Full attention (one prompt, and a left-padded batch), StreamingLLM's ring (which wraps in 20 steps) and
    SepLLM's separators: the static step with attention_kernel="triton" gives the torch path's logits."""
    kernel, got = interpreted[label, "triton"]
    torch_kernel, ref = interpreted[label, "torch"]
    assert (kernel, torch_kernel) == ("triton", "torch")
    assert got.shape == ref.shape and got.shape[0] == 20
    assert torch.equal(got.argmax(-1), ref.argmax(-1))  # the same greedy tokens, step by step
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@needs_triton
def test_lazyllm_decoder_with_the_kernel_gives_the_torch_path_tokens(interpreted):
    kernels, tokens, nll, fixed, reruns = interpreted["lazy", "triton"]
    torch_kernels, ref_tokens, ref_nll, *_ = interpreted["lazy", "torch"]
    assert set(kernels) == {"triton"} and set(torch_kernels) == {"torch"}
    assert fixed > 0 and reruns > 0  # both kinds of step ran with the kernel
    assert tokens == ref_tokens
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)


# --- dispatch (no Triton needed) ---------------------------------------------------------------


def test_auto_is_the_torch_path_off_the_gpu():
    model = tiny_model()
    assert StaticDecoder(model, 64).kernel == "torch"
    assert StaticDecoder(model, 64, attention_kernel="torch").kernel == "torch"
    pool = DecoderPool(model, attention_kernel="torch")
    dec, made = pool.get(1, 40)
    assert made and dec.attention_kernel == "torch" and dec.kernel == "torch"


def test_bad_attention_kernel():
    with pytest.raises(InputError, match="attention_kernel must be one of .*got 'cuda'"):
        StaticDecoder(tiny_model(), 64, attention_kernel="cuda")


@needs_triton
@pytest.mark.parametrize(
    "kwargs, why",
    [
        (dict(slots=HeavyHitterSlots), "H2O's eviction needs the attention probabilities"),
    ],
)
def test_triton_is_refused_where_the_step_needs_the_torch_path(kwargs, why):
    with pytest.raises(InputError, match=f"attention_kernel='triton' cannot be used here: {why}"):
        StaticDecoder(tiny_model(), 64, attention_kernel="triton", **kwargs)


def test_triton_asked_for_without_triton(monkeypatch):
    from tokensieve.kernels import scoring_kernel

    monkeypatch.setattr(scoring_kernel, "triton", None)
    with pytest.raises(InputError, match="Triton is not installed"):
        StaticDecoder(tiny_model(), 64, attention_kernel="triton")


def test_splits_depend_on_the_capacity_only():
    from tokensieve.kernels.decode_kernel import MAX_SPLITS, SPLIT_MIN, splits_for

    assert splits_for(100, 64) == (1, 128)
    for cap in (SPLIT_MIN * 3 + 5, 4096, 131072 + 256):
        n, length = splits_for(cap, 64)
        assert n <= MAX_SPLITS and length % 64 == 0 and (n - 1) * length < cap <= n * length
    assert splits_for(131072, 64) == (MAX_SPLITS, 131072 // MAX_SPLITS)
    with pytest.raises(ValueError, match="split_len must be a positive multiple of block_n"):
        splits_for(100, 16, split_len=24)


@needs_triton
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_kernels_compile_for_an_h100(dtype):
    """Both kernels lower to an sm_90 binary (no GPU needed) at Llama-3.1-8B's decode shape (head dim 128, group
    4 padded to 16 rows) with the GPU launch settings."""
    from tokensieve.kernels import decode_kernel as dk
    from tokensieve.kernels import scoring_kernel as sk

    if sk.INTERPRETED:
        pytest.skip("this process imported Triton in interpreter mode")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    ints = [
        "group",
        "hkv",
        "cap",
        "split_len",
        "sqb",
        "sqh",
        "sqg",
        "sqd",
        "skb",
        "skh",
        "skn",
        "skd",
        "svb",
        "svh",
        "svn",
        "svd",
        "sab",
        "san",
    ]
    const = dict(D=128, BLOCK_G=16, BLOCK_N=dk.GPU_BLOCK_N, BLOCK_D=128, PRECISION="tf32", UPCAST=False)
    sig = (
        dict.fromkeys(["Q", "K", "V"], f"*{dtype}")
        | {"VALID": "*u8", "LIMIT": "*i64"}
        | dict.fromkeys(["M", "L", "ACC"], "*fp32")
        | {"scale2": "fp32"}
        | dict.fromkeys(ints, "i32")
        | dict.fromkeys(const, "constexpr")
    )
    compiled = triton.compile(
        ASTSource(fn=dk._SPLIT_PARTIALS, signature=sig, constexprs=const),
        target=target,
        options={"num_warps": dk.GPU_WARPS, "num_stages": dk.GPU_STAGES, "enable_fp_fusion": True},
    )
    assert compiled.asm["cubin"] and compiled.metadata.shared > 0
    const = dict(D=128, BLOCK_S=dk.MAX_SPLITS, BLOCK_D=128)
    sig = (
        dict.fromkeys(["M", "L", "ACC"], "*fp32")
        | {"OUT": f"*{dtype}", "group": "i32", "n_splits": "i32"}
        | dict.fromkeys(const, "constexpr")
    )
    compiled = triton.compile(
        ASTSource(fn=dk._COMBINE, signature=sig, constexprs=const),
        target=target,
        options={"num_warps": dk.GPU_WARPS, "enable_fp_fusion": True},
    )
    assert compiled.asm["cubin"]
