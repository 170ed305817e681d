"""tools/learning_experiment.py's summary, table and plot over every method, on made-up curves.

The pipeline that produces real curves runs in tests/e2e/test_scripts.py::test_learning_experiment.
"""

from __future__ import annotations

import argparse

import pytest

from tools.learning_experiment import plot, summarize, table


def _curve(accuracies: list[float], tokens_per_step: float) -> list[dict[str, float]]:
    return [
        {"step": 10 * i, "tokens": tokens_per_step * 10 * i, "wall_s": 5.0 * i, "accuracy": a}
        for i, a in enumerate(accuracies)
    ]


@pytest.fixture
def results() -> dict:
    return {
        "opsd": [_curve([0.5, 0.6, 0.7], 100), _curve([0.5, 0.62, 0.72], 100)],
        "grpo": [_curve([0.5, 0.55, 0.65], 800), _curve([0.5, 0.57, 0.67], 800)],
        "sft": [_curve([0.5, 0.5, 0.52], 0), _curve([0.5, 0.5, 0.54], 0)],
    }


def test_summary_finals_gains_and_tokens_to_reach_grpo(results):
    args = argparse.Namespace(heldout=200, k=4, seeds=2)
    summary = summarize(results, args)
    assert summary["start"] == pytest.approx(0.5)
    opsd, grpo, sft = (summary["methods"][m] for m in ("opsd", "grpo", "sft"))
    assert opsd["final_mean"] == pytest.approx(0.71) and opsd["final_std"] == pytest.approx(0.01 * 2**0.5)
    assert opsd["gain"] == pytest.approx(0.21) and opsd["gain_in_se"] > 3
    assert (opsd["tokens_total"], grpo["tokens_total"], sft["tokens_total"]) == (2000, 16000, 0)
    # GRPO's final mean is 0.66: OPSD's mean curve passes it at step 20; SFT never does
    assert opsd["reach_grpo_final"] == {"step": 20, "tokens": 2000, "wall_s": 10.0}
    assert grpo["reach_grpo_final"]["step"] == 20
    assert sft["reach_grpo_final"] is None
    text = table(summary, args)
    assert "| opsd | 71.0 +- 1.4 | +21.0" in text
    assert "| sft |" in text and "| never |" in text


def test_plot_writes_a_png(results, tmp_path):
    plot(results, tmp_path / "accuracy.png", k=4)
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
