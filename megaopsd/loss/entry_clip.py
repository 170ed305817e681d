"""Per-entry clipping: each vocabulary entry's pointwise divergence term capped before the sum.

The official OPSD trainer (``--jsd_token_clip``) clamps the UNREDUCED ``F.kl_div`` output, one
value per (token, vocabulary entry), at ``clip`` and only then sums over the vocabulary. A
token's loss is therefore ``sum_i min(t_i, clip)`` with the pointwise terms

- forward: t_i = p_T,i (log p_T,i - log p_S,i)
- reverse: t_i = p_S,i (log p_S,i - log p_T,i)
- jsd:     t_i = beta p_T,i (log p_T,i - log m_i) + (1 - beta) p_S,i (log p_S,i - log m_i)

Terms below the cap (negative ones included) are kept, so the clipped sum can go below zero.
A clipped entry is a constant: it passes no gradient. With u_i = [t_i <= clip] and the
student's scaled logits s (p_S = softmax(s)), every mode has the form
``dt_i/ds_j = a_i (delta_ij - p_S,j)``, so

    d loss / ds_j = u_j a_j - p_S,j * sum_i u_i a_i

with a_i = -p_T,i (forward), p_S,i (log p_S,i - log p_T,i + 1) (reverse) and
(1 - beta) p_S,i (log p_S,i - log m_i) (jsd: the log m derivative cancels the +1). The only
cross-shard quantity is the per-token ``sum_i u_i a_i``, all-reduced once in the forward pass.

Legend: C = tokens in a chunk, N = vocab columns (a shard, or k / k + 1 outcomes).
"""

from __future__ import annotations

import torch

from megaopsd.loss.divergence_math import log_mixture
from megaopsd.loss.sharded import LogSoftmax, Scratch, empty_like

# Per-token sums ``clip_sums`` returns, in order (the caller all-reduces them together).
SUM_NAMES = ("divergence", "loss", "clipped_entries", "positive_loss", "coef")


def terms_and_coef(
    student: LogSoftmax, teacher: LogSoftmax, mode: str, beta: float, scratch: Scratch | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointwise terms t and gradient coefficients a (see module docstring); inputs kept intact.

    Scratch buffers: "term", "coef", "logm".
    """
    ls, lt, ps, pt = student.logp_CN, teacher.logp_CN, student.p_CN, teacher.p_CN
    term_CN = empty_like(scratch, "term", ls)
    coef_CN = empty_like(scratch, "coef", ls)
    if mode == "forward":
        torch.sub(lt, ls, out=term_CN).mul_(pt)
        torch.neg(pt, out=coef_CN)
    elif mode == "reverse":
        torch.sub(ls, lt, out=term_CN).mul_(ps)
        torch.add(term_CN, ps, out=coef_CN)
    else:
        logm_CN = log_mixture(student, teacher, beta, scratch)
        torch.sub(ls, logm_CN, out=coef_CN).mul_(ps).mul_(1.0 - beta)
        torch.sub(lt, logm_CN, out=term_CN).mul_(pt).mul_(beta).add_(coef_CN)
    return term_CN, coef_CN


def clip_sums(
    term_CN: torch.Tensor, coef_CN: torch.Tensor, clip: float, scratch: Scratch | None = None
) -> list[torch.Tensor]:
    """LOCAL per-token sums named in ``SUM_NAMES``; CONSUMES both inputs (clamped / masked in place).

    ``coef`` is ``sum_i u_i a_i``, the one number the backward pass needs from other shards.
    Scratch buffer: "prod".
    """
    divergence_C = term_CN.sum(dim=1)
    clipped_CN = term_CN > clip
    coef_C = coef_CN.masked_fill_(clipped_CN, 0.0).sum(dim=1)
    clipped_C = clipped_CN.sum(dim=1).to(term_CN.dtype)
    loss_C = term_CN.clamp_(max=clip).sum(dim=1)
    positive_C = torch.clamp(term_CN, min=0.0, out=empty_like(scratch, "prod", term_CN)).sum(dim=1)
    return [divergence_C, loss_C, clipped_C, positive_C, coef_C]


def grad(
    student: LogSoftmax,
    teacher: LogSoftmax,
    coef_sum_C: torch.Tensor,
    mode: str,
    beta: float,
    clip: float,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """d loss / ds for the scaled student logits (not yet divided by tau), from the saved sums.

    Recomputes the terms, so the clip decisions equal the forward pass's when the log-probs and
    probabilities are computed the same way. Returns scratch buffer "coef".
    """
    term_CN, coef_CN = terms_and_coef(student, teacher, mode, beta, scratch)
    coef_CN.masked_fill_(term_CN > clip, 0.0)
    return coef_CN.addcmul_(student.p_CN, coef_sum_C[:, None], value=-1.0)


def dense_clip_and_grad(
    student: LogSoftmax, teacher: LogSoftmax, mode: str, beta: float, clip: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``clip_sums`` and the gradient of small unsharded rows (the k-way top-k distributions).

    Returns:
        (sums as in ``SUM_NAMES``, grad_CN with respect to the k(+1)-way scaled logits).
    """
    term_CN, coef_CN = terms_and_coef(student, teacher, mode, beta)
    unclipped_coef_CN = coef_CN.masked_fill(term_CN > clip, 0.0)
    sums = clip_sums(term_CN, coef_CN, clip)
    return sums, unclipped_coef_CN.addcmul_(student.p_CN, sums[-1][:, None], value=-1.0)
