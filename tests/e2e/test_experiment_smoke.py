"""The learning experiment's entry point at toy size: every stage runs and the outputs exist.

Checks the pipeline (char model, data, SFT warm start, export, OPSD / GRPO / SFT runs, curves,
plot, table), not the science: ``make experiment`` is the real run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.e2e.test_trainer import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_experiment_smoke(tmp_path):
    out = tmp_path / "exp"
    cmd = [sys.executable, "tools/learning_experiment.py", "--out", str(out), "--smoke"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"opsd", "grpo", "sft"}
    assert summary["warm_start_wall_s"] > 0  # made by this invocation, timed apart from the runs
    for method, m in summary["methods"].items():
        assert m["steps"] == [0, 1, 2], method
        assert 0.0 <= m["final_mean"] <= 1.0
    assert summary["methods"]["sft"]["tokens_total"] == 0.0  # SFT generates nothing for training
    assert summary["methods"]["grpo"]["tokens_total"] > summary["methods"]["opsd"]["tokens_total"] > 0
    assert (out / "accuracy.png").stat().st_size > 10_000
    assert "| grpo |" in (out / "table.md").read_text()
