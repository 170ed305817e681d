"""The training methods as plug-ins: the registry, each method's own config rules, and what the
trainer asks of them (no process group; the trainer paths run in tests/e2e/test_baselines.py)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from megaopsd.algorithm.methods import ALGORITHMS, Algorithm, algorithm_class
from megaopsd.config import AlgorithmConfig, Config, ConfigError, ModelConfig, RolloutConfig, TrainerConfig
from megaopsd.config.schema import AlgorithmName


def _cfg(name: str, **sections) -> Config:
    return Config(model=ModelConfig(hf_path="unused"), algorithm=AlgorithmConfig(name=name), **sections)


def test_every_config_choice_is_registered():
    assert set(ALGORITHMS) == set(AlgorithmName.__args__) == {"opsd", "grpo", "sft", "rlsd", "pw_opsd"}
    for name, method in ALGORITHMS.items():
        assert issubclass(method, Algorithm) and method.name == name and algorithm_class(name) is method


def test_what_the_trainer_asks_of_each_method():
    opsd, grpo, sft = (algorithm_class(n) for n in ("opsd", "grpo", "sft"))
    assert opsd.samples_rollouts and grpo.samples_rollouts and not sft.samples_rollouts
    assert not opsd.whole_prompts and grpo.whole_prompts and sft.whole_prompts
    assert opsd(_cfg("opsd")).sync_after_step(eval_due=False)
    assert grpo(_cfg("grpo")).sync_after_step(eval_due=False)
    assert not sft(_cfg("sft")).sync_after_step(eval_due=False)  # its engines only evaluate
    assert sft(_cfg("sft")).sync_after_step(eval_due=True)
    assert grpo(_cfg("grpo")).make_teacher([], list) is None  # kl_coef 0: no reference copy
    assert sft(_cfg("sft")).make_teacher([], list) is None


def test_grpo_needs_groups_and_whole_prompts_per_replica():
    with pytest.raises(ConfigError, match=r"rollout\.n=1 gives GRPO groups of one; use rollout\.n >= 2"):
        algorithm_class("grpo").check_config(_cfg("grpo"), dp_size=1)
    cfg = _cfg("grpo", rollout=RolloutConfig(n=4), trainer=TrainerConfig(prompts_per_step=3))
    with pytest.raises(
        ConfigError, match=r"does not split evenly over 2 data-parallel replicas \(grpo keeps"
    ):
        algorithm_class("grpo").check_config(cfg, dp_size=2)
    algorithm_class("grpo").check_config(cfg, dp_size=1)
    algorithm_class("opsd").check_config(dataclasses.replace(cfg, algorithm=AlgorithmConfig()), dp_size=2)


def test_rlsd_is_grpo_with_the_self_teacher():
    rlsd, grpo = algorithm_class("rlsd"), algorithm_class("grpo")
    cfg = _cfg("rlsd", rollout=RolloutConfig(n=4))
    assert issubclass(rlsd, grpo) and rlsd.whole_prompts and rlsd.uses_teacher(cfg)
    # GRPO's second stream is a KL reference of the student's own sequence; RLSD's the teacher
    # reading the privileged prompt
    assert grpo.teacher_reads_student_prompt and not rlsd.teacher_reads_student_prompt
    with pytest.raises(
        ConfigError, match=r"algorithm\.kl_coef=0\.1 is not used by rlsd .* set algorithm\.kl_coef=0"
    ):
        rlsd.check_config(
            dataclasses.replace(cfg, algorithm=AlgorithmConfig(name="rlsd", kl_coef=0.1)), dp_size=1
        )
    rlsd.check_config(cfg, dp_size=1)


@pytest.mark.parametrize(
    "decay,expected", [(50, {0: 0.5, 25: 0.25, 49: 0.01, 50: 0.0, 80: 0.0}), (0, {0: 0.5, 1000: 0.5})]
)
def test_rlsd_lambda_falls_linearly_like_the_official_trainer(decay, expected):
    method = algorithm_class("rlsd")(
        Config(
            model=ModelConfig(hf_path="unused"),
            algorithm=AlgorithmConfig(name="rlsd", rlsd_lambda=0.5, rlsd_lambda_decay_steps=decay),
        )
    )
    assert {k: round(method.lambda_at(k), 12) for k in expected} == expected


def test_sft_trains_on_the_whole_reference():
    cfg = _cfg("sft", trainer=TrainerConfig(skip_first_tokens=2))
    with pytest.raises(ConfigError, match=r"skip_first_tokens=2 does not apply to sft"):
        algorithm_class("sft").check_config(cfg, dp_size=1)


def test_the_entry_point_applies_the_methods_rules(tiny_qwen3):
    bad = subprocess.run(
        [sys.executable, "-m", "megaopsd.train", f"model.hf_path={tiny_qwen3}", "algorithm.name=grpo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines() == [
        "megaopsd: config: rollout.n=1 gives GRPO groups of one; use rollout.n >= 2 (e.g. 8)"
    ]


def test_pw_opsd_is_opsd_with_position_weights_on_the_divergence():
    pw, opsd = algorithm_class("pw_opsd"), algorithm_class("opsd")
    assert issubclass(pw, opsd) and pw.divergence_loss and pw.uses_teacher(_cfg("pw_opsd"))
    assert not any(algorithm_class(n).divergence_loss for n in ("grpo", "sft", "rlsd"))


def test_position_weights_follow_each_response_whatever_the_microbatch_layout():
    """Each response's weights depend on its own loss tokens only, wherever the microbatch
    planner puts it; the step's loss-token count the method computes is the masks' count."""
    import math
    import types

    import torch

    from megaopsd.algorithm.batch import build_microbatches
    from megaopsd.algorithm.loss import position_weights
    from megaopsd.algorithm.methods.pw_opsd import loss_token_counts

    def rollout(n: int):
        return types.SimpleNamespace(
            student_prompt_ids=[1, 2], teacher_prompt_ids=[1, 2, 3], response_ids=list(range(4, 4 + n))
        )

    lengths, in_loss, skip = [5, 12, 3, 8, 1], [True, True, False, True, True], 2
    rollouts = [rollout(n) for n in lengths]

    def expected(n: int) -> list[float]:  # the formula on one response of n loss tokens
        return [0.25 + 0.75 / (1 + math.exp(-((i - 0.5) / n - 0.3) / 0.1)) for i in range(1, n + 1)]

    for max_tokens in (16, 40, 200):  # one microbatch per rollout .. all in one
        microbatches = build_microbatches(
            rollouts, max_tokens=max_tokens, pad_id=0, skip_first_tokens=skip, in_loss=in_loss
        )
        seen = {}
        for mb in microbatches:
            weight, length = position_weights(
                mb.loss_mask_T, mb.sample_T, w_min=0.25, tau=0.3, s=0.1, dtype=torch.float64
            )
            for sample in mb.sample_T.unique().tolist():
                rows = (mb.sample_T == sample) & mb.loss_mask_T
                seen[sample] = (weight[rows].tolist(), length[rows].tolist())
        for sample, n in enumerate(loss_token_counts(rollouts, in_loss, skip)):
            weights, length = seen[sample]
            assert length == [float(n)] * n
            assert weights == pytest.approx(expected(n), rel=1e-12), (max_tokens, sample)
        assert sum(loss_token_counts(rollouts, in_loss, skip)) == sum(
            mb.num_loss_tokens for mb in microbatches
        )
