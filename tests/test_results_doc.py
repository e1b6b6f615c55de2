"""docs/results.md is what benchmarks/results_doc.py renders from the committed results: no table drifts from its file."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "results_doc.py"


def run(*args):
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def test_committed_results_page_is_up_to_date():
    r = run("--check")
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_fails_on_a_changed_number(tmp_path):
    page = (ROOT / "docs" / "results.md").read_text()
    assert "| 8k | 0.257 s |" in page  # full attention's 8k TTFT, gemfilter_flex_h100.json
    stale = tmp_path / "results.md"
    stale.write_text(page.replace("| 8k | 0.257 s |", "| 8k | 0.250 s |"))
    r = run("--check", "--output", str(stale))
    assert r.returncode == 1
    assert "out of date" in r.stderr and "0.257 s" in r.stdout


def test_check_fails_on_a_changed_readme_headline_table(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert "<!-- results:bench_compiled_e2e -->" in readme and "**15.28 s**" in readme  # full attention, e2e 128k
    stale = tmp_path / "README.md"
    stale.write_text(readme.replace("**15.28 s**", "**12.00 s**"))
    r = run("--check", "--readme", str(stale))
    assert r.returncode == 1
    assert "README.md is out of date" in r.stderr and "15.28 s" in r.stdout


def test_unknown_table_in_template_is_refused(tmp_path):
    template = tmp_path / "t.md"
    template.write_text("# x\n{{no_such_table}}\n")
    r = run("--template", str(template), "--output", str(tmp_path / "out.md"))
    assert r.returncode != 0 and "no_such_table" in r.stderr
