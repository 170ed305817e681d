"""The thinking boundary: how teacher and student disagree at each response's FIRST token.

With think tags the first response token is where prompt formats clash: a teacher whose
template leaves the think block for the model to open predicts ``<think>`` while a student
whose prompt already closed it starts answering (OPSD issues #3 and #10). This module reports,
over the first token of every response in a microbatch, the divergence the loss kind measures
(before any clip) and how often the teacher's top-1 token there is a think tag. Diagnostic
only: no gradient, whatever the loss mask says about those tokens.

Legend: N = scored tokens, W = vocab shard width, R = first tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from megaopsd.loss.divergence import vocab_parallel_divergence
from megaopsd.loss.sharded import global_topk, group_rank, valid_columns


def think_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the think tags the tokenizer has as single tokens (none for most non-reasoning models)."""
    vocab = tokenizer.get_vocab()
    return [vocab[tag] for tag in ("<think>", "</think>") if tag in vocab]


def first_token_mask(sample_N: torch.Tensor) -> torch.Tensor:
    """True at the first scored token of each response (tokens of one response are contiguous)."""
    first_N = torch.ones_like(sample_N, dtype=torch.bool)
    first_N[1:] = sample_N[1:] != sample_N[:-1]
    return first_N


@torch.no_grad()
def first_token_sums(
    student_NW: torch.Tensor,
    teacher_NW: torch.Tensor,
    first_N: torch.Tensor,
    target_N: torch.Tensor,
    *,
    kind: str,
    beta: float,
    temperature: float,
    top_k: int | None,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None,
    think_ids: Sequence[int],
) -> dict[str, torch.Tensor]:
    """Sums over the first tokens: ``first_token_divergence_sum``, ``first_token_count`` and
    ``first_token_teacher_think_sum`` (teacher top-1 is one of ``think_ids``)."""
    rows_R = first_N.nonzero().flatten()
    student_RW, teacher_RW = student_NW.detach().index_select(0, rows_R), teacher_NW.index_select(0, rows_R)
    ones_R = torch.ones(rows_R.numel(), dtype=torch.float32, device=rows_R.device)
    _, metrics = vocab_parallel_divergence(
        student_RW,
        teacher_RW,
        ones_R,
        kind=kind,
        beta=beta,
        temperature=temperature,
        vocab_size=vocab_size,
        tp_group=tp_group,
        top_k=top_k,
        sampled_ids_T=target_N.index_select(0, rows_R) if kind == "pg" else None,
        implementation="torch",  # a metric over a few rows: not worth a compiled graph of its own
    )
    first_id, n_cols = valid_columns(teacher_RW.shape[1], vocab_size, group_rank(tp_group))
    _, top1_R1 = global_topk(teacher_RW[:, :n_cols].float(), 1, first_id, tp_group)
    think = torch.tensor(list(think_ids), dtype=torch.long, device=top1_R1.device)
    is_think_R = torch.isin(top1_R1[:, 0], think)
    return {
        "first_token_divergence_sum": metrics.divergence_sum,
        "first_token_count": metrics.token_count,
        "first_token_teacher_think_sum": is_think_R.sum().to(metrics.token_count.dtype),
    }
