"""Time and memory benchmarks on real model shapes with random weights.

Time and memory do not depend on weight values, so a model built from a real
architecture's config with random weights gives true figures without the
checkpoint. ``run_bench`` measures, per method and prompt length: TTFT (median
of ``repeats`` runs after a warm-up, device-synchronised), peak memory, KV
bytes after prefill, the median and p90 of ``decode_tokens`` decoding steps, their
roofline (``tokensieve.bench.roofline``: the bytes a step must read at the device bandwidth
measured in the same run) and the end-to-end latency of an ``answer_tokens`` answer.
``run_batch_bench`` measures batch throughput: ``batch`` prompts of one length answered together
(``generate_batch``), generated tokens per second at each batch size and the ratio to batch 1.
"""

from __future__ import annotations

import gc
import json
import platform
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from tokensieve.bench.roofline import copy_bandwidth, decode_step_bytes, median, p90, roofline_step_s, weights_bytes
from tokensieve.core.attention import use_tokensieve_attention
from tokensieve.decode.static import DecoderPool
from tokensieve.engine.runner import generate, generate_batch
from tokensieve.errors import InputError, check_int
from tokensieve.methods import Method, make_method

# Real architectures' shapes (config values from their published config.json files).
SHAPES: dict[str, dict[str, Any]] = {
    "llama3.1-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
    ),
    "llama3.1-70b": dict(
        model_type="llama",
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
    ),
    "llama3.2-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    "mistral-nemo-12b": dict(
        model_type="mistral",
        hidden_size=5120,
        intermediate_size=14336,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=131072,
        rope_theta=1000000.0,
        max_position_embeddings=131072,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        rope_theta=1000000.0,
        max_position_embeddings=131072,
        use_sliding_window=False,
        tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=4096,
    ),
}


def shape_config(shape: str, layers: int | None = None) -> PretrainedConfig:
    """The transformers config of one of :data:`SHAPES`; ``layers``: its decoder stack cut (or grown) to that many."""
    if shape not in SHAPES:
        raise InputError(f"unknown shape {shape!r}; expected one of: {', '.join(SHAPES)}")
    cfg = dict(SHAPES[shape])
    if layers is not None:
        cfg["num_hidden_layers"] = check_int("layers", layers, 1, 1024)
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


# Shapes with more parameters than this are GPU-sized: `tokensieve bench` refuses them on a CPU unless --force
# (llama3.1-8b in float32 on a CPU is 32 GB of weights and hours per 8k prefill; smollm2-135m and tiny are not).
CPU_MAX_PARAMETERS = 1_000_000_000


def shape_parameters(shape: str) -> int:
    """Parameters of a model in ``shape`` (counted on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config(shape))
    return sum(p.numel() for p in model.parameters())


def build_model(
    shape: str, dtype: torch.dtype, device: str | torch.device, seed: int = 0, layers: int | None = None
) -> PreTrainedModel:
    """A causal LM in ``shape``'s architecture with random weights, built directly on ``device`` (``layers``: see
    :func:`shape_config`)."""
    config = shape_config(shape, layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    use_tokensieve_attention(model)
    return model


class _IdTokenizer:
    """The runner only needs decode/eos from a tokenizer; benchmarks feed token ids."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return ""


