"""The trainer's bookkeeping objects, without a process group: when to save, when to evaluate."""

from __future__ import annotations

import types

import pytest

from megaopsd.checkpoint_manager import CheckpointManager
from megaopsd.config import CheckpointConfig, Config, EvalConfig, ModelConfig, TrainerConfig
from megaopsd.eval.in_training import InTrainingEvaluator, eval_due


def _manager(save_interval: int, max_steps: int, saved: list) -> CheckpointManager:
    cfg = Config(
        model=ModelConfig(hf_path="unused"),
        trainer=TrainerConfig(max_steps=max_steps),
        checkpoint=CheckpointConfig(save_interval=save_interval),
    )
    runtime = types.SimpleNamespace(is_main=False, world_size=1, parallel=None)
    manager = CheckpointManager(cfg, runtime, student=None, teacher=None)
    # A recording double of the collective save (the real one needs a process group and Megatron).
    manager.save = lambda step, state: (saved.append(step), setattr(manager, "saved_step", step))
    return manager


def test_saves_every_interval_and_at_the_last_step():
    manager = _manager(save_interval=3, max_steps=7, saved=[])
    assert [s for s in range(1, 8) if manager.should_save(s)] == [3, 6, 7]


def test_save_before_stop_skips_step_zero_and_a_step_already_on_disk():
    saved: list[int] = []
    manager = _manager(save_interval=3, max_steps=7, saved=saved)
    manager.save_before_stop(0, {})
    assert saved == []  # nothing trained yet
    manager.save_before_stop(2, {})
    assert saved == [2]
    manager.save_before_stop(2, {})
    assert saved == [2]  # already on disk: no second write of the same step


def test_stop_is_agreed_and_remembered_on_one_rank():
    manager = _manager(save_interval=3, max_steps=7, saved=[])
    stop = types.SimpleNamespace(signum=None)
    assert manager.stop_agreed(stop) is False
    stop.signum = 15
    assert manager.stop_agreed(stop) is True and stop.signum == 15


def test_evaluation_is_off_without_interval_or_at_start_and_due_on_multiples():
    assert InTrainingEvaluator.start(EvalConfig()) is None
    cfg = EvalConfig(interval=4)
    assert [s for s in range(1, 13) if eval_due(cfg, s)] == [4, 8, 12]
    assert not any(eval_due(EvalConfig(interval=0), s) for s in range(1, 13))


def _scalars(metrics: dict[str, float]) -> dict[str, float]:
    from megaopsd.algorithm.step import StepResult
    from megaopsd.metrics import PhaseTimer, status_line, step_scalars

    timer = PhaseTimer()
    timer.seconds["train"] = 2.0
    result = StepResult(loss=0.5, grad_norm=1.0, lr=1e-4, num_tokens=10, skipped=False, metrics=metrics)
    values = step_scalars(
        result, (40.0, 4.0, 0.0), timer, train_tokens={"real": 90.0, "padded": 100.0}, data_skipped={}
    )
    assert "nan" not in status_line(1, 2, values)
    return values


def test_step_scalars_log_only_what_the_algorithm_measured():
    sft = _scalars({"nll_sum": 0.5})
    assert sft["train/cross_entropy"] == 0.5 and sft["perf/padding_fraction"] == pytest.approx(0.1)
    assert not {"train/divergence", "train/teacher_entropy", "rollout/logprob_abs_diff_max"} & set(sft)
    opsd = _scalars({"divergence_sum": 0.25, "teacher_entropy_sum": 1.5, "logprob_abs_diff_max": 2e-6})
    assert (opsd["train/divergence"], opsd["train/teacher_entropy"]) == (0.25, 1.5)
    assert opsd["rollout/logprob_abs_diff_max"] == 2e-6 and "train/student_entropy" not in opsd
