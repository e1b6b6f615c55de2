"""Benchmarks: time, memory and batch throughput on real shapes (``timing``) and the memory-bandwidth
roofline of a decoding step (``roofline``).

Until the next release, the names the old module ``tokensieve.bench`` held are served from here with a
``DeprecationWarning`` naming ``tokensieve.bench.timing``.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from tokensieve._moved import forward

    return forward(__name__, name)
