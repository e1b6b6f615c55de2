"""Dequantize GGUF files into plain transformers folders (what an embedded model's first load stores), for the GPU
scripts that carry weights in pieces: ``python3 benchmarks/gguf_copy.py A.gguf:DIR_A [B.gguf:DIR_B ...]``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from tokensieve.core.models import store_gguf_copy  # noqa: E402


def main(pairs: list[str]) -> int:
    if not pairs or any(":" not in p for p in pairs):
        print("usage: gguf_copy.py FILE.gguf:OUT_DIR [...]", file=sys.stderr)
        return 2
    for pair in pairs:
        gguf, out = pair.rsplit(":", 1)
        store_gguf_copy(Path(gguf), Path(out))
        print(f"{gguf} -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
