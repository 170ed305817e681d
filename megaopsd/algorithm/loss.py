"""The per-token loss the last pipeline stage applies, bound to the loss config and TP group."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from megaopsd.algorithm.forward import LossFn
from megaopsd.config import LossConfig
from megaopsd.loss import vocab_parallel_divergence
from megaopsd.loss.boundary import first_token_sums


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
