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
    assert "tokensieve.streaming" in graph and "tokensieve.scoring" in graph  # the walk found the package
    for name in graph:
        assert name not in reachable(graph, name), f"{name} imports itself through {sorted(reachable(graph, name))}"


def test_cache_scoring_and_streaming_do_not_import_evaluation_or_commands():
    graph = import_graph()
    for name in ("tokensieve.streaming", "tokensieve.scoring", "tokensieve.cache", "tokensieve.rope"):
        bad = [m for m in reachable(graph, name) if m.startswith(("tokensieve.evaluation", "tokensieve.commands"))]
        assert not bad, f"{name} imports {bad}"
    assert reachable(graph, "tokensieve.scoring") == set()  # scoring stands on torch alone


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages([str(ROOT)], prefix="tokensieve.")]
    assert "tokensieve.evaluation.stream_ppl" in names
    for name in names:
        importlib.import_module(name)


def test_importing_streaming_first_loads_no_evaluation_module():
    code = (
        "import sys, tokensieve.streaming\n"
        "print(sorted(m for m in sys.modules if m.startswith(('tokensieve.evaluation', 'tokensieve.commands'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT.parent)})
    assert out.stdout.strip() == "[]"


def all_imports(path: Path) -> set[str]:
    """Every tokensieve module ``path`` imports anywhere (module level, inside functions, under TYPE_CHECKING)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "tokensieve")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tokensieve":
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_commands_import_the_server_only_in_the_serve_command():
    files = module_files()
    commands = {name: path for name, path in files.items() if name.startswith("tokensieve.commands.")}
    assert "tokensieve.commands.serve" in commands and "tokensieve.commands.ask" in commands
    users = {name for name, path in commands.items()
             if any(m == "tokensieve.serve" or m.startswith("tokensieve.serve.") for m in all_imports(path))}
    assert users == {"tokensieve.commands.serve"}, users


def test_the_detokenizer_lies_below_the_cli_and_the_server():
    graph = import_graph()
    assert "tokensieve.detokenize" in graph["tokensieve.serve.jobs"]
    assert not [m for m in reachable(graph, "tokensieve.detokenize") if m.startswith(("tokensieve.serve", "tokensieve.commands"))]
