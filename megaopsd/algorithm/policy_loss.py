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
        advantage, extra = self.token_advantages(mb, logp.detach(), reference_NV)
        ref = None
        if reference_NV is not None and cfg.kl_coef:
            ref = self._other_logp(reference_NV, mb)
        loss_N, terms = grpo_token_loss(
            logp,
            old,
            advantage,
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
            "advantage_sum": (advantage * mask).sum(),
            "advantage_sq_sum": (advantage.square() * mask).sum(),
            "clip_low_sum": (terms.clipped_low_T * mask).sum(),
            "clip_high_sum": (terms.clipped_high_T * mask).sum(),
            "ratio_sum": (terms.ratio_T * m).sum(),
            "is_weight_sum": (terms.is_weight_T * m).sum(),
            "kl_sum": (terms.kl_T * m).sum(),
        }
        metrics.update({name: (value * m).sum() for name, value in extra.items()})
        return (loss_N * m).sum(), metrics

    def token_advantages(
        self, mb: PairedMicrobatch, logp_T: torch.Tensor, other_NV: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each scored token's advantage (GRPO: its rollout's) and per-token metrics to sum."""
        return mb.advantage_T, {}

    def _other_logp(self, other_NV: torch.Tensor, mb: PairedMicrobatch) -> torch.Tensor:
        """The second stream's log-probabilities of the sampled tokens (no grad)."""
        return token_logprobs(other_NV, mb.target_ids_T, vocab_size=self.vocab_size, tp_group=self.tp_group)


class RlsdLoss(GrpoLoss):
    """RLSD (arXiv 2604.03128): GRPO's loss with each token's advantage rescaled by the self-teacher.

        delta_t = sg(log p_teacher(y_t) - log p_student(y_t))
        w_t     = clip(exp(sign(A) x delta_t), 1 - eps_w, 1 + eps_w)
        A_t     = A x ((1 - lambda) + lambda x w_t)

    The verifier's reward sets the sign (through the group advantage A); the teacher, the same
    model reading the privileged context, sets how much each token carries. ``lam`` is the
    step's lambda (the method updates it before every step: ``Rlsd.lambda_at``).
    """

    def __init__(self, cfg: AlgorithmConfig, **kwargs):
        super().__init__(cfg, **kwargs)
        self.lam = cfg.rlsd_lambda

    def token_advantages(self, mb, logp_T, other_NV):
        if other_NV is None:
            raise ValueError("RLSD needs the teacher stream's logits")
        eps = self.cfg.rlsd_epsilon_w
        advantage = mb.advantage_T.to(logp_T.dtype)
        delta = self._other_logp(other_NV, mb).to(logp_T.dtype) - logp_T
        weight = (advantage.sign() * delta).exp().clamp(1.0 - eps, 1.0 + eps)
        token_advantage = advantage * ((1.0 - self.lam) + self.lam * weight)
        return token_advantage, {"rlsd_weight_sum": weight, "rlsd_delta_sum": delta}