@dataclass
class BenchRow:
    method: str
    params: dict[str, Any]
    length: int
    status: str = "ok"  # ok | oom | error: ...
    ttft_s: float | None = None  # median
    ttft_runs: list[float] = field(default_factory=list)
    ttft_cold_s: float | None = None  # a first untimed run at this length: compiles and captures for its shapes
    peak_memory_bytes: int | None = None
    kv_bytes_prefill: int | None = None
    kv_tokens_prefill: int | None = None  # layer 0
    kept_tokens: int | None = None
    kv_kept: int | None = None  # KV entries kept after the prefill, the fullest layer (GenerationResult.kv_kept)
    decode_tokens_per_s: float | None = None  # 1 / median step time over decode_tokens steps
    decode_step_median_s: float | None = None
    decode_step_p90_s: float | None = None
    roofline_step_bytes: float | None = None  # mean bytes a step must read: weights + the KV it attends to
    roofline_step_s: float | None = None  # those bytes at the measured bandwidth: no step can be faster
    roofline_fraction: float | None = None  # roofline_step_s / decode_step_median_s
    e2e_s: float | None = None  # TTFT + the steps of an answer_tokens answer, one run, all measured
    details: dict[str, Any] = field(default_factory=dict)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_method(
    model: PreTrainedModel,
    method: Method,
    length: int,
    repeats: int = 3,
    decode_tokens: int = 128,
    seed: int = 0,
    decoders: DecoderPool | None = None,
    answer_tokens: int = 0,
    bandwidth_Bps: float | None = None,
    cold_run: bool = False,
) -> BenchRow:
    """One cell: with ``cold_run``, first one run at this length whose TTFT is kept apart (``ttft_cold_s``:
    kernels compiled or graphs captured for this length's shapes, e.g. GemFilter's FlexAttention local pass,
    are paid there, never in the figures); then ``repeats`` prefills (median TTFT); the last one goes on
    decoding for ``decode_tokens`` steps
    (median/p90 step, and the roofline when ``bandwidth_Bps`` is given) and, when ``answer_tokens`` > 0, until
    an answer of that many tokens (``e2e_s``: that run's TTFT + its first ``answer_tokens - 1`` steps).

    Steps are timed by the runner, device-synchronised per step: greedy choice reads each token back to the
    host anyway, so the synchronisation costs nothing that a real answer would not pay.
    """
    device = model.device
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed + length)
    ids = torch.randint(0, vocab, (1, length), generator=g)
    tok = _IdTokenizer()
    row = BenchRow(method=method.name, params=method.params(), length=length)
    try:
        runs = []
        last_tokens = max(decode_tokens + 1, answer_tokens, 1)
        if cold_run:
            cold = generate(
                model, tok, ids, method=method, max_new_tokens=min(last_tokens, 2), allow_long=True, decoders=decoders
            )
            row.ttft_cold_s = cold.ttft_s
            del cold
            _free(device)
        for i in range(repeats):
            # the last run also decodes, so the prefill is never repeated just for the decode figures
            new_tokens = last_tokens if i == repeats - 1 else 1
            r = generate(model, tok, ids, method=method, max_new_tokens=new_tokens, allow_long=True, decoders=decoders)
            runs.append(r.ttft_s)
            row.peak_memory_bytes = max(row.peak_memory_bytes or 0, r.peak_memory_bytes)
            row.kv_bytes_prefill = r.kv_bytes_prefill
            row.kv_tokens_prefill = r.kv_tokens_prefill[0] if r.kv_tokens_prefill else None
            row.kept_tokens = r.kept_tokens
            row.kv_kept = r.kv_kept
            row.details = {k: v for k, v in r.details.items() if isinstance(v, (int, float, str, bool))}
            steps = r.step_times_s
            if steps and decode_tokens > 0:
                timed = steps[:decode_tokens]
                med = median(timed)
                row.decode_step_median_s, row.decode_step_p90_s = med, p90(timed)
                row.decode_tokens_per_s = 1.0 / med
                row.details["decode_step_s"] = {"median": med, "min": min(timed), "max": max(timed)}
                if bandwidth_Bps is not None:
                    # the method's own cache: what it kept at prefill, and how it grows (or not) per step
                    per_step = (r.kv_bytes_final - r.kv_bytes_prefill) / len(steps)
                    row.roofline_step_bytes = decode_step_bytes(
                        weights_bytes(model), r.kv_bytes_prefill, per_step, len(timed)
                    )
                    row.roofline_step_s = roofline_step_s(row.roofline_step_bytes, bandwidth_Bps)
                    row.roofline_fraction = row.roofline_step_s / med
            if i == repeats - 1 and answer_tokens > 0 and len(steps) >= answer_tokens - 1:
                row.e2e_s = r.ttft_s + sum(steps[: answer_tokens - 1])
            del r
            _free(device)
        row.ttft_runs = runs
        row.ttft_s = median(runs)
    except torch.OutOfMemoryError:
        row.status = "oom"
    except Exception as exc:  # a failed cell is recorded, the sweep goes on
        row.status = f"error: {type(exc).__name__}: {exc}"[:300]
    _free(device)
    return row


