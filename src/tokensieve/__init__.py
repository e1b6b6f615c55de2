"""tokensieve: fast long-context inference by computing on fewer tokens.

Three lines to use it in your own ``transformers`` code::

    import tokensieve
    model, tok = tokensieve.load_model("smollm2")          # or any local model folder / .gguf
    res = tokensieve.generate(model, tok, prompt, method="gemfilter", topk=1024)
"""

from tokensieve.attention import use_tokensieve_attention
from tokensieve.methods import METHODS, Method, make_method
from tokensieve.models import ModelLoadError, load_model
from tokensieve.errors import InputError, PromptTooLongError
from tokensieve.runner import GenerationResult, Sampling, encode_prompt, generate, score_continuation, selection_text

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "GenerationResult",
    "InputError",
    "Method",
    "ModelLoadError",
    "PromptTooLongError",
    "Sampling",
    "encode_prompt",
    "generate",
    "load_model",
    "make_method",
    "score_continuation",
    "selection_text",
    "use_tokensieve_attention",
]
