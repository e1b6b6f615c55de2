"""How close a decoding step comes to the hardware: the rules `tokensieve bench` and `benchmarks/decode_bench.py` share.

A decoding step of one sequence is bound by memory, not arithmetic: it must read every weight once and the
key/value entries it attends to once. ``decode_step_bytes`` counts those bytes from what a run measured (the
method's own cache after prefill, and its growth per step); ``copy_bandwidth`` measures what the device can
move; their ratio is the *roofline step*, the floor no step can beat, and ``floor / measured step`` the
fraction of it reached. Step times are summarised by ``median`` and ``p90``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from tokensieve.errors import InputError


def weights_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters that hold data (what a decoding step reads besides the KV: see ``decode_step_bytes``;
    parameters on ``meta``, as a filter-only load leaves them, are not counted)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


def median(xs: Sequence[float]) -> float:
    """The median (robust to the host-side hiccups that dominate the spread of single steps)."""
    if not xs:
        raise InputError("median of no values")
    return statistics.median(xs)


def p90(xs: Sequence[float]) -> float:
    """The 90th percentile, nearest rank below (a value that was measured, never an interpolation)."""
    if not xs:
        raise InputError("p90 of no values")
    return sorted(xs)[int(0.9 * (len(xs) - 1))]


def copy_bandwidth(device: torch.device | str, gib: float | None = None, repeats: int = 12, warmup: int = 2) -> float:
    """Bytes per second the device moves in a large copy (bytes read + bytes written), median of ``repeats``.

    CUDA: a device-to-device copy of ``gib`` GiB (default 4, or a quarter of the free memory when less),
    timed with CUDA events. CPU: a ``torch`` copy of ``gib`` GiB (default 0.25, larger than the caches)
    timed with ``perf_counter``; a rough figure (threads, NUMA and page placement move it), good for the
    order of magnitude of a CPU roofline, not for a fraction to two digits. The first ``warmup`` copies
    are not counted.
    """
    device = torch.device(device)
    if repeats <= warmup:
        raise InputError(f"repeats must exceed warmup ({warmup}), got {repeats}")
    if gib is None:
        gib = 0.25
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            gib = min(4.0, free / 4 / 2**30)
    n = max(1, int(gib * 2**30) // 2)  # bf16 elements
    a = torch.ones(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            b.copy_(a)
            e.record()
            torch.cuda.synchronize(device)
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            b.copy_(a)
            times.append(time.perf_counter() - t0)
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * n * 2 / median(times[warmup:])


def decode_step_bytes(weights_bytes: int, kv_bytes_prefill: int, kv_bytes_per_step: float, steps: int) -> float:
    """Bytes one decoding step must read, averaged over ``steps`` steps: every weight once, plus the KV entries
    the step attends to once.

    ``kv_bytes_prefill`` is the method's cache right after prefill (what it kept, not the prompt);
    ``kv_bytes_per_step`` its growth per step (one entry per layer for a growing cache, 0 for a cache that
    evicts to a fixed budget). Step ``i`` (1-based) attends the prefill's entries plus the ``i`` it added,
    so the mean over the steps is ``prefill + per_step * (steps + 1) / 2``. ``weights_bytes`` counts every
    parameter, as the README's figures do; a step reads one row of an untied input embedding, so for such
    models the floor is high by that table (1.0 of 15.0 GiB for Llama-3.1-8B).
    """
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    return weights_bytes + kv_bytes_prefill + kv_bytes_per_step * (steps + 1) / 2


def roofline_step_s(step_bytes: float, bandwidth_Bps: float) -> float:
    """The floor of a step's time: its bytes at the measured bandwidth."""
    if bandwidth_Bps <= 0:
        raise InputError(f"bandwidth must be > 0 bytes/s, got {bandwidth_Bps}")
    return step_bytes / bandwidth_Bps
