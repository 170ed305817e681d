"""The baselines' losses on the last pipeline stage: GRPO's clipped policy gradient and SFT.

Both read the sampled (or reference) token ids, the student's vocab-parallel logits and, for
GRPO, the microbatch's advantages, engine logprobs and the reference model's logits (present
only when the KL penalty is on). They return the masked SUM of the per-token loss and metric
sums, like the OPSD divergence; Megatron divides by the global token count (token-level
aggregation).

Legend: N scored tokens, V vocab shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaopsd.algorithm.batch import PairedMicrobatch
from megaopsd.algorithm.grpo import grpo_token_loss
from megaopsd.config import AlgorithmConfig
from megaopsd.loss.logprobs import token_logprobs
from megaopsd.loss.token_logprob import vocab_parallel_token_logprobs


class StudentLoss:
    """A loss that reads the whole microbatch: ``(student_NV, reference_NV | None, mb) -> (sum, metrics)``."""

    def __init__(self, *, vocab_size: int, tp_group: dist.ProcessGroup | None, chunk_tokens: int = 1024):
        self.vocab_size, self.tp_group, self.chunk_tokens = vocab_size, tp_group, chunk_tokens

    def _logp(self, student_NV: torch.Tensor, ids_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return vocab_parallel_token_logprobs(
            student_NV,
            ids_N,
            vocab_size=self.vocab_size,
            tp_group=self.tp_group,
            chunk_tokens=self.chunk_tokens,
        )

    def __call__(
        self, student_NV: torch.Tensor, reference_NV: torch.Tensor | None, mb: PairedMicrobatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class SftLoss(StudentLoss):
    """Teacher-forced cross-entropy ``-log p(y)`` of the reference solution's tokens."""

    def __call__(self, student_NV, reference_NV, mb):
        mask = mb.loss_mask_T.to(torch.float32)
        logp, entropy = self._logp(student_NV, mb.target_ids_T)
        nll = -(logp * mask.to(logp.dtype)).sum()
        metrics = {
            "nll_sum": nll.detach(),
            "student_entropy_sum": (entropy * mask).sum(),
        }
        return nll, metrics


class GrpoLoss(StudentLoss):
    """GRPO's per-token loss (``megaopsd/algorithm/grpo.py``) summed over the masked tokens.

    The ratio's baseline: with the truncated IS correction on, the trainer's own (detached)
    log-probabilities, the engine's being the behaviour policy of the IS weight (Yao et al.'s
    decomposition); without it, the engine's log-probabilities, i.e. the policy that sampled.
    """

    def __init__(self, cfg: AlgorithmConfig, **kwargs):
        super().__init__(**kwargs)
        self.cfg = cfg

    def __call__(self, student_NV, reference_NV, mb):
        if mb.advantage_T is None or mb.engine_logprobs_T is None:
            raise ValueError("a GRPO microbatch needs advantages and engine logprobs")
        cfg = self.cfg
        mask = mb.loss_mask_T.to(torch.float32)
        logp, entropy = self._logp(student_NV, mb.target_ids_T)
        engine = mb.engine_logprobs_T.to(logp.dtype)
        old = logp.detach() if cfg.tis_cap is not None else engine
        ref = None
        if reference_NV is not None:
            ref = token_logprobs(
                reference_NV, mb.target_ids_T, vocab_size=self.vocab_size, tp_group=self.tp_group
            )
        loss_N, terms = grpo_token_loss(
            logp,
            old,
            mb.advantage_T,
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            behaviour_logp_T=engine,
            tis_cap=cfg.tis_cap,
            ref_logp_T=ref,
            kl_coef=cfg.kl_coef,
        )
        m = mask.to(loss_N.dtype)
        metrics = {
            "student_entropy_sum": (entropy * mask).sum(),
            "advantage_sum": (mb.advantage_T * mask).sum(),
            "advantage_sq_sum": (mb.advantage_T.square() * mask).sum(),
            "clip_low_sum": (terms.clipped_low_T * mask).sum(),
            "clip_high_sum": (terms.clipped_high_T * mask).sum(),
            "ratio_sum": (terms.ratio_T * m).sum(),
            "is_weight_sum": (terms.is_weight_T * m).sum(),
            "kl_sum": (terms.kl_T * m).sum(),
        }
        return (loss_N * m).sum(), metrics
