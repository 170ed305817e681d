"""OPSD: the student samples, the self-teacher (with privileged context: the reference solution,
or another verified rollout of the same prompt, ``teacher.context``) scores the same tokens, and
the loss is a divergence between their next-token distributions."""

from __future__ import annotations

from collections.abc import Sequence

from megaopsd.algorithm.contexts import CONTEXTS, make_context
from megaopsd.algorithm.loss import make_loss_fn
from megaopsd.algorithm.methods.base import Algorithm, StepInputs, TrainingBatch
from megaopsd.algorithm.teacher import make_teacher
from megaopsd.config import Config, ConfigError
from megaopsd.runtime.distributed import dp_sum


class Opsd(Algorithm):
    name = "opsd"
    divergence_loss = True

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.context = make_context(cfg.teacher)

    @classmethod
    def check_config(cls, cfg: Config, *, dp_size: int) -> None:
        context = CONTEXTS[cfg.teacher.context]
        if context.needs_groups:
            if cfg.rollout.n < 2:
                raise ConfigError(
                    f"config: rollout.n={cfg.rollout.n!r} leaves teacher.context={context.name} no other "
                    "rollout of the same prompt to read; use rollout.n >= 2 (e.g. 8)"
                )
            if cfg.trainer.prompts_per_step % dp_size:
                raise ConfigError(
                    f"config: trainer.prompts_per_step={cfg.trainer.prompts_per_step!r} does not split evenly "
                    f"over {dp_size} data-parallel replicas (teacher.context={context.name} reads the other "
                    f"rollouts of a prompt on the same replica); use a multiple of {dp_size}"
                )
        super().check_config(cfg, dp_size=dp_size)

    @classmethod
    def uses_teacher(cls, cfg: Config) -> bool:
        return True

    def start(self) -> None:
        if self.context.needs_rewards:
            self._start_grader()

    def make_teacher(self, chunks, build):
        return make_teacher(self.cfg.teacher, chunks, build, lora=self.cfg.lora.enabled)

    def make_loss(self, *, vocab_size: int, tp_group, think_token_ids: Sequence[int] = ()):
        return make_loss_fn(
            self.cfg.loss, vocab_size=vocab_size, tp_group=tp_group, think_token_ids=think_token_ids
        )

    def training_batch(self, prompts: list, inputs: StepInputs) -> TrainingBatch:
        rollouts = inputs.rollouts(prompts)
        if not self.context.needs_rewards:
            return TrainingBatch(sampled=rollouts, train=rollouts)
        rewards = self._rewards(rollouts, prompts, inputs)
        batch = self.context.apply(
            rollouts,
            prompts,
            rewards,
            decode=lambda ids: inputs.tokenizer.decode(ids, skip_special_tokens=True),
            teacher_prompt_ids=inputs.teacher_prompt_ids,
        )
        correct, taught, too_long, count = dp_sum(
            [sum(rewards), sum(batch.in_loss), batch.too_long, len(rollouts)], inputs.parallel.dp_group
        )
        scalars = {
            "train/accuracy": correct / max(count, 1.0),
            "train/teacher_context_fraction": taught / max(count, 1.0),
            "train/teacher_context_too_long": too_long,
        }
        return TrainingBatch(
            sampled=rollouts, train=batch.train, in_loss=batch.in_loss, scalars=scalars, empty=taught == 0
        )
