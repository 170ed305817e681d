"""OPSD: the student samples, the self-teacher (with the reference solution in its context)
scores the same tokens, and the loss is a divergence between their next-token distributions."""

from __future__ import annotations

from collections.abc import Sequence

from megaopsd.algorithm.loss import make_loss_fn
from megaopsd.algorithm.methods.base import Algorithm, StepInputs, TrainingBatch
from megaopsd.algorithm.teacher import make_teacher
from megaopsd.config import Config


class Opsd(Algorithm):
    name = "opsd"

    @classmethod
    def uses_teacher(cls, cfg: Config) -> bool:
        return True

    def make_teacher(self, chunks, build):
        return make_teacher(self.cfg.teacher, chunks, build, lora=self.cfg.lora.enabled)

    def make_loss(self, *, vocab_size: int, tp_group, think_token_ids: Sequence[int] = ()):
        return make_loss_fn(
            self.cfg.loss, vocab_size=vocab_size, tp_group=tp_group, think_token_ids=think_token_ids
        )

    def training_batch(self, prompts: list, inputs: StepInputs) -> TrainingBatch:
        rollouts = inputs.rollouts(prompts)
        return TrainingBatch(sampled=rollouts, train=rollouts)
