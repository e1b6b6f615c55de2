"""Every ```python and ```bash block of README.md runs as written.

A block runs unless the line above it is ``<!-- no-run: REASON -->`` (it is then reported as skipped with that
reason). A block under ``<!-- needs-server -->`` runs against ``tokensieve serve`` as the README's server command
starts it (SmolLM2, GemFilter), which this test starts once on a free port: the only change made to such a block is
its port, 8000 -> that port. Python blocks run in a fresh interpreter each, bash blocks with ``bash -e`` in a
scratch folder, both with ``tokensieve`` and ``python`` on PATH meaning this checkout's CLI and interpreter.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import tokensieve

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
MARK = re.compile(r"<!--\s*(no-run|needs-server)\s*:?\s*(.*?)\s*-->\s*$")
SERVE = "tokensieve serve --model smollm2 --method gemfilter --port 8000"


def blocks() -> list[tuple[str, str, str | None, str, int]]:
    """(language, code, mark, reason, line) for each python / bash block; mark is the comment right above it."""
    text = README.read_text()
    out = []
    for m in FENCE.finditer(text):
        lang, code = m.group(1), m.group(2)
        if lang not in ("python", "bash"):
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.search(before)
        line = text.count("\n", 0, m.start()) + 1
        out.append((lang, code, mark.group(1) if mark else None, mark.group(2) if mark else "", line))
    return out


BLOCKS = blocks()


def test_readme_has_the_quickstart_blocks():
    langs = [(lang, mark) for lang, _, mark, _, _ in BLOCKS]
    assert langs.count(("python", None)) >= 2  # the Python quickstart
    assert ("bash", None) in langs and ("python", "needs-server") in langs and ("bash", "needs-server") in langs
    assert any(SERVE in code for _, code, _, _, _ in BLOCKS), "the README's server command is not the one started here"
    assert all(reason for _, _, mark, reason, _ in BLOCKS if mark == "no-run"), "a no-run mark must give its reason"


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory) -> Path:
    """``tokensieve`` and ``python`` for the blocks: this checkout's CLI and this interpreter."""
    d = tmp_path_factory.mktemp("bin")
    (d / "tokensieve").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tokensieve.cli "$@"\n')
    (d / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for f in d.iterdir():
        f.chmod(0o755)
    return d


def env_for(bin_dir: Path) -> dict[str, str]:
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module")
def server(bin_dir):
    """The README's server command on a free port; yields the port."""
    try:
        tokensieve.load_model("smollm2")  # skip cleanly without the embedded weights, and warm the converted copy
    except tokensieve.ModelLoadError as exc:
        pytest.skip(str(exc))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = SERVE.replace("--port 8000", f"--port {port}").split()
    proc = subprocess.Popen(
        [str(bin_dir / cmd[0]), *cmd[1:]],
        env=env_for(bin_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"tokensieve serve did not start: {proc.stdout.read()[-2000:]}")
                time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.real_model
@pytest.mark.parametrize("lang,code,mark,reason,line", BLOCKS, ids=[f"{b[0]}@L{b[4]}" for b in BLOCKS])
def test_readme_block_runs(lang, code, mark, reason, line, bin_dir, tmp_path, request):
    if mark == "no-run":
        pytest.skip(f"README.md line {line}: {reason}")
    if mark == "needs-server":
        code = code.replace("127.0.0.1:8000", f"127.0.0.1:{request.getfixturevalue('server')}")
    else:
        try:
            tokensieve.load_model("smollm2")
        except tokensieve.ModelLoadError as exc:
            pytest.skip(str(exc))
    argv = [sys.executable, "-c", code] if lang == "python" else ["bash", "-e", "-c", code]
    r = subprocess.run(argv, cwd=tmp_path, env=env_for(bin_dir), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"README.md block at line {line} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert r.stdout.strip(), f"README.md block at line {line} printed nothing"
    if "4812" in code and "vault" in code and lang == "python":
        assert "4812" in r.stdout  # the quickstart's needle: GemFilter keeps it and SmolLM2 reads it back


def test_relative_links_in_the_documentation_resolve():
    """Every relative link of README.md, CONTRIBUTING.md and docs/*.md names a file of the repository (so a module
    or a result file that moves shows up here with the page to fix)."""
    pages = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for m in re.finditer(r"\]\(([^)\s]+)\)", page.read_text()):
            target = m.group(1).split("#")[0]
            if (
                target
                and not target.startswith(("http://", "https://", "mailto:"))
                and not (page.parent / target).exists()
            ):
                broken.append(f"{page.relative_to(ROOT)}: {m.group(1)}")
    assert len(pages) > 10
    assert not broken, "links to missing files:\n" + "\n".join(broken)
