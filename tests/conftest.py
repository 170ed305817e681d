"""Shared fixtures (tiny Hugging Face models built once per session, nothing downloaded) and markers.

Markers come from the directory, never by hand: every test under ``tests/unit/`` is ``unit``,
under ``tests/distributed/`` ``distributed`` (gloo ranks in fresh processes) and under
``tests/e2e/`` ``e2e`` (real runs: vLLM, Megatron, trainer launches, files). `make test-fast`
is ``-m "not e2e"``; docs/testing.md has the tiers and their times. Helpers that are not fixtures: ``tests/helpers.py`` (fixed rollouts, the paired
setup), ``tests/dist_harness.py`` (multi-rank workers), ``tests/subprocess_job.py`` (a function
in a fresh process).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# One intra-op thread per process: the suite runs multi-rank tests on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

FAMILIES = ("qwen3", "qwen2", "llama")
MARKERS_BY_DIRECTORY = {
    "unit": pytest.mark.unit,
    "distributed": pytest.mark.distributed,
    "e2e": pytest.mark.e2e,
}
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items) -> None:
    """Mark each test by the directory it lives in (``tests/<dir>/...``)."""
    for item in items:
        parts = Path(item.path).resolve().relative_to(TESTS).parts
        marker = MARKERS_BY_DIRECTORY.get(parts[0]) if len(parts) > 1 else None
        if marker is not None:
            item.add_marker(marker)


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
def tiny_qwen3_moe(tmp_path_factory) -> Path:
    """The tiny Qwen3-MoE: 8 experts of width 64, top-2 renormalised, untied embeddings."""
    from tools.make_tiny_model import make_tiny_model

    return make_tiny_model("qwen3_moe", tmp_path_factory.mktemp("tiny_moe") / "qwen3_moe")


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


@pytest.fixture(scope="session")
def tiny_qwen3_3layers(tmp_path_factory) -> Path:
    """The tiny Qwen3 with 3 decoder layers: PP2 needs uneven stages (2 + 1 or 1 + 2)."""
    from tools.make_tiny_model import make_tiny_model

    return make_tiny_model("qwen3", tmp_path_factory.mktemp("tiny_3layers") / "qwen3", num_layers=3)


@pytest.fixture(scope="session")
def fixed_prompts(tmp_path_factory) -> Path:
    """Eight demo problems: with 8 prompts per step every step sees the same prompt set."""
    path = tmp_path_factory.mktemp("data") / "fixed.jsonl"
    lines = (Path(__file__).resolve().parents[1] / "data/demo/train.jsonl").read_text().splitlines()[:8]
    path.write_text("\n".join(lines) + "\n")
    return path
