"""Shared fixtures (tiny Hugging Face models built once per session, nothing downloaded) and markers.

Markers by directory: every test under ``tests/distributed/`` is ``distributed`` (spawns gloo
processes) and every test under ``tests/e2e/`` is ``e2e``; ``slow`` stays on the tests
themselves. Helpers that are not fixtures: ``tests/helpers.py`` (fixed rollouts, the paired
setup), ``tests/dist_harness.py`` (multi-rank workers), ``tests/subprocess_job.py`` (a function
in a fresh process).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One intra-op thread per process: the suite runs multi-rank tests on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

FAMILIES = ("qwen3", "qwen2", "llama")
MARKERS_BY_DIRECTORY = {"distributed": pytest.mark.distributed, "e2e": pytest.mark.e2e}
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
