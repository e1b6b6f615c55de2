"""All methods, by name: the registry. A new method joins with one line in ``registry.BUILTIN`` (or, from outside the
package, with :func:`register`).

Importing this package imports no method module (nor torch): the registry knows where each built-in class
lives and imports it on first use, so the command line can list the names before anything heavy loads.
What a method can do is asked from its class's ``capabilities`` (:func:`capable`), never from its name.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from typing import TYPE_CHECKING, Any

from tokensieve.errors import InputError
from tokensieve.methods.registry import BUILTIN, METHODS, Registry, capable, register, unregister

if TYPE_CHECKING:
    from tokensieve.methods.base import DecodeState, Method  # noqa: F401

# class name -> module of the names this package exports (imported on first use, PEP 562)
_LAZY: dict[str, str] = {
    "Method": "tokensieve.methods.base",
    "DecodeState": "tokensieve.methods.base",
    "Capabilities": "tokensieve.methods.base",
    "rename_params": "tokensieve.methods.base",
    **{where.split(":")[1]: where.split(":")[0] for where in BUILTIN.values()},
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def method_class(name: str) -> type[Method]:
    """The registered class of method ``name`` (``InputError`` naming the choices otherwise)."""
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; expected one of: {', '.join(METHODS)}")
    return METHODS[name]


def parameter_names(name: str) -> list[str]:
    """The parameters method ``name`` takes, in declaration order (current names only)."""
    return [f.name for f in dataclasses.fields(method_class(name))]


def accepted_params(name: str) -> set[str]:
    """Every parameter name ``make_method(name, ...)`` accepts: current names and deprecated old ones."""
    return set(parameter_names(name)) | set(method_class(name).renamed)


def canonical_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with deprecated names replaced by current ones (a ``FutureWarning`` per old name).

    Raises ``InputError`` for a name the method does not have, or for an old and a new
    name given together.
    """
    from tokensieve.methods.base import rename_params

    cls = method_class(name)
    return rename_params(name, cls.renamed, parameter_names(name), params, stacklevel=4)


def make_method(method: str | Method, **params: Any) -> Method:
    """A method instance from its name (or an instance) and parameters; ``InputError`` for unknown ones."""
    from tokensieve.methods.base import Method

    if isinstance(method, Method):
        return dataclasses.replace(method, **canonical_params(method.name, params)) if params else method
    return method_class(method)(**canonical_params(method, params))


def parameter_docs(name: str) -> dict[str, str]:
    """{parameter: its text} from the "Parameters:" section of method ``name``'s class docstring (entries
    ``name: text`` indented one level, continuation lines deeper), each joined into one line. The
    docstrings are the one place a parameter's meaning is written; ``tokensieve methods`` shows them."""
    out: dict[str, str] = {}
    inside, current = False, None
    for line in (inspect.getdoc(method_class(name)) or "").splitlines():
        if not inside:
            inside = line.strip() == "Parameters:"
            continue
        entry = re.match(r"^    (\w+): (.*)$", line)
        if entry:
            current = entry.group(1)
            out[current] = entry.group(2).strip()
        elif current is not None and line.startswith("        "):
            out[current] += " " + line.strip()
        elif line.strip() or out:
            break
    return out


def short_meaning(text: str, width: int = 100) -> str:
    """The first sentence of a parameter's text, without reST markup, cut to ``width`` characters."""
    text = text.replace("``", "`")
    first = re.split(r"(?<=\.)\s(?=[A-Z])", text, maxsplit=1)[0]  # a sentence, not "q . k" in a formula
    return first if len(first) <= width else first[: width - 3].rstrip() + "..."


def describe_methods(names: list[str] | None = None) -> list[dict[str, Any]]:
    """Each method (all registered ones by default): ``name``, ``summary`` (the docstring's first line) and its
    ``parameters``, each with ``name``, ``default`` (as the dataclass declares it), ``meaning`` (first sentence)
    and ``doc`` (the whole entry of the docstring's "Parameters:" section)."""
    out = []
    for name in names if names is not None else list(METHODS):
        cls = method_class(name)
        docs = parameter_docs(name)
        params = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            doc = docs.get(f.name, "")
            params.append(
                {
                    "name": f.name,
                    "default": list(default) if isinstance(default, tuple) else default,
                    "meaning": short_meaning(doc),
                    "doc": doc,
                }
            )
        summary = (inspect.getdoc(cls) or "").splitlines()
        out.append(
            {
                "name": name,
                "summary": summary[0].replace("``", "`") if summary else "",
                "parameters": params,
                "renamed": dict(cls.renamed),
            }
        )
    return out


__all__ = [
    "METHODS",
    "Method",
    "DecodeState",
    "Capabilities",
    "Registry",
    "accepted_params",
    "capable",
    "register",
    "unregister",
    "canonical_params",
    "describe_methods",
    "make_method",
    "method_class",
    "parameter_docs",
    "parameter_names",
    "short_meaning",
    "FullAttention",
    "GemFilter",
    "H2O",
    "LazyLLM",
    "SepLLM",
    "SnapKV",
    "StreamingLLM",
]
