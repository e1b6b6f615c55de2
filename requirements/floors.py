"""Print pip constraints pinning every floor (``name>=X`` -> ``name==X``) of pyproject's dependencies and the
extras a user installs (not ``test``'s tools, not ``vllm``), for ``make test-oldest``.

Usage: python requirements/floors.py [pyproject.toml] [--torch VERSION]. torch is pinned to ``--torch``
(the CPU build the suite runs on) instead of its floor.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

USER_EXTRAS = ("serve", "plots", "gguf", "multigpu", "eval")
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*)(;.*)?$")


def floors(pyproject: Path, torch: str | None) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in USER_EXTRAS:
        reqs += project["optional-dependencies"][extra]
    out = []
    for req in reqs:
        m = _REQ.match(req)
        if m is None:
            raise SystemExit(f"floors.py: cannot parse requirement {req!r}")
        name, spec = m.group(1), m.group(3)
        if name == "tokensieve":
            continue
        if name == "torch" and torch:
            out.append(f"torch=={torch}")
            continue
        floor = re.search(r">=\s*([0-9][^,\s]*)", spec)
        if floor:
            out.append(f"{name}=={floor.group(1)}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pyproject", nargs="?", default="pyproject.toml")
    ap.add_argument("--torch", default=None, help="pin torch to this version instead of its floor")
    a = ap.parse_args()
    print("\n".join(floors(Path(a.pyproject), a.torch)))
