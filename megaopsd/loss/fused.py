"""Compiled chunk bodies of the full-vocab losses: each pass over a [C, N] chunk is one kernel.

The reference path (``divergence.py`` with ``divergence_math`` / ``entry_clip``) walks a chunk
with a dozen separate torch operations, each reading and writing a [C, N] float32 buffer: on a
GPU that is an order of magnitude more memory traffic than the loss needs. Here the same math is
written as pure functions of the raw logits (gather of the chunk's rows, upcast, temperature,
softmax statistics and the per-token sums or the gradient) and handed to ``torch.compile``,
which generates one fused kernel per pass; the logits are read in their own dtype, and the only
float32 [C, N] copy is the top-k kinds' scaled teacher rows, which the selection reads.

Passes, per chunk (P = TP size, each collective is one all-reduce of per-token rows):

- forward: row max (P > 1 only) -> sum of exp -> the kind's per-token sums; without TP the first
  two are one ``logsumexp``. Every pass reads both logit chunks once; the top-k kinds add one
  pass over the teacher's (the scaled rows) and gather the student's values at the chosen ids.
- backward: one pass that rebuilds the probabilities from the saved log-normalisers and writes
  the gradient, already scaled by each token's coefficient, in the logits' dtype.

Every kind: the KL family (jsd, forward_kl, reverse_kl) with no clip, token clip and entry clip,
the sampled-token ``pg`` loss, and the teacher top-k kinds. For those the full-vocab passes are
fused here (scaled teacher rows for the selection, the entropies and the tail masses, the
gradient), while the selection itself (``sharded.global_topk``: torch.topk, one all-gather) and
the k(+1)-way math on [C, K] stay torch operations in ``divergence.py``. Formulas:
divergence_math and entry_clip; the results equal the reference path's to float32 rounding (the
tests hold both to the float64 reference).

Legend: T = tokens, C = tokens in a chunk, N = valid vocab columns on this rank.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist

from megaopsd.loss.sharded import ReduceOp, all_reduce_rows, named_columns

# torch.compile's backend: inductor generates the kernels (Triton on CUDA, C++ on CPU). The CPU
# tests trace the same graphs with "eager" (each inductor build costs seconds of C++ compiling)
# and build a few with inductor.
BACKEND = "inductor"


def _compiled(fn: Callable) -> Callable:
    return _compile(fn, BACKEND)


@functools.lru_cache(maxsize=256)
def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim tensor holding ``value``: the graphs take temperature, beta and clip as inputs.

    As Python floats they would be compiled in: inductor's on-disk cache then hands a kernel
    built for one clip to a later process with another (measured: the capped loss of clip 0.05
    returned for clip 0.02), and every new value would be a new compilation.
    """
    return torch.tensor(value, dtype=dtype, device=device)


# Graphs one function may get: a run needs a few (mode, dtype, a chunk of one row...); a process
# that runs many configs (a test worker, a bench) more. Past dynamo's limit (8 in torch 2.13) a
# fullgraph function is an error, not a fallback, so the limit is raised to this at first use.
RECOMPILE_LIMIT = 64


@functools.cache
def _compile(fn: Callable, backend: str) -> Callable:
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    # dynamic: the chunk's token count varies (the last chunk, the mask); one graph serves all.
    # fullgraph: a graph break would split the pass into several kernels again; it is an error.
    return torch.compile(fn, dynamic=True, fullgraph=True, backend=backend)


