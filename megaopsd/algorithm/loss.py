"""The per-token divergence the last pipeline stage applies, bound to the loss config and TP
group; and position-weighted OPSD's weighting of it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from megaopsd.algorithm.forward import LossFn
from megaopsd.algorithm.policy_loss import StudentLoss
from megaopsd.config import LossConfig
from megaopsd.loss import vocab_parallel_divergence
from megaopsd.loss.boundary import first_token_mask, first_token_sums


def make_loss_fn(
    cfg: LossConfig,
    *,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None,
    think_token_ids: Sequence[int] = (),
) -> LossFn:
    """``(student_NV, teacher_NV, mask_N, target_N, first_N=None) -> (loss_sum, metric sums)``.

    Args:
        cfg: loss kind, beta, temperature, top-k, clip, chunk size.
        vocab_size: the true vocabulary size (Megatron's padded columns carry no mass).
        tp_group: the tensor-parallel group the vocabulary is split over.
        think_token_ids: the tokenizer's think tags; with ``first_N`` (each response's first
            token) the loss also reports the thinking-boundary sums (``loss.boundary``).
    """
    top_k = cfg.top_k if cfg.kind in ("topk", "topk_tail") else None

    def loss_fn(
        student_NV: torch.Tensor,
        teacher_NV: torch.Tensor,
        mask_N: torch.Tensor,
        target_N: torch.Tensor,
        first_N: torch.Tensor | None = None,
    ):
        loss_sum, metrics = vocab_parallel_divergence(
            student_NV,
            teacher_NV,
            mask_N,
            kind=cfg.kind,
            beta=cfg.beta,
            temperature=cfg.temperature,
            vocab_size=vocab_size,
            tp_group=tp_group,
            top_k=top_k,
            clip=cfg.clip,
            clip_mode=cfg.clip_mode,
            sampled_ids_T=target_N if cfg.kind == "pg" else None,
            chunk_tokens=cfg.chunk_tokens,
            implementation=cfg.implementation,
        )
        sums = {
            "divergence_sum": metrics.divergence_sum,
            "student_entropy_sum": metrics.student_entropy_sum,
            "teacher_entropy_sum": metrics.teacher_entropy_sum,
            "clipped_sum": metrics.clipped_count,
        }
        if metrics.entry_count is not None:  # clip_mode=entry
            sums["clipped_entry_sum"] = metrics.clipped_entry_count
            sums["entry_sum"] = metrics.entry_count
            sums["clipped_loss_sum"] = metrics.clipped_loss_sum
            sums["positive_loss_sum"] = metrics.positive_loss_sum
        if metrics.teacher_topk_mass_sum is not None:
            sums["teacher_topk_mass_sum"] = metrics.teacher_topk_mass_sum
        if first_N is not None:
            sums |= first_token_sums(
                student_NV,
                teacher_NV,
                first_N,
                target_N,
                kind=cfg.kind,
                beta=cfg.beta,
                temperature=cfg.temperature,
                top_k=top_k,
                vocab_size=vocab_size,
                tp_group=tp_group,
                think_ids=think_token_ids,
            )
        return loss_sum, sums

    return loss_fn


def position_weights(
    mask_T: torch.Tensor,
    sample_T: torch.Tensor,
    *,
    w_min: float,
    tau: float,
    s: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position-weighted OPSD's token weights, and each token's response length.

        u_t = (i_t - 0.5) / L        i_t: the token's 1-based index among its response's loss tokens
        w_t = w_min + (1 - w_min) x sigmoid((u_t - tau) / s)

    Args:
        mask_T: [T] the loss mask (a response's left-out tokens neither count nor take a place).
        sample_T: [T] each token's response; a response's tokens are contiguous and in order,
            as ``build_microbatch`` lays them out.

    Returns:
        (w_T, length_T): the weights (meaningless where the mask is off) and L of each token's
        response (its loss-token count), both in ``dtype``.
    """
    m = mask_T.to(dtype)
    if m.numel() == 0:
        return m, m
    _, segment_T = torch.unique_consecutive(sample_T, return_inverse=True)
    segments = int(segment_T[-1]) + 1
    length = torch.zeros(segments, dtype=dtype, device=m.device).index_add_(0, segment_T, m)
    before_T = m.cumsum(0) - m  # loss tokens before each token, over the whole microbatch
    first_T = torch.ones_like(segment_T, dtype=torch.bool)
    first_T[1:] = segment_T[1:] != segment_T[:-1]
    index_T = before_T - before_T[first_T][segment_T] + 1.0  # 1-based within its response
    length_T = length[segment_T]
    u_T = (index_T - 0.5).clamp(min=0.0) / length_T.clamp(min=1.0)
    return w_min + (1.0 - w_min) * torch.sigmoid((u_T - tau) / s), length_T


class PositionWeightedDivergence(StudentLoss):
    """Position-weighted OPSD (arXiv 2605.21606): the divergence of each token times its
    position weight (``position_weights``), reduced per response first or over all tokens.

    ``reduction="sequence"`` (the official default) averages each response's weighted tokens,
    then the responses: a token's weight is ``w_t x sequence_scale / L`` so that the schedule's
    division by the step's loss-token count N gives ``mean_i (sum_t w_t l_t / L_i)``; the method
    sets ``sequence_scale = N / responses`` before every step (``PwOpsd.training_batch``).
    ``reduction="token"`` is ``sum w_t l_t / N``. The divergence metrics are weighted alike.
    """

    def __init__(self, divergence: LossFn, cfg, *, vocab_size: int, tp_group, chunk_tokens: int = 1024):
        super().__init__(vocab_size=vocab_size, tp_group=tp_group, chunk_tokens=chunk_tokens)
        self.divergence, self.cfg = divergence, cfg
        self.sequence_scale = 1.0

    def __call__(self, student_NV, teacher_NV, mb):
        if teacher_NV is None:
            raise ValueError("position-weighted OPSD needs the teacher stream's logits")
        cfg = self.cfg
        dtype = torch.promote_types(student_NV.dtype, torch.float32)
        weight_T, length_T = position_weights(
            mb.loss_mask_T,
            mb.sample_T,
            w_min=cfg.position_w_min,
            tau=cfg.position_tau,
            s=cfg.position_s,
            dtype=dtype,
        )
        mask_T = mb.loss_mask_T.to(dtype)
        token_weight_T = mask_T * weight_T
        if cfg.position_reduction == "sequence":
            token_weight_T = token_weight_T * (self.sequence_scale / length_T.clamp(min=1.0))
        loss_sum, sums = self.divergence(
            student_NV, teacher_NV, token_weight_T, mb.target_ids_T, first_N=first_token_mask(mb.sample_T)
        )
        return loss_sum, {**sums, "position_weight_sum": (weight_T * mask_T).sum()}