@dataclass
class BatchRow:
    method: str
    params: dict[str, Any]
    length: int  # prompt tokens of every row
    batch: int
    status: str = "ok"  # ok | oom | error: ...
    ttft_s: float | None = None  # the batch's prefill (+ first tokens)
    decode_s: float | None = None  # every step after that
    generated_tokens: int | None = None  # all rows together
    decode_tokens_per_s: float | None = None  # batch throughput while decoding: tokens after the first / decode_s
    e2e_tokens_per_s: float | None = None  # all generated tokens / (ttft + decode)
    per_sequence_tokens_per_s: float | None = None  # one row's decode speed
    peak_memory_bytes: int | None = None
    kept_tokens: int | None = None  # row 0
    kv_kept: int | None = None  # row 0
    details: dict[str, Any] = field(default_factory=dict)


def bench_batch(
    model: PreTrainedModel,
    method: Method,
    length: int,
    batch: int,
    decode_tokens: int = 256,
    seed: int = 0,
    decoders: DecoderPool | None = None,
) -> BatchRow:
    """``batch`` random prompts of ``length`` tokens answered together, ``decode_tokens`` tokens each (no EOS)."""
    device = model.device
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed + length)
    prompts = [torch.randint(0, vocab, (length,), generator=g) for _ in range(batch)]
    row = BatchRow(method=method.name, params=method.params(), length=length, batch=batch)
    try:
        rs = generate_batch(
            model,
            _IdTokenizer(),
            prompts,
            method=method,
            max_new_tokens=decode_tokens,
            allow_long=True,
            decoders=decoders,
        )
        r0 = rs[0]
        decode_s = sum(max((r.step_times_s for r in rs), key=len))  # the longest row: the whole decoding loop
        after_first = sum(r.generated_tokens - 1 for r in rs)
        row.ttft_s, row.decode_s = r0.ttft_s, decode_s
        row.generated_tokens = sum(r.generated_tokens for r in rs)
        row.decode_tokens_per_s = after_first / decode_s if decode_s > 0 else None
        row.e2e_tokens_per_s = r0.details.get("batch_tokens_per_s")
        row.per_sequence_tokens_per_s = r0.decode_tokens_per_s
        row.peak_memory_bytes = r0.peak_memory_bytes
        row.kept_tokens = r0.kept_tokens
        row.kv_kept = r0.kv_kept
        row.details = {k: v for k, v in r0.details.items() if isinstance(v, (int, float, str, bool))}
        del rs, r0
    except torch.OutOfMemoryError:
        row.status = "oom"
    except Exception as exc:  # a failed cell is recorded, the sweep goes on
        row.status = f"error: {type(exc).__name__}: {exc}"[:300]
    _free(device)
    return row


def _setup(
    shape: str,
    methods: dict[str, dict[str, Any]],
    dtype: torch.dtype,
    device: str | None,
    model: PreTrainedModel | None,
) -> tuple[torch.device, PreTrainedModel, float, dict[str, Method]]:
    """The device, the model (built in ``shape`` unless given), its build time, and the labelled methods."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    model = model if model is not None else build_model(shape, dtype, dev)
    build_s = time.perf_counter() - t0
    built = {
        label: make_method(spec["method"], **{k: v for k, v in spec.items() if k != "method"})
        for label, spec in methods.items()
    }
    return dev, model, build_s, built


def _result(
    shape: str,
    dtype: torch.dtype,
    model: PreTrainedModel,
    device: torch.device,
    build_s: float,
    rows: list[dict[str, Any]],
    **sweep: Any,
) -> dict[str, Any]:
    """A sweep's JSON-ready result: what was run (``sweep``), on what, and its rows."""
    return {
        "shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        **sweep,
        "model_build_s": build_s,
        "environment": environment(device),
        "weights_bytes": weights_bytes(model),
        "rows": rows,
    }


