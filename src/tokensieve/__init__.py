"""tokensieve: fast long-context inference by computing on fewer tokens.

Three lines to use it in your own ``transformers`` code::

    import tokensieve
    model, tok = tokensieve.load_model("smollm2")          # or any local model folder / .gguf
    res = tokensieve.generate(model, tok, prompt, method="gemfilter", topk=1024)

The names below are imported on first use (PEP 562), so ``import tokensieve``
(and the command line's argument parsing) does not import torch or transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from tokensieve import _moved

_moved.install()  # old module paths (tokensieve.runner, ...) keep working for one release, with a warning

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "METHODS": "tokensieve.methods",
    "Method": "tokensieve.methods",
    "make_method": "tokensieve.methods",
    "ModelLoadError": "tokensieve.core.models",
    "load_model": "tokensieve.core.models",
    "GenerationResult": "tokensieve.engine.runner",
    "Sampling": "tokensieve.engine.runner",
    "encode_prompt": "tokensieve.engine.runner",
    "generate": "tokensieve.engine.runner",
    "generate_batch": "tokensieve.engine.runner",
    "score_continuation": "tokensieve.engine.runner",
    "selection_text": "tokensieve.engine.runner",
    "InputError": "tokensieve.errors",
    "PromptTooLongError": "tokensieve.errors",
    "use_tokensieve_attention": "tokensieve.core.attention",
    "AttentionSwitchedWarning": "tokensieve.core.attention",
    "apply": "tokensieve.integrations.hf",
    "pipeline": "tokensieve.integrations.hf",
    "register_pipeline_task": "tokensieve.integrations.hf",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these come from __getattr__
    from tokensieve.core.attention import AttentionSwitchedWarning, use_tokensieve_attention  # noqa: F401
    from tokensieve.core.models import ModelLoadError, load_model  # noqa: F401
    from tokensieve.engine.runner import (  # noqa: F401
        GenerationResult,
        Sampling,
        encode_prompt,
        generate,
        generate_batch,
        score_continuation,
        selection_text,
    )
    from tokensieve.errors import InputError, PromptTooLongError  # noqa: F401
    from tokensieve.integrations.hf import apply, pipeline, register_pipeline_task  # noqa: F401
    from tokensieve.methods import METHODS, Method, make_method  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"tokensieve.{name}") is not None:
        return importlib.import_module(f"tokensieve.{name}")  # a submodule, e.g. tokensieve.methods
    raise AttributeError(f"module 'tokensieve' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | {m.name for m in pkgutil.iter_modules(__path__)})
