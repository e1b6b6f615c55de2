"""The package's import graph: no cycle, and the layers point one way (the cache never imports evaluation)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import tokensieve

ROOT = Path(tokensieve.__file__).parent


def module_files() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> tokensieve modules it imports at import time (module level; not inside functions or TYPE_CHECKING)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()

        def visit(stmts: list[ast.stmt]) -> None:
            for node in stmts:
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    continue
                if isinstance(node, (ast.If, ast.Try)):
                    visit(node.body)
                    visit(node.orelse)
                    for h in getattr(node, "handlers", []):
                        visit(h.body)
                elif isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names if a.name.split(".")[0] == "tokensieve")
                elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tokensieve":
                    for a in node.names:
                        sub = f"{node.module}.{a.name}"
                        deps.add(sub if sub in files else node.module)

        visit(ast.parse(path.read_text()).body)
        graph[name] = deps
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_graph_has_no_cycle():
    graph = import_graph()
    assert "tokensieve.engine.streaming" in graph and "tokensieve.core.scoring" in graph  # the walk found the package
    for name in graph:
        assert name not in reachable(graph, name), f"{name} imports itself through {sorted(reachable(graph, name))}"


def test_cache_scoring_and_streaming_do_not_import_evaluation_or_commands():
    graph = import_graph()
    for name in (
        "tokensieve.engine.streaming",
        "tokensieve.core.scoring",
        "tokensieve.core.cache",
        "tokensieve.core.rope",
    ):
        bad = [m for m in reachable(graph, name) if m.startswith(("tokensieve.evaluation", "tokensieve.commands"))]
        assert not bad, f"{name} imports {bad}"
    assert reachable(graph, "tokensieve.core.scoring") == set()  # scoring stands on torch alone


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages([str(ROOT)], prefix="tokensieve.")]
    assert "tokensieve.evaluation.stream_ppl" in names
    for name in names:
        importlib.import_module(name)


def test_importing_streaming_first_loads_no_evaluation_module():
    code = (
        "import sys, tokensieve.engine.streaming\n"
        "print(sorted(m for m in sys.modules if m.startswith(('tokensieve.evaluation', 'tokensieve.commands'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT.parent)},
    )
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- the wings point one way

# Each wing (subpackage, or a root module) and its rank: a module imports only from its own wing or from wings
# of a lower rank, at module level or inside a function (a lazy import is still a dependency).
RANKS = {
    "errors": 0,
    "_moved": 0,
    "testing": 0,
    "kernels": 1,
    "data": 1,  # Triton kernels as torch functions; text input
    "core": 2,  # transformers glue, no method knowledge
    "decode": 3,  # static KV buffers and the captured step; knows no method
    "methods": 4,  # the registry and one module per method (LazyLLM's own decoder beside it)
    "engine": 5,  # one request, prompt -> tokens
    "integrations": 6,
    "bench": 6,
    "evaluation": 6,
    "training": 6,  # SepLLM training masks and the trainer (core, methods.sepllm, data)
    "serve": 7,
    "commands": 8,
    "cli": 9,
    "": 9,  # the package root (__init__: lazy public exports)
}


def wing(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def all_imports() -> dict[str, set[tuple[str, str]]]:
    """module -> (imported tokensieve module, imported name or "") for every import anywhere in its file."""
    files = module_files()
    out: dict[str, set[tuple[str, str]]] = {}
    for name, path in files.items():
        found: set[tuple[str, str]] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update((a.name, "") for a in node.names if a.name.split(".")[0] == "tokensieve")
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tokensieve":
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    found.add((sub, "") if sub in files else (node.module, a.name))
        out[name] = found
    return out


def test_every_wing_has_a_rank():
    assert {wing(m) for m in module_files()} == set(RANKS)


def test_wings_import_only_downward():
    bad = []
    for name, imports in all_imports().items():
        for target, _ in imports:
            if target == "tokensieve" or wing(target) == wing(name):
                continue
            if RANKS[wing(target)] >= RANKS[wing(name)]:
                bad.append(f"{name} imports {target}")
    assert not bad, "\n".join(bad)


def test_core_and_kernels_import_nothing_above_them():
    imports = all_imports()
    for name in imports:
        if wing(name) == "kernels":
            assert {wing(t) for t, _ in imports[name]} <= {"kernels", "errors"}, name
        if wing(name) == "core":
            assert {wing(t) for t, _ in imports[name]} <= {"core", "kernels", "errors"}, name


def test_no_module_imports_a_private_name_from_another_file():
    bad = [
        f"{name} imports {n} from {target}"
        for name, imports in all_imports().items()
        for target, n in imports
        if n.startswith("_") and not n.startswith("__") and target != "tokensieve"
    ]
    assert not bad, "\n".join(bad)


def test_decode_imports_no_method_module():
    bad = [
        f"{name} imports {t}"
        for name, imports in all_imports().items()
        if wing(name) == "decode"
        for t, _ in imports
        if wing(t) == "methods"
    ]
    assert not bad, "\n".join(bad)


def test_nothing_below_the_methods_names_a_method():
    """No string constant in core/, kernels/ or decode/ (docstrings aside) is a registered method's name: what a
    method can do is asked from its capabilities."""
    from tokensieve.methods import METHODS

    names, bad = set(METHODS), []
    for name, path in module_files().items():
        if wing(name) not in ("core", "kernels", "decode"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body
            and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)
        }
        bad += [
            f"{name}:{c.lineno} {c.value!r}"
            for c in ast.walk(tree)
            if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value in names and id(c) not in docstrings
        ]
    assert len(names) >= 7 and not bad, "\n".join(bad)


def test_commands_import_the_server_only_in_the_serve_command():
    imports = all_imports()
    commands = [name for name in imports if name.startswith("tokensieve.commands.")]
    assert "tokensieve.commands.serve" in commands and "tokensieve.commands.ask" in commands
    users = {name for name in commands if any(wing(target) == "serve" for target, _ in imports[name])}
    assert users == {"tokensieve.commands.serve"}, users


def test_the_detokenizer_lies_below_the_cli_and_the_server():
    imports = all_imports()
    for user in ("tokensieve.serve.jobs", "tokensieve.commands.ask", "tokensieve.commands.chat"):
        assert ("tokensieve.engine.detokenize", "TextStream") in imports[user], user
    graph = import_graph()
    assert not [m for m in reachable(graph, "tokensieve.engine.detokenize") if wing(m) in ("serve", "commands")]


# words that name an eviction rule or a method's slot state; decode/ is generic over slot policies (decode.slots)
EVICTION_WORDS = {"ring", "heavy", "hitter", "hitters", "sink", "sinks", "separator", "separators", "sep", "recent"}


def test_decode_names_no_eviction_rule():
    """decode/ branches on no eviction kind: no identifier, attribute or string constant in it (docstrings and
    comments aside) contains a word naming an eviction rule or a method; the rules are the methods' slot policies."""
    import re

    from tokensieve.methods import METHODS

    words, bad = EVICTION_WORDS | set(METHODS), []
    files = {name: path for name, path in module_files().items() if wing(name) == "decode"}
    assert "tokensieve.decode.slots" in files and "tokensieve.decode.static" in files
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body
            and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                text = node.value
            elif isinstance(node, ast.Name):
                text = node.id
            elif isinstance(node, ast.Attribute):
                text = node.attr
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.arg)):
                text = getattr(node, "name", None) or node.arg
            else:
                continue
            hits = {w for w in re.split(r"[^a-z0-9]+", text.lower()) if w in words}
            if hits:
                bad.append(f"{name}:{node.lineno} {text!r} ({', '.join(sorted(hits))})")
    assert not bad, "\n".join(bad)


def test_each_evicting_method_owns_its_slot_policy():
    """Every method that evicts on the static path returns a slot policy defined in its own module (next to its
    eager rule), whose state type is defined there too; methods that grow return none."""
    import inspect

    from conftest import random_ids, tiny_model

    from tokensieve.decode.slots import SlotPolicy, SlotState
    from tokensieve.methods import METHODS, make_method
    from tokensieve.testing import byte_tokenizer

    model, tokenizer = tiny_model(), byte_tokenizer()
    evicting = [n for n, cls in METHODS.items() if cls.capabilities.static_decode == "evict"]
    assert len(evicting) >= 3
    for name, cls in METHODS.items():
        m = make_method(name)
        m.prepare(model, tokenizer)
        m.prefill(model, random_ids(12))  # as the driver does before it asks (SepLLM's separators are known then)
        policy = m.slot_policy()
        if name not in evicting:
            assert policy is None, name
            continue
        assert isinstance(policy, SlotPolicy) and issubclass(policy.state_type, SlotState), name
        assert inspect.getmodule(type(policy)) is inspect.getmodule(cls), name
        assert inspect.getmodule(policy.state_type) is inspect.getmodule(cls), name
        assert policy.state_type is not SlotState, name