def run_batch_bench(
    shape: str,
    lengths: list[int],
    batches: list[int],
    methods: dict[str, dict[str, Any]],
    dtype: torch.dtype = torch.bfloat16,
    device: str | None = None,
    decode_tokens: int = 256,
    warmup_length: int = 1024,
    model: PreTrainedModel | None = None,
    progress: bool = True,
    on_row: Any = None,
) -> dict[str, Any]:
    """Batch throughput: methods x lengths x batch sizes on one model; JSON-ready, with per-cell
    ``speedup_vs_batch1`` (decode throughput over the same method and length at batch 1, when measured)."""
    for b in batches:
        check_int("batch size", b, 1)
    device, model, build_s, built = _setup(shape, methods, dtype, device, model)
    # No shared DecoderPool: each cell's static buffers (batch x capacity, up to tens of GiB) are freed after
    # it; the capture is made per cell and never counted as decode time.
    for m in built.values():  # warm-up: kernels, allocator, cuBLAS handles
        for b in batches:
            bench_batch(model, m, min(warmup_length, min(lengths)), b, decode_tokens=2)
    rows: list[dict[str, Any]] = []
    cells = [(n, label, b) for n in lengths for label in built for b in batches]
    for n, label, b in tqdm(cells, desc=f"batch bench {shape}", disable=not progress):
        row = bench_batch(model, built[label], n, b, decode_tokens=decode_tokens)
        base = next(
            (
                r
                for r in rows
                if r["label"] == label and r["length"] == n and r["batch"] == 1 and r["decode_tokens_per_s"]
            ),
            None,
        )
        speedup = row.decode_tokens_per_s / base["decode_tokens_per_s"] if base and row.decode_tokens_per_s else None
        rows.append({"label": label, **row.__dict__, "speedup_vs_batch1": speedup})
        if on_row is not None:
            on_row(rows)
    return _result(
        shape, dtype, model, device, build_s, rows, lengths=lengths, batches=batches, decode_tokens=decode_tokens
    )


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def run_bench(
    shape: str,
    lengths: list[int],
    methods: dict[str, dict[str, Any]],
    dtype: torch.dtype = torch.bfloat16,
    device: str | None = None,
    repeats: int = 3,
    decode_tokens: int = 128,
    warmup_length: int = 1024,
    model: PreTrainedModel | None = None,
    progress: bool = True,
    on_row: Any = None,
    answer_tokens: int = 0,
    bandwidth_Bps: float | None = None,
    cold_runs: bool = False,
    compile: bool = False,
) -> dict[str, Any]:
    """Sweep methods x lengths on one model; returns a JSON-ready dict.

    ``cold_runs``: each cell first runs once untimed at its length (``ttft_cold_s``; see ``bench_method``).
    ``compile``: the captured decoding steps are first fused with ``torch.compile`` (``DecoderPool(compile=True)``;
    paid once per capacity bucket, in the warm-up or the cold run, never in a timed figure).

    ``methods`` maps a label to ``{"method": name, **params}``; the label lets one
    method appear with several settings (e.g. GemFilter chunked for 1M tokens).
    ``answer_tokens`` (0: none; the CLI's default is 256) is the answer whose end-to-end latency
    each cell measures.
    The device's copy bandwidth (``bandwidth_gb_s``, the roofline's denominator) is measured
    once, in this run, unless ``bandwidth_Bps`` gives it.
    """
    for name, v in (("decode_tokens", decode_tokens), ("answer_tokens", answer_tokens)):
        check_int(name, v, 0, note=" (0 skips it)")
    device, model, build_s, built = _setup(shape, methods, dtype, device, model)
    if bandwidth_Bps is None and decode_tokens > 0:
        bandwidth_Bps = copy_bandwidth(device)
    rows: list[dict[str, Any]] = []
    pool = DecoderPool(model, compile=compile)  # captured decoding steps, one per capacity bucket, reused across cells
    for m in built.values():  # warm-up: kernels, allocator, cuBLAS handles
        bench_method(model, m, min(warmup_length, min(lengths)), repeats=1, decode_tokens=2, decoders=pool)
    cells = [(n, label) for n in lengths for label in built]
    for n, label in tqdm(cells, desc=f"bench {shape}", disable=not progress):
        row = bench_method(
            model,
            built[label],
            n,
            repeats=repeats,
            decode_tokens=decode_tokens,
            decoders=pool,
            answer_tokens=answer_tokens,
            bandwidth_Bps=bandwidth_Bps,
            cold_run=cold_runs,
        )
        rows.append({"label": label, **row.__dict__})
        if on_row is not None:
            on_row(rows)
    return _result(
        shape,
        dtype,
        model,
        device,
        build_s,
        rows,
        lengths=lengths,
        repeats=repeats,
        decode_tokens=decode_tokens,
        answer_tokens=answer_tokens,
        bandwidth_gb_s=bandwidth_Bps / 1e9 if bandwidth_Bps else None,
        compile=compile,
    )


def save(result: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
