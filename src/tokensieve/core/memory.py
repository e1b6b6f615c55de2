"""Peak-memory measurement: CUDA max allocated on GPU, peak RSS growth on CPU."""

from __future__ import annotations

import ctypes
import os
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def release_free_memory() -> None:
    """Return the C allocator's free memory to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Resident-memory growth is only a measure of what a block allocates when memory freed before it is
    not sitting in the allocator, ready to be reused without growing the process.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Context manager measuring peak memory of the block.

    On CUDA: ``torch.cuda.max_memory_allocated`` (absolute, weights included).
    On CPU: the growth of resident memory over its value at entry, sampled
    every ``interval_s`` by a thread (so very short spikes may be missed).
    """

    def __init__(self, device: torch.device | str, interval_s: float = 0.002):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_free_memory()  # else memory freed by an earlier run is reused unseen and the growth reads ~0
            self._base = rss_bytes()
            self._max = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self._max = max(self._max, rss_bytes())
            self.peak_bytes = int(self._max - self._base)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
