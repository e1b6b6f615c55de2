"""Every Python example of ``docs/hf.md`` runs as written (in order, one namespace) on the embedded SmolLM2."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "hf.md"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


def test_the_page_has_examples_for_apply_gemfilter_and_the_pipeline():
    code = "\n".join(examples())
    for needle in (
        'tokensieve.apply(model, "snapkv"',
        "last_selection",
        "tokensieve.pipeline(",
        "lazyllm",
        "transformers.pipeline(task",
    ):
        assert needle in code


def test_examples_run_as_written(smollm2, capsys):
    namespace: dict = {}
    for i, block in enumerate(examples()):
        try:
            exec(compile(block, f"{PAGE.name}[python block {i}]", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the failure message names the block
            pytest.fail(f"docs/hf.md python block {i} failed: {type(exc).__name__}: {exc}")
    printed = capsys.readouterr().out
    assert "lazyllm cannot run inside model.generate" in printed
    pipe = namespace["pipe"]
    assert pipe.reuse is None and pipe.last_results[0].details["prefix_cached_tokens"] > 900  # the document, reused
    assert namespace["gem"].last_selection is not None and len(namespace["gem"].last_selection) == 128
