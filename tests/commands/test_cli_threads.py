"""The thread count of the commands that run a model: --threads, OMP_NUM_THREADS, the small-machine default."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import TESTS

from tokensieve.commands.common import SMALL_MACHINE_CORES, SMALL_MACHINE_THREADS, default_threads

SRC = TESTS.parent / "src"

# `tokensieve -v ask ...` in a fresh process whose `ask` reports torch's thread count instead of loading a model:
# what the command would compute with, set before torch was imported (the CLI imports it after its "loading" line).
PROBE = (
    "import sys\n"
    "import tokensieve.commands.ask as ask\n"
    "def report(args):\n"
    "    assert 'torch' not in sys.modules, 'torch imported before the command ran'\n"
    "    from tokensieve.commands.common import announce_loading\n"
    "    announce_loading(args, 'nothing')  # what every command does before it loads a model\n"
    "    import torch\n"
    "    print('threads', torch.get_num_threads())\n"
    "    return 0\n"
    "ask.run = report\n"
    "from tokensieve.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def probe(*argv: str, omp: str | None = None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"PYTHONPATH": str(SRC)}
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    p = subprocess.run(
        [sys.executable, "-c", PROBE, "-v", "ask", "--file", __file__, "--question", "q", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    return int(p.stdout.split()[-1]), p.stderr


def test_threads_flag_sets_torch_threads_and_says_so_with_v():
    n, err = probe("--threads", "3")
    assert n == 3 and "using 3 torch thread(s) (--threads)" in err


def test_omp_num_threads_is_left_to_torch():
    n, err = probe(omp="2")
    assert n == 2 and "OMP_NUM_THREADS=2" in err


def test_default_without_flag_or_environment():
    n, err = probe()
    want = default_threads(os.cpu_count())
    if want is None:  # a bigger machine: torch's own default, said so
        assert "torch's default" in err and n >= 1
    else:
        assert n == want == SMALL_MACHINE_THREADS and "the default on a machine with" in err


def test_default_rule():
    assert default_threads(1) == default_threads(SMALL_MACHINE_CORES) == SMALL_MACHINE_THREADS
    assert default_threads(SMALL_MACHINE_CORES + 1) is None and default_threads(None) is None


@pytest.mark.parametrize("bad", ["0", "-1", "two", "100000"])
def test_bad_thread_counts_exit_2_naming_the_flag(bad, capsys):
    from conftest import run_cli

    code, _, err = run_cli(["ask", "--file", __file__, "--question", "q", "--threads", bad], capsys)
    assert code == 2 and "--threads" in err and bad in err and len(err.strip().splitlines()) == 1
