"""Log-probabilities of given tokens under vocab-parallel logits (no gradient).

Used for the rollout/trainer mismatch metric: the trainer's student log-probability of each
sampled token at temperature 1, compared with the engine's. Two all-reduces per chunk (max and
sum of exp over the TP group) and one for the picked logit; nothing of size [tokens, vocab].

Legend: T tokens, W vocab shard width on this rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaopsd.loss.sharded import group_rank, group_size, valid_columns


@torch.no_grad()
def token_logprobs(
    logits_TW: torch.Tensor,
    ids_T: torch.Tensor,
    *,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """``log softmax(logits)[t, ids[t]]`` over the full (sharded) vocabulary, at temperature 1.

    Args:
        logits_TW: this rank's vocab shard of the logits, [tokens, shard width].
        ids_T: global token ids, [tokens].
        vocab_size: true vocabulary size; padded columns are excluded.
        tp_group: the TP group (None: no TP).
        chunk_tokens: tokens per chunk (bounds the float32 working copy).

    Returns:
        [tokens] log-probabilities in float32 (float64 for float64 logits).
    """
    first_id, n_valid = valid_columns(logits_TW.shape[1], vocab_size, group_rank(tp_group))
    dtype = torch.promote_types(logits_TW.dtype, torch.float32)
    out = torch.empty(logits_TW.shape[0], dtype=dtype, device=logits_TW.device)
    for start in range(0, logits_TW.shape[0], chunk_tokens):
        x_CW = logits_TW[start : start + chunk_tokens, :n_valid].to(dtype)
        ids_C = ids_T[start : start + chunk_tokens]
        local = ids_C - first_id
        inside = (local >= 0) & (local < n_valid)
        if n_valid:
            row_max = x_CW.amax(dim=1)
            picked = x_CW.gather(1, local.clamp(0, n_valid - 1)[:, None]).squeeze(1) * inside
        else:
            row_max = x_CW.new_full(ids_C.shape, float("-inf"))
            picked = x_CW.new_zeros(ids_C.shape)
        if group_size(tp_group) > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
        sum_exp = (x_CW - row_max[:, None]).exp().sum(dim=1) if n_valid else x_CW.new_zeros(ids_C.shape)
        if group_size(tp_group) > 1:
            stacked = torch.stack([sum_exp, picked])
            dist.all_reduce(stacked, group=tp_group)
            sum_exp, picked = stacked.unbind(0)
        out[start : start + chunk_tokens] = picked - row_max - sum_exp.log()
    return out
