"""tools/learning_experiment.py's summary, table and plot over every method, on made-up curves.

The pipeline that produces real curves runs in tests/e2e/test_scripts.py::test_learning_experiment.
"""

from __future__ import annotations

import argparse
import json

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


def test_plot_writes_a_png_with_a_row_per_condition(results, tmp_path):
    plot({"forward": results}, tmp_path / "one.png", k=4)
    plot({"forward": results, "reversed": results}, tmp_path / "two.png", k=4)
    for name in ("one.png", "two.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "two.png").stat().st_size > 1.5 * (tmp_path / "one.png").stat().st_size


def test_methods_that_read_no_reference_share_their_runs_across_conditions(tmp_path):
    """GRPO and the successful-rollout teacher never read a reference: their runs under another
    style are the own style's; the methods that read references run apart."""
    from tools.learning_experiment import METHODS, reads_references, run_dir

    args = argparse.Namespace(out=str(tmp_path))
    assert {m for m in METHODS if not reads_references(m)} == {"grpo", "sdpo"}
    assert (
        run_dir(args, "grpo", 3, "reversed")
        == run_dir(args, "grpo", 3, "forward")
        == tmp_path / "runs" / "grpo_seed3"
    )
    assert run_dir(args, "opsd", 3, "reversed") == tmp_path / "runs" / "reversed" / "opsd_seed3"
    assert run_dir(args, "sft", 3, "forward") == tmp_path / "runs" / "sft_seed3"


def test_tokens_to_reach_interpolates_between_evaluations():
    from tools.learning_experiment import tokens_to_reach

    tokens, accuracy = [0.0, 1000.0, 2000.0], [0.5, 0.6, 0.7]
    assert tokens_to_reach(tokens, accuracy, 0.65) == pytest.approx(1500.0)
    assert tokens_to_reach(tokens, accuracy, 0.5) == 0.0  # already there at the start
    assert tokens_to_reach(tokens, accuracy, 0.71) is None


def test_matched_accuracy_table_compares_tokens_at_equal_accuracy(results):
    args = argparse.Namespace(heldout=200, k=4, seeds=2)
    summary = summarize(results, args)
    matched = summary["matched"]
    # levels: 4 steps from the start (0.5) to the best final mean (OPSD, 0.71)
    assert matched["levels"] == pytest.approx([0.5525, 0.605, 0.6575, 0.71])
    opsd, grpo = matched["methods"]["opsd"], matched["methods"]["grpo"]
    # OPSD's mean curve 0.5, 0.61, 0.71 over 0, 1000, 2000 tokens; GRPO's 0.5, 0.56, 0.66 over 0, 8000, 16000
    assert opsd["tokens"][1] == pytest.approx(1000 * 0.105 / 0.11)
    assert grpo["tokens"][1] == pytest.approx(8000 + 8000 * 0.045 / 0.10)
    assert grpo["tokens"][3] is None and grpo["ratio_to_grpo"][1] == pytest.approx(1.0)
    assert opsd["ratio_to_grpo"][1] == pytest.approx(opsd["tokens"][1] / grpo["tokens"][1])
    assert opsd["ratio_to_grpo"][3] is None  # GRPO never reaches 0.71: no ratio
    text = table(summary, args)
    assert "| method | 55.2 % | 60.5 % | 65.8 % | 71.0 % |" in text
    assert "| grpo | " in text and "(1.00x)" in text and "never" in text


def test_a_finished_run_is_reused_only_with_the_same_settings(tmp_path):
    from tools.learning_experiment import cached

    done = tmp_path / "curve.json"
    done.write_text("[]")
    assert not cached(tmp_path, ["trainer.max_steps=40"], done)  # no record: an older layout
    (tmp_path / "settings.json").write_text(json.dumps(["trainer.max_steps=40"]))
    assert cached(tmp_path, ["trainer.max_steps=40"], done)
    assert not cached(tmp_path, ["trainer.max_steps=60"], done)
    done.unlink()
    assert not cached(tmp_path, ["trainer.max_steps=40"], done)  # interrupted before its curve


def test_a_method_that_reads_no_reference_runs_once_for_every_condition(tmp_path):
    """GRPO under the reversed references is the own style's run: the same directory, overrides
    and key, so its finished run is reused, not run again; OPSD reads the reversed file."""
    from tools.learning_experiment import run_settings

    args = argparse.Namespace(
        out=str(tmp_path),
        k=4,
        heldout=200,
        steps=40,
        prompts=32,
        lr=1e-4,
        eval_interval=10,
        warm_steps=900,
        warm_lr=1e-3,
    )
    hf = tmp_path / "warm" / "hf"
    assert run_settings(args, hf, "grpo", 0, "reversed") == run_settings(args, hf, "grpo", 0, "forward")
    own, reversed_ = (
        run_settings(args, hf, "opsd", 0, "forward"),
        run_settings(args, hf, "opsd", 0, "reversed"),
    )
    assert own[0] != reversed_[0] and own[2] != reversed_[2]
    assert any("train_reversed.jsonl" in o for o in reversed_[1]) and not any(
        "train_reversed" in o for o in own[1]
    )


def test_the_readme_reports_the_experiment_run_it_names():
    """The README's tables are docs/experiment/table.md as the run wrote it, and its wall time,
    seeds and steps are docs/experiment/summary.json's (both conditions, every method's curves)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    readme = (repo / "README.md").read_text()
    table = (repo / "docs" / "experiment" / "table.md").read_text().rstrip()
    summary = json.loads((repo / "docs" / "experiment" / "summary.json").read_text())
    assert table in readme
    assert f"{summary['total_wall_s']:.0f} s in all ({summary['total_wall_s'] / 60:.1f} min)" in readme
    assert summary["total_wall_s"] <= 45 * 60 and summary["seeds"] == [0, 1, 2] and summary["steps"] == 40
    assert set(summary["conditions"]) == {"forward", "reversed"}
    for condition in summary["conditions"].values():
        for method in condition["methods"].values():
            assert len(method["curves"]) == 3 and all(len(curve) == 5 for curve in method["curves"])


def test_plot_only_redraws_the_plot_from_the_summary(results, tmp_path):
    from tools.learning_experiment import main

    args = argparse.Namespace(heldout=200, k=4, seeds=2)
    summary = {"conditions": {"forward": summarize(results, args), "reversed": summarize(results, args)}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert main(["--out", str(tmp_path), "--plot-only"]) == 0
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "runs").exists()  # nothing ran
