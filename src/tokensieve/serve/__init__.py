"""An OpenAI-compatible HTTP server over tokensieve (``tokensieve serve``; see docs/serve.md).

``create_app(model, tokenizer, ...)`` (in :mod:`tokensieve.serve.app`) builds a FastAPI app that owns
its engine (one worker thread, a bounded queue) and its Prometheus registry. Importing this package
does not import FastAPI; ``from tokensieve.serve.app import create_app`` does.
"""

from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str):  # lazy: keep ``import tokensieve.serve`` free of FastAPI and torch
    if name == "create_app":
        from tokensieve.serve.app import create_app

        return create_app
    raise AttributeError(name)
