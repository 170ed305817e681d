"""SFT: the reference solutions are the responses (no sampling for training); cross-entropy on
the student stream. The engines only evaluate, so they are refitted only when an evaluation is due."""

from __future__ import annotations

from collections.abc import Sequence

from megaopsd.algorithm.baselines import reference_responses
from megaopsd.algorithm.methods.base import Algorithm, StepInputs, TrainingBatch
from megaopsd.algorithm.policy_loss import SftLoss
from megaopsd.config import Config, ConfigError


class Sft(Algorithm):
    name = "sft"
    samples_rollouts = False
    whole_prompts = True

    @classmethod
    def check_config(cls, cfg: Config, *, dp_size: int) -> None:
        if cfg.trainer.skip_first_tokens:
            raise ConfigError(
                f"config: trainer.skip_first_tokens={cfg.trainer.skip_first_tokens!r} does not apply to sft; "
                "set it to 0 (sft trains on the whole reference solution)"
            )
        super().check_config(cfg, dp_size=dp_size)

    def make_loss(self, *, vocab_size: int, tp_group, think_token_ids: Sequence[int] = ()):
        return SftLoss(vocab_size=vocab_size, tp_group=tp_group, chunk_tokens=self.cfg.loss.chunk_tokens)

    def training_batch(self, prompts: list, inputs: StepInputs) -> TrainingBatch:
        par = inputs.parallel
        per_replica = len(prompts) // par.dp_size
        first = par.dp_rank * per_replica
        refs = reference_responses(
            prompts[first : first + per_replica],
            first,
            inputs.tokenizer,
            max_tokens=self.cfg.rollout.max_new_tokens,
            with_teacher_prompt=self.cfg.algorithm.sft_prompts == "both",
        )
        return TrainingBatch(sampled=refs, train=refs)

    def sync_after_step(self, *, eval_due: bool) -> bool:
        return eval_due  # the engines only evaluate
