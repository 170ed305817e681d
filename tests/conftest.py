"""Shared fixtures: tiny Hugging Face models built once per test session (nothing downloaded)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# One intra-op thread per process: the suite runs multi-rank tests on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

FAMILIES = ("qwen3", "qwen2", "llama")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """``{"qwen3": dir, "qwen2": dir, "llama": dir}``: deterministic tiny models (see tools/make_tiny_model.py)."""
    from tools.make_tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {family: make_tiny_model(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_models) -> Path:
    return tiny_models["qwen3"]


@pytest.fixture(scope="session")
def tiny_qwen3_dropout(tiny_qwen3, tmp_path_factory) -> Path:
    """tiny_qwen3 with attention dropout 0.1: training consumes random numbers at every step.

    A resume that restores the RNG states wrongly then diverges from the uninterrupted run.
    """
    out = tmp_path_factory.mktemp("tiny_dropout") / "qwen3"
    shutil.copytree(tiny_qwen3, out)
    config = json.loads((out / "config.json").read_text())
    config["attention_dropout"] = 0.1
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
