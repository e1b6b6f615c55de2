"""Decoding on static KV buffers with a captured step (``static``: the static decoders and their pool).

Until the next release, the names the old module ``tokensieve.decode`` held are served from here with a
``DeprecationWarning`` naming ``tokensieve.decode.static``.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from tokensieve._moved import forward

    return forward(__name__, name)
