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
from collections.abc import Callable
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


# The order work is handed out under `make test` (pytest-xdist workers, each test file one unit):
# end-to-end files first, the two longest of them at the head, so that no worker is left with a
# long file at the end while the other idles (docs/testing.md has the per-file costs).
TIER_ORDER = ("e2e", "distributed", "unit")
LONGEST_FILES = ("test_scripts.py", "test_trainer.py")


def pytest_collection_modifyitems(config, items) -> None:
    """Mark each test by the directory it lives in (``tests/<dir>/...``), order the tests (see
    ``TIER_ORDER``) and, under pytest-xdist, make each file one unit of work: its module-scoped
    fixtures then run once."""

    def relative(item) -> tuple[str, ...]:
        return Path(item.path).resolve().relative_to(TESTS).parts

    def order(item) -> tuple[int, int]:
        tier = relative(item)[0]
        name = item.path.name
        return (
            TIER_ORDER.index(tier) if tier in TIER_ORDER else len(TIER_ORDER),
            LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES),
        )

    items.sort(key=order)  # stable: a file's tests keep their order
    xdist = config.pluginmanager.hasplugin("xdist")
    for item in items:
        parts = relative(item)
        marker = MARKERS_BY_DIRECTORY.get(parts[0]) if len(parts) > 1 else None
        if marker is not None:
            item.add_marker(marker)
        if xdist:
            item.add_marker(pytest.mark.xdist_group("/".join(parts)))


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The directory ``name`` that every worker of this session shares; the first to ask makes
    its contents with ``make(path)`` while holding a file lock, the others wait and read them.

    Without pytest-xdist it is a directory of the session's base temp. Under xdist the workers'
    base temps share a parent: the tiny models, the prompts and the shared runs of
    tests/e2e/conftest.py live there, once per session, at one path for every worker (runs
    compare checkpoints made from the same model files). A worker that fails half-way leaves
    no ``.done`` mark, and the next one starts the directory over.
    """
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            make(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """``{"qwen3": dir, "qwen2": dir, "llama": dir}``: deterministic tiny models (see tools/make_tiny_model.py)."""
    from tools.make_tiny_model import make_tiny_model

    def make(root: Path) -> None:
        for family in FAMILIES:
            make_tiny_model(family, root / family)

    root = made_once(tmp_path_factory, "tiny_models", make)
    return {family: root / family for family in FAMILIES}


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

    def make(root: Path) -> None:
        out = root / "qwen3"
        shutil.copytree(tiny_qwen3, out)
        config = json.loads((out / "config.json").read_text())
        config["attention_dropout"] = 0.1
        (out / "config.json").write_text(json.dumps(config, indent=2))

    return made_once(tmp_path_factory, "tiny_dropout", make) / "qwen3"


@pytest.fixture(scope="session")
def tiny_qwen3_3layers(tmp_path_factory) -> Path:
    """The tiny Qwen3 with 3 decoder layers: PP2 needs uneven stages (2 + 1 or 1 + 2)."""
    from tools.make_tiny_model import make_tiny_model

    return make_tiny_model("qwen3", tmp_path_factory.mktemp("tiny_3layers") / "qwen3", num_layers=3)


@pytest.fixture(scope="session")
def fixed_prompts(tmp_path_factory) -> Path:
    """Eight demo problems: with 8 prompts per step every step sees the same prompt set."""

    def make(root: Path) -> None:
        lines = (TESTS.parent / "data/demo/train.jsonl").read_text().splitlines()[:8]
        (root / "fixed.jsonl").write_text("\n".join(lines) + "\n")

    return made_once(tmp_path_factory, "fixed_prompts", make) / "fixed.jsonl"
