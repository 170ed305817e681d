"""Position-weighted OPSD (arXiv 2605.21606, PW-OPSD): OPSD whose per-token divergence is
weighted by where the token sits in the response.

Everything but the weighting is OPSD's (the teacher, its context, the divergence in ``loss.*``):
the early tokens of a response, where the paper finds the teacher's guidance helps least, count
``algorithm.position_w_min`` of the late ones, along a sigmoid of the relative position
(``megaopsd.algorithm.loss.position_weights``). The formula and its source: docs/variants.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from megaopsd.algorithm.batch import response_loss_mask
from megaopsd.algorithm.loss import PositionWeightedDivergence, make_loss_fn
from megaopsd.algorithm.methods.base import StepInputs, TrainingBatch
from megaopsd.algorithm.methods.opsd import Opsd
from megaopsd.runtime.distributed import dp_sum


def loss_token_counts(train: Sequence, in_loss: Sequence[bool] | None, skip_first_tokens: int) -> list[int]:
    """Each rollout's loss tokens: ``build_microbatch``'s mask (``response_loss_mask``), counted."""
    return [
        int(
            response_loss_mask(
                len(r.response_ids),
                skip_first_tokens=skip_first_tokens,
                in_loss=in_loss is None or in_loss[i],
            ).sum()
        )
        for i, r in enumerate(train)
    ]


class PwOpsd(Opsd):
    name = "pw_opsd"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.loss: PositionWeightedDivergence | None = None

    def make_loss(self, *, vocab_size: int, tp_group, think_token_ids: Sequence[int] = ()):
        divergence = make_loss_fn(
            self.cfg.loss, vocab_size=vocab_size, tp_group=tp_group, think_token_ids=think_token_ids
        )
        self.loss = PositionWeightedDivergence(
            divergence,
            self.cfg.algorithm,
            vocab_size=vocab_size,
            tp_group=tp_group,
            chunk_tokens=self.cfg.loss.chunk_tokens,
        )
        return self.loss

    def training_batch(self, prompts: list, inputs: StepInputs) -> TrainingBatch:
        batch = super().training_batch(prompts, inputs)
        counts = loss_token_counts(batch.train, batch.in_loss, self.cfg.trainer.skip_first_tokens)
        tokens, responses = dp_sum([sum(counts), sum(c > 0 for c in counts)], inputs.parallel.dp_group)
        if self.loss is not None:  # the schedule divides by the tokens; the loss wants responses
            self.loss.sequence_scale = tokens / responses if responses else 1.0
        return dataclasses.replace(batch, scalars={**batch.scalars, "train/loss_responses": responses})
