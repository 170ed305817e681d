"""RLSD (arXiv 2604.03128): GRPO whose per-token advantage magnitudes come from the self-teacher.

The rollouts, rewards, groups, dynamic sampling and the clipped policy loss are GRPO's. The
second stream is not a KL reference but the OPSD teacher (``teacher.mode``: the same weights,
a frozen copy or an EMA) reading the privileged context (problem + reference solution); its
log-probability of each sampled token against the student's rescales that token's advantage
(``megaopsd.algorithm.policy_loss.RlsdLoss``). The formula and its source: docs/variants.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from megaopsd.algorithm.methods.base import StepInputs, TrainingBatch
from megaopsd.algorithm.methods.grpo import Grpo
from megaopsd.algorithm.policy_loss import RlsdLoss
from megaopsd.algorithm.teacher import make_teacher
from megaopsd.config import Config, ConfigError


class Rlsd(Grpo):
    name = "rlsd"
    teacher_reads_student_prompt = False  # the self-teacher reads the privileged teacher prompt

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.loss: RlsdLoss | None = None

    @classmethod
    def check_config(cls, cfg: Config, *, dp_size: int) -> None:
        if cfg.algorithm.kl_coef:
            raise ConfigError(
                f"config: algorithm.kl_coef={cfg.algorithm.kl_coef!r} is not used by rlsd (its second stream is "
                "the self-teacher, not a KL reference); set algorithm.kl_coef=0"
            )
        super().check_config(cfg, dp_size=dp_size)

    @classmethod
    def uses_teacher(cls, cfg: Config) -> bool:
        return True

    def make_teacher(self, chunks, build):
        return make_teacher(self.cfg.teacher, chunks, build, lora=self.cfg.lora.enabled)

    def make_loss(self, *, vocab_size: int, tp_group, think_token_ids: Sequence[int] = ()):
        self.loss = RlsdLoss(
            self.cfg.algorithm,
            vocab_size=vocab_size,
            tp_group=tp_group,
            chunk_tokens=self.cfg.loss.chunk_tokens,
        )
        return self.loss

    def lambda_at(self, completed_steps: int) -> float:
        """lambda after ``completed_steps`` optimizer steps: linear from rlsd_lambda to 0 over
        rlsd_lambda_decay_steps (constant when that is 0), as the official trainer does."""
        alg = self.cfg.algorithm
        if alg.rlsd_lambda_decay_steps <= 0:
            return alg.rlsd_lambda
        return alg.rlsd_lambda * (1.0 - min(completed_steps / alg.rlsd_lambda_decay_steps, 1.0))

    def training_batch(self, prompts: list, inputs: StepInputs) -> TrainingBatch:
        lam = self.lambda_at(inputs.completed_steps)
        if self.loss is not None:
            self.loss.lam = lam
        batch = super().training_batch(prompts, inputs)
        return dataclasses.replace(batch, scalars={**batch.scalars, "train/rlsd_lambda": lam})
