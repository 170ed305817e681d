"""Differentiable log-probabilities of given tokens on vocab-parallel logits (GRPO and SFT).

``log p(y_t)`` over the full (sharded) vocabulary, with an analytic backward
``d log p(y) / d logits = onehot(y) - p``: the forward needs one all-reduce of the row maxima
and one of (sum of exp, picked logit, -entropy) per chunk; the backward recomputes each chunk's
probabilities from the saved log-normaliser and needs no collective. Nothing of size
[tokens, full vocab] exists; Megatron's padded vocabulary columns carry no mass and get zero
gradient. The policy losses (``megaopsd/algorithm/policy_loss.py``) build on it.

Legend: T tokens, W vocab shard width on this rank, N valid columns of the shard, C chunk.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaopsd.loss.sharded import ReduceOp, all_reduce_rows, group_rank, valid_columns


def _chunk_stats(
    x_CN: torch.Tensor, ids_C: torch.Tensor, first_id: int, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(y), log-normaliser, entropy) of one chunk of float32 logits."""
    n_valid = x_CN.shape[1]
    local = ids_C - first_id
    inside = (local >= 0) & (local < n_valid)
    if n_valid:
        row_max = x_CN.amax(dim=1)
    else:  # a shard that is all padding
        row_max = x_CN.new_full(ids_C.shape, float("-inf"))
    (row_max,) = all_reduce_rows([row_max], ReduceOp.MAX, group)
    if n_valid:
        shifted = x_CN - row_max[:, None]
        exp = shifted.exp()
        sum_exp = exp.sum(dim=1)
        # sum exp(z) * z: with the global sum gives the entropy log S - sum p z
        exp_z = (exp * shifted).sum(dim=1)
        picked = shifted.gather(1, local.clamp(0, n_valid - 1)[:, None]).squeeze(1) * inside
    else:
        sum_exp = exp_z = picked = x_CN.new_zeros(ids_C.shape)
    sum_exp, exp_z, picked = all_reduce_rows([sum_exp, exp_z, picked], ReduceOp.SUM, group)
    log_norm = sum_exp.log()
    entropy = log_norm - exp_z / sum_exp
    return picked - log_norm, log_norm + row_max, entropy


class _TokenLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TW, ids_T, vocab_size, group, chunk_tokens):
        first_id, n_valid = valid_columns(logits_TW.shape[1], vocab_size, group_rank(group))
        dtype = torch.promote_types(logits_TW.dtype, torch.float32)
        logp_T = torch.empty(logits_TW.shape[0], dtype=dtype, device=logits_TW.device)
        lse_T = torch.empty_like(logp_T)
        entropy_T = torch.empty_like(logp_T)
        for start in range(0, logits_TW.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            x_CN = logits_TW[rows, :n_valid].to(dtype)
            logp_T[rows], lse_T[rows], entropy_T[rows] = _chunk_stats(x_CN, ids_T[rows], first_id, group)
        ctx.save_for_backward(logits_TW, ids_T, lse_T)
        ctx.spec = (first_id, n_valid, chunk_tokens)
        ctx.mark_non_differentiable(entropy_T)
        return logp_T, entropy_T

    @staticmethod
    def backward(ctx, grad_logp_T, _grad_entropy):
        logits_TW, ids_T, lse_T = ctx.saved_tensors
        first_id, n_valid, chunk_tokens = ctx.spec
        grad_TW = torch.zeros_like(logits_TW)
        if n_valid == 0:
            return grad_TW, None, None, None, None
        for start in range(0, logits_TW.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            g_C = grad_logp_T[rows]
            p_CN = (logits_TW[rows, :n_valid].to(lse_T.dtype) - lse_T[rows, None]).exp_()
            g_CN = p_CN.mul_(-g_C[:, None])
            local = ids_T[rows] - first_id
            inside = (local >= 0) & (local < n_valid)
            owned = inside.nonzero().squeeze(1)
            g_CN[owned, local[owned]] += g_C[owned]
            grad_TW[rows, :n_valid] = g_CN.to(grad_TW.dtype)
        return grad_TW, None, None, None, None


def vocab_parallel_token_logprobs(
    logits_TW: torch.Tensor,
    ids_T: torch.Tensor,
    *,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(ids), entropy)`` per token at temperature 1; the first carries gradient.

    Args:
        logits_TW: this rank's vocab shard of the logits, [tokens, shard width].
        ids_T: global token ids, [tokens], all < ``vocab_size``.
        vocab_size: true vocabulary size; padded columns are excluded.
        tp_group: the TP group (None: no TP).
        chunk_tokens: tokens per chunk (bounds the float32 working copies).

    Returns:
        log-probabilities [tokens] (float32, float64 for float64 logits; differentiable w.r.t.
        ``logits_TW``) and entropies [tokens] (no gradient).
    """
    return _TokenLogprob.apply(logits_TW, ids_T, vocab_size, tp_group, chunk_tokens)
