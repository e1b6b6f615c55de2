"""Old import paths of modules that moved into subpackages, kept working for one release.

``MOVED`` maps each old dotted name to its new one. :func:`install` (called by ``tokensieve/__init__.py``)
puts a finder on ``sys.meta_path`` that answers an import of an old name with the new module itself (the
same module object, so ``monkeypatch`` and ``isinstance`` see one module) and emits one
``DeprecationWarning`` naming the new path per old name and process. No file stays at an old path.

``tokensieve.decode`` and ``tokensieve.bench`` are packages now: their old module-level names are
served by :func:`forward` from the package's ``__getattr__``, with the same warning. Names that moved out
of a module (``MOVED_NAMES``: LazyLLM's decoder went beside LazyLLM) are served by :func:`moved_name` from
that module's ``__getattr__``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

# old dotted name -> new dotted name (removed in the release after 0.1)
MOVED: dict[str, str] = {
    "tokensieve.attention": "tokensieve.core.attention",
    "tokensieve.cache": "tokensieve.core.cache",
    "tokensieve.memory": "tokensieve.core.memory",
    "tokensieve.models": "tokensieve.core.models",
    "tokensieve.rope": "tokensieve.core.rope",
    "tokensieve.scoring": "tokensieve.core.scoring",
    "tokensieve.separators": "tokensieve.core.separators",
    "tokensieve.scoring_kernel": "tokensieve.kernels.scoring_kernel",
    "tokensieve.decode_kernel": "tokensieve.kernels.decode_kernel",
    "tokensieve.runner": "tokensieve.engine.runner",
    "tokensieve.prefix_cache": "tokensieve.engine.prefix_cache",
    "tokensieve.streaming": "tokensieve.engine.streaming",
    "tokensieve.vllm_adapter": "tokensieve.integrations.vllm_adapter",
    "tokensieve.filter_model": "tokensieve.integrations.filter_model",
    "tokensieve.roofline": "tokensieve.bench.roofline",
}

# module -> {name that moved out of it: the module that holds it now} (served by the module's __getattr__)
MOVED_NAMES: dict[str, dict[str, str]] = {
    "tokensieve.decode.static": {
        "LazyDecoder": "tokensieve.methods.lazyllm",
        "ROW_CHUNK": "tokensieve.methods.lazyllm",
        "supports_static": "tokensieve.engine.runner",
        "STATIC_METHODS": "tokensieve.engine.runner",
    },
}

# a package that took an old module's name -> the module that holds that old module's contents now
PACKAGE_NOW: dict[str, str] = {
    "tokensieve.decode": "tokensieve.decode.static",
    "tokensieve.bench": "tokensieve.bench.timing",
}


_PACKAGE_INIT = str(Path(__file__).with_name("__init__.py"))  # its __getattr__ imports submodules by name


def _warn(old: str, new: str) -> None:
    # Point the warning at the importing line: skip this module's frames and importlib's (warnings skips
    # importlib's bootstrap frames itself, so those are not counted).
    level, frame = 2, sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if "importlib" in name and "_bootstrap" in name:
            frame = frame.f_back
            continue
        if name not in (__file__, importlib.__file__, _PACKAGE_INIT):
            break
        level, frame = level + 1, frame.f_back
    warnings.warn(
        f"{old} moved to {new}; import it from {new} (the old path goes in the next release)",
        DeprecationWarning,
        stacklevel=level,
    )


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name in :data:`MOVED` and loads it as the new module (the same object)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # the import system overwrites __spec__; exec_module puts it back
        _warn(spec.name, new)
        return module

    def exec_module(self, module: ModuleType) -> None:
        real = module.__spec__.loader_state
        if real is not None:
            module.__spec__ = real


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` once (idempotent)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())


def moved_name(module: str, name: str) -> Any:
    """A name that moved out of ``module`` (:data:`MOVED_NAMES`), with the warning; ``AttributeError`` otherwise."""
    new = MOVED_NAMES.get(module, {}).get(name)
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(
        f"{module}.{name} moved to {new}.{name}; import it from {new} (the old path goes in the next release)",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(new), name)


def forward(package: str, name: str) -> Any:
    """An old module-level ``name`` of ``package`` (now a package, see :data:`PACKAGE_NOW`), with the warning."""
    new = PACKAGE_NOW[package]
    module = importlib.import_module(new)
    if name.startswith("__") or not hasattr(module, name):
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    warnings.warn(
        f"{package}.{name} moved to {new}.{name}; import it from {new} (the old path goes in the next release)",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(module, name)
