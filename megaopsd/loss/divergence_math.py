"""Per-token KL-family divergences and their closed-form gradients, on rows of log-probs.

The same functions serve the full (sharded) vocabulary and the small k-way distributions of the
top-k losses: they return LOCAL partial sums, and the caller all-reduces them over the TP group
(or not, for an unsharded row) before ``combine``.

Modes (GKD / OPSD convention, m = beta * p_T + (1 - beta) * p_S):

- ``forward``: KL(p_T || p_S)                       (jsd with beta = 0, and forward_kl)
- ``reverse``: KL(p_S || p_T)                       (jsd with beta = 1, and reverse_kl)
- ``jsd``:     beta * KL(p_T || m) + (1 - beta) * KL(p_S || m), 0 < beta < 1

Gradients are taken with respect to the student's SCALED logits s = z / tau, where
p_S = softmax(s); dividing by tau gives the gradient with respect to z. With g_i = dD/dp_S,i the
softmax chain rule gives dD/ds = p_S * (g - <p_S, g>):

- forward: dD/ds = p_S - p_T
- reverse: dD/ds = p_S * (log p_S - log p_T - KL(p_S || p_T))
- jsd:     dD/ds = (1 - beta) * p_S * (log p_S - log m - KL(p_S || m))

Legend: C = tokens in a chunk, N = vocab columns (a shard, or k / k + 1 outcomes).
"""

from __future__ import annotations

import torch

from megaopsd.loss.sharded import LogSoftmax, Scratch, empty_like, row_dot

MODES = ("forward", "reverse", "jsd")


def kl_mode(kind: str, beta: float) -> str:
    """The divergence a loss kind and beta amount to (beta 0 / 1 are the KL special cases)."""
    if kind == "forward_kl" or (kind != "reverse_kl" and beta == 0.0):
        return "forward"
    if kind == "reverse_kl" or beta == 1.0:
        return "reverse"
    return "jsd"


def log_mixture(
    student: LogSoftmax, teacher: LogSoftmax, beta: float, scratch: Scratch | None = None
) -> torch.Tensor:
    """log m, m = beta * p_T + (1 - beta) * p_S, in scratch buffer "logm".

    Where both probabilities underflow to 0, m is clamped to the smallest normal number: the
    terms using log m are then multiplied by a zero probability, so the clamp only avoids
    0 * inf = nan and changes no value.
    """
    m_CN = torch.mul(student.p_CN, 1.0 - beta, out=empty_like(scratch, "logm", student.p_CN))
    m_CN.add_(teacher.p_CN, alpha=beta)
    return m_CN.clamp_min_(torch.finfo(m_CN.dtype).tiny).log_()


def local_sums(
    student: LogSoftmax, teacher: LogSoftmax, mode: str, beta: float, scratch: Scratch | None = None
) -> list[torch.Tensor]:
    """Local partial sums over this shard's columns that ``combine`` turns into the divergence.

    Each sum is a probability-weighted difference of log-probs (not a difference of two sums)
    so that a small divergence is not lost to cancellation between two entropies. CONSUMES the
    inputs: the log-prob buffers are overwritten (the probabilities are kept).
    Scratch buffers: "logm", "prod".
    """
    ls, lt = student.logp_CN, teacher.logp_CN
    if mode == "forward":
        return [row_dot(teacher.p_CN, lt.sub_(ls), scratch)]
    if mode == "reverse":
        return [row_dot(student.p_CN, ls.sub_(lt), scratch)]
    logm_CN = log_mixture(student, teacher, beta, scratch)
    kl_t = row_dot(teacher.p_CN, lt.sub_(logm_CN), scratch)
    kl_s = row_dot(student.p_CN, ls.sub_(logm_CN), scratch)
    return [kl_t, kl_s]


def combine(sums: list[torch.Tensor], mode: str, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Divergence per token from the all-reduced ``local_sums``, plus the scalar ``grad`` needs.

    Returns:
        (divergence_C, aux_C): aux is KL(p_S || p_T) for reverse, KL(p_S || m) for jsd, 0 for
        forward.
    """
    if mode == "forward":
        return sums[0], torch.zeros_like(sums[0])
    if mode == "reverse":
        return sums[0], sums[0]
    kl_t, kl_s = sums
    return beta * kl_t + (1.0 - beta) * kl_s, kl_s


def grad(
    student: LogSoftmax,
    teacher: LogSoftmax,
    aux_C: torch.Tensor,
    mode: str,
    beta: float,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """dD/ds for the student's scaled logits s (see module docstring), not yet divided by tau.

    Works in place: the result is one of the student's buffers (which it overwrites).
    Scratch buffer: "logm".
    """
    if mode == "forward":
        return student.p_CN.sub_(teacher.p_CN)
    if mode == "reverse":
        r_CN = student.logp_CN.sub_(teacher.logp_CN)
    else:
        r_CN = student.logp_CN.sub_(log_mixture(student, teacher, beta, scratch))
    r_CN.sub_(aux_C[:, None]).mul_(student.p_CN)
    return r_CN if mode == "reverse" else r_CN.mul_(1.0 - beta)


def dense_divergence_and_grad(
    student: LogSoftmax, teacher: LogSoftmax, mode: str, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Divergence and dD/ds of small, unsharded rows (the k-way top-k distributions) at once.

    Returns:
        (divergence_C, grad_CN); the inputs are left intact.
    """

    def copy(d: LogSoftmax) -> LogSoftmax:
        return LogSoftmax(logp_CN=d.logp_CN.clone(), p_CN=d.p_CN.clone(), lse_C=d.lse_C)

    div_C, aux_C = combine(local_sums(copy(student), copy(teacher), mode, beta), mode, beta)
    return div_C, grad(copy(student), teacher, aux_C, mode, beta)