def _scaled(
    src_TN: torch.Tensor, rows_C: torch.Tensor, tau: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    return src_TN.index_select(0, rows_C).to(dtype) / tau


def _logp(src_TN, rows_C, lse_C, tau, dtype):
    return _scaled(src_TN, rows_C, tau, dtype) - lse_C[:, None]


def _pair(s_TN, t_TN, rows_C, lse_s_C, lse_t_C, tau, dtype):
    """Log-probabilities and probabilities of the chunk's student and teacher rows."""
    ls, lt = _logp(s_TN, rows_C, lse_s_C, tau, dtype), _logp(t_TN, rows_C, lse_t_C, tau, dtype)
    return ls, lt, ls.exp(), lt.exp()


# ----------------------------------------------------------------------------- log-normalisers


def _lse_pair(s_TN, t_TN, rows_C, tau: torch.Tensor, dtype: torch.dtype):
    return (
        torch.logsumexp(_scaled(s_TN, rows_C, tau, dtype), dim=1),
        torch.logsumexp(_scaled(t_TN, rows_C, tau, dtype), dim=1),
    )


def _max_pair(s_TN, t_TN, rows_C, tau: torch.Tensor, dtype: torch.dtype):
    return (
        _scaled(s_TN, rows_C, tau, dtype).amax(dim=1),
        _scaled(t_TN, rows_C, tau, dtype).amax(dim=1),
    )


def _sumexp_pair(s_TN, t_TN, rows_C, max_s_C, max_t_C, tau: torch.Tensor, dtype: torch.dtype):
    return (
        (_scaled(s_TN, rows_C, tau, dtype) - max_s_C[:, None]).exp().sum(dim=1),
        (_scaled(t_TN, rows_C, tau, dtype) - max_t_C[:, None]).exp().sum(dim=1),
    )


def log_normalisers(
    student_TN: torch.Tensor,
    teacher_TN: torch.Tensor,
    rows_C: torch.Tensor,
    *,
    tau: float,
    dtype: torch.dtype,
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-vocab log-normalisers of the chunk's scaled student and teacher rows."""
    tau_ = _scalar(tau, dtype, rows_C.device)
    if group is None:
        return _compiled(_lse_pair)(student_TN, teacher_TN, rows_C, tau_, dtype)
    if student_TN.shape[1] == 0:  # a shard of padding only: no mass here, the other ranks' sums
        max_s_C = max_t_C = torch.full(rows_C.shape, float("-inf"), dtype=dtype, device=rows_C.device)
    else:
        max_s_C, max_t_C = _compiled(_max_pair)(student_TN, teacher_TN, rows_C, tau_, dtype)
    max_s_C, max_t_C = all_reduce_rows([max_s_C, max_t_C], ReduceOp.MAX, group)
    sums = _compiled(_sumexp_pair)(student_TN, teacher_TN, rows_C, max_s_C, max_t_C, tau_, dtype)
    sum_s_C, sum_t_C = all_reduce_rows(list(sums), ReduceOp.SUM, group)
    return max_s_C + sum_s_C.log(), max_t_C + sum_t_C.log()


# ----------------------------------------------------------------------------- KL family


def _log_mixture(ps, pt, beta: torch.Tensor):
    m = (1.0 - beta) * ps + beta * pt
    return m.clamp_min(torch.finfo(m.dtype).tiny).log()


def _terms(ls, lt, ps, pt, mode: str, beta: torch.Tensor):
    """Pointwise divergence terms t and gradient coefficients a (entry_clip's docstring)."""
    if mode == "forward":
        return pt * (lt - ls), -pt
    if mode == "reverse":
        term = ps * (ls - lt)
        return term, term + ps
    logm = _log_mixture(ps, pt, beta)
    coef = (1.0 - beta) * ps * (ls - logm)
    return beta * pt * (lt - logm) + coef, coef


def _kl_sums(
    s_TN, t_TN, rows_C, lse_s_C, lse_t_C, tau: torch.Tensor, dtype: torch.dtype, mode: str, beta: torch.Tensor
):
    """[divergence sums of divergence_math.local_sums..., -H(student), -H(teacher)]."""
    ls, lt, ps, pt = _pair(s_TN, t_TN, rows_C, lse_s_C, lse_t_C, tau, dtype)
    entropies = [(ps * ls).sum(dim=1), (pt * lt).sum(dim=1)]
    if mode == "forward":
        return [(pt * (lt - ls)).sum(dim=1), *entropies]
    if mode == "reverse":
        return [(ps * (ls - lt)).sum(dim=1), *entropies]
    logm = _log_mixture(ps, pt, beta)
    return [(pt * (lt - logm)).sum(dim=1), (ps * (ls - logm)).sum(dim=1), *entropies]


def _kl_entry_sums(
    s_TN,
    t_TN,
    rows_C,
    lse_s_C,
    lse_t_C,
    tau: torch.Tensor,
    dtype: torch.dtype,
    mode: str,
    beta: torch.Tensor,
    clip: torch.Tensor,
):
    """[entry_clip.SUM_NAMES..., -H(student), -H(teacher)]."""
    ls, lt, ps, pt = _pair(s_TN, t_TN, rows_C, lse_s_C, lse_t_C, tau, dtype)
    term, coef = _terms(ls, lt, ps, pt, mode, beta)
    clipped = term > clip
    capped = term.clamp(max=clip)
    return [
        term.sum(dim=1),
        capped.sum(dim=1),
        clipped.sum(dim=1).to(dtype),
        capped.clamp(min=0.0).sum(dim=1),
        torch.where(clipped, 0.0, coef).sum(dim=1),
        (ps * ls).sum(dim=1),
        (pt * lt).sum(dim=1),
    ]


def kl_sums(
    student_TN: torch.Tensor,
    teacher_TN: torch.Tensor,
    rows_C: torch.Tensor,
    lse: tuple[torch.Tensor, torch.Tensor],
    *,
    tau: float,
    dtype: torch.dtype,
    mode: str,
    beta: float,
    clip: float | None,
    group: dist.ProcessGroup | None,
) -> list[torch.Tensor]:
    """The all-reduced per-token sums of the KL family: ``divergence_math.local_sums`` (or, with
    ``clip`` in entry mode, ``entry_clip.SUM_NAMES``) followed by -H(student), -H(teacher)."""
    tau_, beta_ = _scalar(tau, dtype, rows_C.device), _scalar(beta, dtype, rows_C.device)
    if clip is None:
        sums = _compiled(_kl_sums)(student_TN, teacher_TN, rows_C, *lse, tau_, dtype, mode, beta_)
    else:
        clip_ = _scalar(clip, dtype, rows_C.device)
        sums = _compiled(_kl_entry_sums)(
            student_TN, teacher_TN, rows_C, *lse, tau_, dtype, mode, beta_, clip_
        )
    return all_reduce_rows(list(sums), ReduceOp.SUM, group)


def _kl_grad(
    s_TN,
    t_TN,
    rows_C,
    lse_s_C,
    lse_t_C,
    aux_C,
    coef_C,
    tau: torch.Tensor,
    dtype: torch.dtype,
    mode: str,
    beta: torch.Tensor,
):
    ls, lt, ps, pt = _pair(s_TN, t_TN, rows_C, lse_s_C, lse_t_C, tau, dtype)  # unused ones: no code
    if mode == "forward":
        g = ps - pt
    elif mode == "reverse":
        g = ps * (ls - lt - aux_C[:, None])
    else:
        g = (1.0 - beta) * ps * (ls - _log_mixture(ps, pt, beta) - aux_C[:, None])
    return (g * coef_C[:, None]).to(s_TN.dtype)


def _kl_entry_grad(
    s_TN,
    t_TN,
    rows_C,
    lse_s_C,
    lse_t_C,
    coef_sum_C,
    coef_C,
    tau: torch.Tensor,
    dtype: torch.dtype,
    mode: str,
    beta: torch.Tensor,
    clip: torch.Tensor,
):
    ls, lt, ps, pt = _pair(s_TN, t_TN, rows_C, lse_s_C, lse_t_C, tau, dtype)
    term, a = _terms(ls, lt, ps, pt, mode, beta)
    g = torch.where(term > clip, 0.0, a) - ps * coef_sum_C[:, None]
    return (g * coef_C[:, None]).to(s_TN.dtype)


def kl_grad(
    student_TN: torch.Tensor,
    teacher_TN: torch.Tensor,
    rows_C: torch.Tensor,
    saved: dict[str, torch.Tensor],
    coef_C: torch.Tensor,
    *,
    tau: float,
    dtype: torch.dtype,
    mode: str,
    beta: float,
    clip: float | None,
) -> torch.Tensor:
    """d loss / d logits of the chunk's rows, each row times ``coef_C`` (weight x upstream / tau),
    in the logits' dtype. ``saved``: "lse_s", "lse_t" and "aux" (or, entry clip, "coef")."""
    lse = (saved["lse_s"], saved["lse_t"])
    tau_, beta_ = _scalar(tau, dtype, rows_C.device), _scalar(beta, dtype, rows_C.device)
    if clip is None:
        return _compiled(_kl_grad)(
            student_TN, teacher_TN, rows_C, *lse, saved["aux"], coef_C, tau_, dtype, mode, beta_
        )
    return _compiled(_kl_entry_grad)(
        student_TN,
        teacher_TN,
        rows_C,
        *lse,
        saved["coef"],
        coef_C,
        tau_,
        dtype,
        mode,
        beta_,
        _scalar(clip, dtype, rows_C.device),
    )


# ----------------------------------------------------------------------------- sampled-token PG


def _pg_sums(s_TN, t_TN, rows_C, local_C, lse_s_C, lse_t_C, tau: torch.Tensor, dtype: torch.dtype):
    """[log p_S(y), log p_T(y) (0 where y is another rank's), -H(student), -H(teacher)]."""
    ls, lt, ps, pt = _pair(s_TN, t_TN, rows_C, lse_s_C, lse_t_C, tau, dtype)
    at_y = torch.arange(ls.shape[1], device=ls.device)[None, :] == local_C[:, None]
    return [
        torch.where(at_y, ls, 0.0).sum(dim=1),
        torch.where(at_y, lt, 0.0).sum(dim=1),
        (ps * ls).sum(dim=1),
        (pt * lt).sum(dim=1),
    ]


def pg_sums(
    student_TN: torch.Tensor,
    teacher_TN: torch.Tensor,
    rows_C: torch.Tensor,
    local_C: torch.Tensor,
    lse: tuple[torch.Tensor, torch.Tensor],
    *,
    tau: float,
    dtype: torch.dtype,
    group: dist.ProcessGroup | None,
) -> list[torch.Tensor]:
    """All-reduced [log p_S(y), log p_T(y), -H(student), -H(teacher)]; ``local_C`` is y's column
    on this rank, or the spare column N where another rank holds it (``sharded.spare_column_index``)."""
    sums = _compiled(_pg_sums)(
        student_TN, teacher_TN, rows_C, local_C, *lse, _scalar(tau, dtype, rows_C.device), dtype
    )
    return all_reduce_rows(list(sums), ReduceOp.SUM, group)


def _pg_grad(s_TN, rows_C, local_C, lse_s_C, adv_C, coef_C, tau: torch.Tensor, dtype: torch.dtype):
    ps = _logp(s_TN, rows_C, lse_s_C, tau, dtype).exp()
    at_y = torch.arange(ps.shape[1], device=ps.device)[None, :] == local_C[:, None]
    g = (ps - at_y.to(dtype)) * adv_C[:, None]
    return (g * coef_C[:, None]).to(s_TN.dtype)


def pg_grad(
    student_TN: torch.Tensor,
    rows_C: torch.Tensor,
    saved: dict[str, torch.Tensor],
    coef_C: torch.Tensor,
    *,
    tau: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """d loss / d logits = adv (p_S - onehot(y)) per row, times ``coef_C``, in the logits' dtype.
    ``saved``: "lse_s", "adv" and "local" (y's column on this rank, the spare column N on the others)."""
    tau_ = _scalar(tau, dtype, rows_C.device)
    return _compiled(_pg_grad)(
        student_TN, rows_C, saved["local"], saved["lse_s"], saved["adv"], coef_C, tau_, dtype
    )


# ----------------------------------------------------------------------------- teacher top-k


def scaled_rows(
    src_TN: torch.Tensor, rows_C: torch.Tensor, *, tau: float, dtype: torch.dtype
) -> torch.Tensor:
    """The chunk's rows of ``src_TN`` / tau in ``dtype`` ([C, N]): what the top-k is chosen on."""
    return _compiled(_scaled)(src_TN, rows_C, _scalar(tau, dtype, rows_C.device), dtype)


def _topk_sums(
    s_TN, t_TN, rows_C, lse_s_C, lse_t_C, cols_CK, tau: torch.Tensor, dtype: torch.dtype, tail: bool
):
    """[-H(student), -H(teacher)], and with ``tail`` the masses outside the top-k columns."""
    ls, lt, ps, pt = _pair(s_TN, t_TN, rows_C, lse_s_C, lse_t_C, tau, dtype)
    sums = [(ps * ls).sum(dim=1), (pt * lt).sum(dim=1)]
    if tail:
        # Summed outside the top-k directly (not 1 - top-k mass), which keeps a small tail exact.
        top = named_columns(cols_CK, ls.shape[1])
        sums += [torch.where(top, 0.0, ps).sum(dim=1), torch.where(top, 0.0, pt).sum(dim=1)]
    return sums


def topk_sums(
    student_TN: torch.Tensor,
    teacher_TN: torch.Tensor,
    rows_C: torch.Tensor,
    cols_CK: torch.Tensor,
    lse: tuple[torch.Tensor, torch.Tensor],
    *,
    tau: float,
    dtype: torch.dtype,
    tail: bool,
    group: dist.ProcessGroup | None,
) -> list[torch.Tensor]:
    """All-reduced [-H(student), -H(teacher)] (+ [tail_S, tail_T] with ``tail``); ``cols_CK``:
    the top-k ids' columns on this rank (``sharded.spare_column_index``)."""
    tau_ = _scalar(tau, dtype, rows_C.device)
    sums = _compiled(_topk_sums)(student_TN, teacher_TN, rows_C, *lse, cols_CK, tau_, dtype, tail)
    return all_reduce_rows(list(sums), ReduceOp.SUM, group)


def _topk_grad(s_TN, rows_C, lse_s_C, tail_coef_C, cols_CK, g_top_CK, coef_C, tau, dtype: torch.dtype):
    n = s_TN.shape[1]
    g = torch.zeros(rows_C.shape[0], n + 1, dtype=dtype, device=s_TN.device)
    g = g.scatter(1, cols_CK, g_top_CK)[:, :n]
    if tail_coef_C is not None:  # a tail column i gets G_tail * p_S,i / tail_S
        p_tail = _logp(s_TN, rows_C, lse_s_C, tau, dtype).exp() * tail_coef_C[:, None]
        g = torch.where(named_columns(cols_CK, n), g, p_tail)
    return (g * coef_C[:, None]).to(s_TN.dtype)


def topk_grad(
    student_TN: torch.Tensor,
    rows_C: torch.Tensor,
    cols_CK: torch.Tensor,
    saved: dict[str, torch.Tensor],
    coef_C: torch.Tensor,
    *,
    tau: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """d loss / d logits of a top-k chunk times ``coef_C``, in the logits' dtype: "g_top" at the
    top-k columns and, for topk_tail ("tail_coef" and "lse_s" saved), the tail's share elsewhere."""
    return _compiled(_topk_grad)(
        student_TN,
        rows_C,
        saved.get("lse_s"),
        saved.get("tail_coef"),
        cols_CK,
        saved["g_top"],
        coef_C,
        _scalar(tau, dtype, rows_C.device),
        dtype,
    )
