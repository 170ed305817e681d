"""GRPO: ``rollout.n`` responses per prompt graded by math-verify, group-relative advantages,
dynamic sampling, the clipped policy loss on the student stream (plus a frozen reference and a
k3 KL penalty when ``algorithm.kl_coef > 0``). The math is in ``megaopsd/algorithm/grpo.py``."""

from __future__ import annotations

from collections.abc import Sequence

from megaopsd.algorithm.baselines import grpo_batch, rewards_of
from megaopsd.algorithm.methods.base import Algorithm, StepInputs, TrainingBatch
from megaopsd.algorithm.policy_loss import GrpoLoss
from megaopsd.algorithm.teacher import make_teacher
from megaopsd.config import Config, ConfigError, TeacherConfig
from megaopsd.eval.grading import Grader, GradingSettings
from megaopsd.runtime.distributed import dp_sum


class Grpo(Algorithm):
    name = "grpo"
    whole_prompts = True

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.grader: Grader | None = None  # started by ``start``, for the whole run

    def start(self) -> None:
        """Start the reward grader (killable math-verify workers), before any engine."""
        settings = GradingSettings(
            timeout_s=self.cfg.eval.grading_timeout_s, num_workers=self.cfg.eval.grading_workers
        )
        self.grader = Grader(settings)

    @classmethod
    def check_config(cls, cfg: Config, *, dp_size: int) -> None:
        if cfg.rollout.n < 2:
            raise ConfigError(
                f"config: rollout.n={cfg.rollout.n!r} gives GRPO groups of one; use rollout.n >= 2 (e.g. 8)"
            )
        super().check_config(cfg, dp_size=dp_size)

    def make_teacher(self, chunks, build):
        if self.cfg.algorithm.kl_coef <= 0:
            return None  # no KL penalty: no reference copy is built and no second stream runs
        return make_teacher(TeacherConfig(mode="fixed"), chunks, build, lora=self.cfg.lora.enabled)

    def make_loss(self, *, vocab_size: int, tp_group, think_token_ids: Sequence[int] = ()):
        return GrpoLoss(
            self.cfg.algorithm,
            vocab_size=vocab_size,
            tp_group=tp_group,
            chunk_tokens=self.cfg.loss.chunk_tokens,
        )

    def training_batch(self, prompts: list, inputs: StepInputs) -> TrainingBatch:
        par = inputs.parallel
        rollouts = inputs.rollouts(prompts)
        assert self.grader is not None, "call start() before the first step"
        rewards = rewards_of(rollouts, prompts, self.grader, inputs.tokenizer)
        grpo = grpo_batch(
            rollouts,
            rewards,
            self.cfg.algorithm,
            with_reference=inputs.has_teacher,
            min_rollouts=par.pp_size if par.vpp_size else 1,
        )
        reward_sum, correct, num, groups, kept = dp_sum(grpo.counts, par.dp_group)
        scalars = {
            "train/reward_mean": reward_sum / max(num, 1.0),
            "train/accuracy": correct / max(num, 1.0),
            "train/kept_group_fraction": kept / max(groups, 1.0),
            "train/dropped_groups": groups - kept,
        }
        return TrainingBatch(
            sampled=rollouts,
            train=grpo.rollouts,
            advantages=grpo.advantages,
            in_loss=grpo.in_loss,
            scalars=scalars,
            empty=kept == 0,
        )

    def close(self) -> None:
        if self.grader is not None:
            self.grader.close()
            self.grader = None
