"""OPSD divergences on vocab-parallel logits: one entry point, chunked over tokens, analytic backward.

``vocab_parallel_divergence`` takes the student's and the teacher's logits as each TP rank holds
them ([tokens, vocab shard]) and returns the masked SUM of the per-token loss plus metrics; the
caller divides by the global token count. The forward pass walks the unmasked tokens in chunks
and keeps only a few per-token scalars (log-normalisers, the scalar the gradient needs, the
k-way gradient of the top-k losses); the backward pass recomputes each chunk's probabilities
from them and writes the closed-form gradient. No autograd runs through a collective, and the
extra memory is O(chunk x vocab shard) on top of the gradient itself.

Kinds: ``jsd`` (generalized JSD(beta); beta 0 / 1 are forward / reverse KL), ``forward_kl``,
``reverse_kl``, ``topk`` (the divergence on the teacher's global top-k, both renormalised),
``topk_tail`` (top-k plus one tail outcome holding the rest of the mass) and ``pg`` (the
sampled-token policy gradient -sg(log p_T(y) - log p_S(y)) * log p_S(y)).

Legend: T = tokens, W = vocab shard width (TP-padded), C = tokens in a chunk, N = valid vocab
columns on this rank, K = top-k width, R = tokens with a non-zero mask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist

from megaopsd.config import CLIP_MODES as CLIP_MODE_CHOICES
from megaopsd.config import LOSS_IMPLEMENTATIONS, LOSS_KINDS
from megaopsd.loss import divergence_math as dm
from megaopsd.loss import entry_clip as ec
from megaopsd.loss import fused
from megaopsd.loss.sharded import (
    LogSoftmax,
    ReduceOp,
    Scratch,
    all_reduce_rows,
    columns_mask,
    gather_global_columns,
    global_topk,
    group_rank,
    group_size,
    in_shard,
    log_softmax_from_lse,
    row_dot,
    sharded_log_softmax,
    spare_column_index,
    valid_columns,
)
from megaopsd.runtime.kernels import compiles_kernels_for

KINDS = LOSS_KINDS  # the choices of loss.kind; _PATHS implements each (tests/unit/test_config.py)
CLIP_MODES = CLIP_MODE_CHOICES  # the choices of loss.clip_mode (entry_clip.py)
IMPLEMENTATIONS = LOSS_IMPLEMENTATIONS  # the choices of loss.implementation (fused.py)
_TOPK_KINDS = ("topk", "topk_tail")


@dataclasses.dataclass(frozen=True)
class DivergenceMetrics:
    """Detached 0-dim sums over the masked tokens (mask values act as weights).

    Divide by a global token count to log means. ``divergence_sum`` is before clipping; for
    ``pg`` it is the sampled estimate sum of log p_S(y) - log p_T(y) (reverse KL on-policy).
    Entropies are of the full-vocab distributions at the loss temperature.
    """

    divergence_sum: torch.Tensor
    student_entropy_sum: torch.Tensor
    teacher_entropy_sum: torch.Tensor
    teacher_topk_mass_sum: torch.Tensor | None  # full-vocab teacher mass on its top-k (top-k kinds)
    clipped_count: torch.Tensor  # tokens clipped (entry mode: tokens with at least one clipped entry)
    token_count: torch.Tensor
    # clip_mode="entry" only (else None): entries capped, entries scored (vocab, k or k + 1 per
    # token), the loss the capped entries contribute (clip each) and the sum of the positive
    # (capped) entry terms, so clipped_loss_sum / positive_loss_sum is the capped entries' share.
    clipped_entry_count: torch.Tensor | None = None
    entry_count: torch.Tensor | None = None
    clipped_loss_sum: torch.Tensor | None = None
    positive_loss_sum: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Spec:
    kind: str
    mode: str  # forward | reverse | jsd (see divergence_math)
    beta: float
    temperature: float
    top_k: int | None
    clip: float | None
    clip_mode: str  # token | entry
    chunk_tokens: int
    group: dist.ProcessGroup | None
    vocab_size: int
    first_id: int  # global id of this rank's first vocab column
    n_cols: int  # valid (unpadded) columns on this rank
    dtype: torch.dtype  # compute dtype: float32, or float64 for float64 inputs
    compiled: bool  # the chunk bodies of fused.py (else the torch operations below)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Chunk:
    """What the forward pass keeps of one chunk: per-token values and tensors for backward."""

    loss_C: torch.Tensor
    div_C: torch.Tensor
    student_entropy_C: torch.Tensor
    teacher_entropy_C: torch.Tensor
    topk_mass_C: torch.Tensor | None
    saved: dict[str, torch.Tensor]  # each [C] or [C, K]
    entry_C: list[torch.Tensor] | None = None  # entry clip: clipped entries, positive loss per token


Loader = Callable[[str], torch.Tensor]  # "student" | "teacher" -> this chunk's scaled [C, N] logits


def _chunk_loader(
    sources: dict[str, torch.Tensor], rows_C: torch.Tensor, spec: _Spec, scratch: Scratch
) -> Loader:
    """Loads the chunk's rows of a source (valid columns only) as compute-dtype logits / tau.

    The copy lands in the scratch buffer named after the source, so callers may work on it in
    place.
    """

    def load(which: str) -> torch.Tensor:
        src_TN = sources[which][:, : spec.n_cols]
        shape = (rows_C.numel(), spec.n_cols)
        x_CN = scratch.empty(which, shape, spec.dtype, src_TN.device)
        if src_TN.dtype == spec.dtype:
            torch.index_select(src_TN, 0, rows_C, out=x_CN)
        else:
            x_CN.copy_(src_TN.index_select(0, rows_C))
        return x_CN.div_(spec.temperature)

    return load


def _entropy_sums(student: LogSoftmax, teacher: LogSoftmax, scratch: Scratch) -> list[torch.Tensor]:
    """Local sums of p log p (negative entropies) of both distributions."""
    return [row_dot(student.p_CN, student.logp_CN, scratch), row_dot(teacher.p_CN, teacher.logp_CN, scratch)]


# ----------------------------------------------------------------------------- full-vocab KL family


def _kl_forward(load: Loader, _ids_C, spec: _Spec, scratch: Scratch) -> _Chunk:
    student, teacher = sharded_log_softmax([load("student"), load("teacher")], spec.group, scratch)
    neg_entropies = _entropy_sums(student, teacher, scratch)  # before local_sums consumes the log-probs
    sums = dm.local_sums(student, teacher, spec.mode, spec.beta, scratch) + neg_entropies
    sums = all_reduce_rows(sums, ReduceOp.SUM, spec.group)
    return _kl_chunk(sums, spec, saved={"lse_s": student.lse_C, "lse_t": teacher.lse_C})


def _kl_chunk(sums: list[torch.Tensor], spec: _Spec, saved: dict[str, torch.Tensor]) -> _Chunk:
    """A full-vocab chunk from its all-reduced per-token sums: ``divergence_math.local_sums`` (or,
    entry clip, ``entry_clip.SUM_NAMES``) followed by -H(student), -H(teacher). ``saved`` gets
    what backward needs beside the log-normalisers ("aux", or "coef" with entry clip)."""
    if spec.clip_mode == "entry":
        div_C, loss_C, clipped_C, positive_C, coef_C, neg_ent_s, neg_ent_t = sums
        saved, entry_C = saved | {"coef": coef_C}, [clipped_C, positive_C]
    else:
        *div_sums, neg_ent_s, neg_ent_t = sums
        div_C, aux_C = dm.combine(div_sums, spec.mode, spec.beta)
        saved, loss_C, entry_C = saved | {"aux": aux_C}, div_C, None
    return _Chunk(
        loss_C=loss_C,
        div_C=div_C,
        student_entropy_C=-neg_ent_s,
        teacher_entropy_C=-neg_ent_t,
        topk_mass_C=None,
        saved=saved,
        entry_C=entry_C,
    )


def _kl_backward(load: Loader, saved: dict[str, torch.Tensor], spec: _Spec, scratch: Scratch) -> torch.Tensor:
    student = log_softmax_from_lse(load("student"), saved["lse_s"], scratch, "p0")
    teacher = log_softmax_from_lse(load("teacher"), saved["lse_t"], scratch, "p1")
    if spec.clip_mode == "entry":
        return ec.grad(student, teacher, saved["coef"], spec.mode, spec.beta, spec.clip, scratch)
    return dm.grad(student, teacher, saved["aux"], spec.mode, spec.beta, scratch)


def _kl_entry_forward(load: Loader, _ids_C, spec: _Spec, scratch: Scratch) -> _Chunk:
    """Full-vocab divergence with each entry's term capped at ``spec.clip`` (entry_clip)."""
    student, teacher = sharded_log_softmax([load("student"), load("teacher")], spec.group, scratch)
    # Probabilities as exp(log p), exactly as the backward pass rebuilds them from the saved
    # log-normaliser: the per-entry clip decisions of both passes are then bit-identical.
    for d in (student, teacher):
        torch.exp(d.logp_CN, out=d.p_CN)
    neg_entropies = _entropy_sums(student, teacher, scratch)
    term_CN, coef_CN = ec.terms_and_coef(student, teacher, spec.mode, spec.beta, scratch)
    sums = ec.clip_sums(term_CN, coef_CN, spec.clip, scratch) + neg_entropies
    sums = all_reduce_rows(sums, ReduceOp.SUM, spec.group)
    return _kl_chunk(sums, spec, saved={"lse_s": student.lse_C, "lse_t": teacher.lse_C})


# ----------------------------------------------------------------------------- teacher top-k


def _topk_forward(load: Loader, _ids_C, spec: _Spec, scratch: Scratch) -> _Chunk:
    """Divergence on the teacher's global top-k (plus a tail outcome for ``topk_tail``)."""
    teacher_CN = load("teacher")
    # Chosen on the scaled logits, whose order is the log-probs' (one shift per row): the
    # compiled path chooses on the same values, before any normaliser exists.
    top_CK, ids_CK = global_topk(teacher_CN, spec.top_k, spec.first_id, spec.group)
    student, teacher = sharded_log_softmax([load("student"), teacher_CN], spec.group, scratch)
    vals_s_CK = gather_global_columns(student.logp_CN, ids_CK, spec.first_id, spec.group)
    rows = _entropy_sums(student, teacher, scratch)
    if spec.kind == "topk_tail":
        # Summing the mass outside the top-k directly (not 1 - top-k mass) keeps a small tail exact.
        outside_CN = (~columns_mask(ids_CK, spec.first_id, spec.n_cols)).to(spec.dtype)
        rows += [row_dot(student.p_CN, outside_CN, scratch), row_dot(teacher.p_CN, outside_CN, scratch)]
    rows = all_reduce_rows(rows, ReduceOp.SUM, spec.group)
    return _topk_chunk(vals_s_CK, top_CK - teacher.lse_C[:, None], ids_CK, rows, student.lse_C, spec)


def _topk_chunk(
    vals_s_CK: torch.Tensor,
    vals_t_CK: torch.Tensor,
    ids_CK: torch.Tensor,
    rows: list[torch.Tensor],
    lse_s_C: torch.Tensor,
    spec: _Spec,
) -> _Chunk:
    """A top-k chunk from the full-vocab log-probs at the teacher's top-k ids and the all-reduced
    rows [-H(student), -H(teacher)] (+ [tail_S, tail_T] for ``topk_tail``).

    The k(+1)-way distributions are softmaxes of "reduced logits": the full-vocab log-probs at
    the top-k ids (renormalised by the softmax for ``topk``) and, for the tail, the log of the
    mass outside the top-k. Their gradient G (k(+1) per token) is kept for backward: a top-k
    column gets G_j, a tail column i gets G_tail * p_S,i / tail_S (d log tail_S / d s_i).
    """
    k, tail = spec.top_k, spec.kind == "topk_tail"
    topk_mass_C = vals_t_CK.exp().sum(dim=1)
    if tail:
        # An empty or underflowed tail becomes a tiny mass; terms weighted by it stay ~0, not nan.
        tiny = torch.finfo(spec.dtype).tiny
        tail_s_C, tail_t_C = rows[2].clamp_min(tiny), rows[3].clamp_min(tiny)
        vals_s_CK = torch.cat([vals_s_CK, tail_s_C.log()[:, None]], dim=1)
        vals_t_CK = torch.cat([vals_t_CK, tail_t_C.log()[:, None]], dim=1)
    ks, kt = sharded_log_softmax([vals_s_CK, vals_t_CK], None)
    entry_C, loss_C = None, None
    if spec.clip_mode == "entry":
        (div_C, loss_C, clipped_C, positive_C, _), g_CK = ec.dense_clip_and_grad(
            ks, kt, spec.mode, spec.beta, spec.clip
        )
        entry_C = [clipped_C, positive_C]
    else:
        div_C, g_CK = dm.dense_divergence_and_grad(ks, kt, spec.mode, spec.beta)
    saved = {"ids": ids_CK, "g_top": g_CK[:, :k].contiguous()}
    if tail:
        saved |= {"lse_s": lse_s_C, "tail_coef": g_CK[:, k] / tail_s_C}
    return _Chunk(
        loss_C=div_C if loss_C is None else loss_C,
        div_C=div_C,
        student_entropy_C=-rows[0],
        teacher_entropy_C=-rows[1],
        topk_mass_C=topk_mass_C,
        saved=saved,
        entry_C=entry_C,
    )


def _put_columns(
    g_CN: torch.Tensor, ids_CK: torch.Tensor, vals_CK: torch.Tensor, spec: _Spec
) -> torch.Tensor:
    """Write vals into the local columns named by global ids (ids of other ranks skipped)."""
    row_idx, k_idx = in_shard(ids_CK, spec.first_id, spec.n_cols).nonzero(as_tuple=True)
    col_idx = ids_CK[row_idx, k_idx] - spec.first_id
    return g_CN.index_put_((row_idx, col_idx), vals_CK[row_idx, k_idx])


def _topk_backward(
    load: Loader, saved: dict[str, torch.Tensor], spec: _Spec, scratch: Scratch
) -> torch.Tensor:
    if spec.kind == "topk_tail":
        student = log_softmax_from_lse(load("student"), saved["lse_s"], scratch, "p0")
        g_CN = student.p_CN.mul_(saved["tail_coef"][:, None])
    else:
        ids_CK = saved["ids"]
        g_CN = scratch.empty("grad", (ids_CK.shape[0], spec.n_cols), spec.dtype, ids_CK.device).zero_()
    return _put_columns(g_CN, saved["ids"], saved["g_top"], spec)


# ----------------------------------------------------------------------------- sampled-token PG


def _pg_forward(load: Loader, ids_C: torch.Tensor, spec: _Spec, scratch: Scratch) -> _Chunk:
    """loss = -sg(log p_T(y) - log p_S(y)) * log p_S(y); d loss / ds = A * (p_S - onehot(y))."""
    student, teacher = sharded_log_softmax([load("student"), load("teacher")], spec.group, scratch)
    ids_C1 = ids_C[:, None]
    # Picked locally (0 on the ranks that do not own y) and summed in the same all-reduce as
    # the entropies.
    rows = [
        gather_global_columns(student.logp_CN, ids_C1, spec.first_id, None)[:, 0],
        gather_global_columns(teacher.logp_CN, ids_C1, spec.first_id, None)[:, 0],
        *_entropy_sums(student, teacher, scratch),
    ]
    sums = all_reduce_rows(rows, ReduceOp.SUM, spec.group)
    return _pg_chunk(*sums, saved={"lse_s": student.lse_C, "ids": ids_C1})


def _pg_chunk(logp_s_C, logp_t_C, neg_ent_s, neg_ent_t, saved: dict[str, torch.Tensor]) -> _Chunk:
    """The sampled-token loss from the all-reduced picks and entropies; saves its advantage."""
    adv_C = logp_t_C - logp_s_C
    return _Chunk(
        loss_C=-adv_C * logp_s_C,
        div_C=-adv_C,
        student_entropy_C=-neg_ent_s,
        teacher_entropy_C=-neg_ent_t,
        topk_mass_C=None,
        saved=saved | {"adv": adv_C},
    )


def _pg_backward(load: Loader, saved: dict[str, torch.Tensor], spec: _Spec, scratch: Scratch) -> torch.Tensor:
    adv_C = saved["adv"]
    student = log_softmax_from_lse(load("student"), saved["lse_s"], scratch, "p0")
    g_CN = student.p_CN.mul_(adv_C[:, None])
    # Only this rank's y columns are written; the others' values are dropped by _put_columns.
    g_at_y_C1 = gather_global_columns(g_CN, saved["ids"], spec.first_id, None) - adv_C[:, None]
    return _put_columns(g_CN, saved["ids"], g_at_y_C1, spec)


# ----------------------------------------------------------------------------- compiled (fused.py)


def _logits(sources: dict[str, torch.Tensor], spec: _Spec) -> tuple[torch.Tensor, torch.Tensor]:
    return sources["student"][:, : spec.n_cols], sources["teacher"][:, : spec.n_cols]


def _compiled_forward(
    sources: dict[str, torch.Tensor], rows_C: torch.Tensor, ids_C: torch.Tensor | None, spec: _Spec
) -> _Chunk:
    """One chunk's forward through fused.py: what the torch paths return, from fused passes."""
    student_TN, teacher_TN = _logits(sources, spec)
    kw = dict(tau=spec.temperature, dtype=spec.dtype)
    lse = fused.log_normalisers(student_TN, teacher_TN, rows_C, group=spec.group, **kw)
    if spec.kind in _TOPK_KINDS:
        teacher_CN = fused.scaled_rows(teacher_TN, rows_C, **kw)
        top_CK, ids_CK = global_topk(teacher_CN, spec.top_k, spec.first_id, spec.group)
        del teacher_CN
        picked_CK = gather_global_columns(student_TN, ids_CK, spec.first_id, spec.group, rows_C=rows_C)
        vals_s_CK = picked_CK.to(spec.dtype) / spec.temperature - lse[0][:, None]
        cols_CK = spare_column_index(ids_CK, spec.first_id, spec.n_cols)
        tail = spec.kind == "topk_tail"
        rows = fused.topk_sums(
            student_TN, teacher_TN, rows_C, cols_CK, lse, tail=tail, group=spec.group, **kw
        )
        return _topk_chunk(vals_s_CK, top_CK - lse[1][:, None], ids_CK, rows, lse[0], spec)
    if spec.kind == "pg":
        local_C = spare_column_index(ids_C, spec.first_id, spec.n_cols)
        sums = fused.pg_sums(student_TN, teacher_TN, rows_C, local_C, lse, group=spec.group, **kw)
        return _pg_chunk(*sums, saved={"lse_s": lse[0], "local": local_C})
    sums = fused.kl_sums(
        student_TN,
        teacher_TN,
        rows_C,
        lse,
        mode=spec.mode,
        beta=spec.beta,
        clip=spec.clip if spec.clip_mode == "entry" else None,
        group=spec.group,
        **kw,
    )
    return _kl_chunk(sums, spec, saved={"lse_s": lse[0], "lse_t": lse[1]})


def _compiled_backward(
    sources: dict[str, torch.Tensor],
    rows_C: torch.Tensor,
    saved: dict[str, torch.Tensor],
    coef_C: torch.Tensor,
    spec: _Spec,
) -> torch.Tensor:
    """The chunk's gradient rows times ``coef_C``, in the logits' dtype."""
    student_TN, teacher_TN = _logits(sources, spec)
    kw = dict(tau=spec.temperature, dtype=spec.dtype)
    if spec.kind == "pg":
        return fused.pg_grad(student_TN, rows_C, saved, coef_C, **kw)
    if spec.kind in _TOPK_KINDS:
        cols_CK = spare_column_index(saved["ids"], spec.first_id, spec.n_cols)
        return fused.topk_grad(student_TN, rows_C, cols_CK, saved, coef_C, **kw)
    clip = spec.clip if spec.clip_mode == "entry" else None
    return fused.kl_grad(
        student_TN, teacher_TN, rows_C, saved, coef_C, mode=spec.mode, beta=spec.beta, clip=clip, **kw
    )


_PATHS = {
    "jsd": (_kl_forward, _kl_backward),
    "forward_kl": (_kl_forward, _kl_backward),
    "reverse_kl": (_kl_forward, _kl_backward),
    "topk": (_topk_forward, _topk_backward),
    "topk_tail": (_topk_forward, _topk_backward),
    "pg": (_pg_forward, _pg_backward),
}


# ----------------------------------------------------------------------------- autograd + entry point


def _forward_path(spec: _Spec) -> Callable:
    if spec.clip_mode == "entry" and spec.kind not in _TOPK_KINDS:
        return _kl_entry_forward  # the top-k paths handle entry clipping themselves
    return _PATHS[spec.kind][0]


def _entries_per_token(spec: _Spec) -> int:
    """How many pointwise terms a token's loss sums: the vocab, k, or k + 1 with the tail."""
    if spec.kind == "topk":
        return spec.top_k
    if spec.kind == "topk_tail":
        return spec.top_k + 1
    return spec.vocab_size


def _entry_sums(
    chunks: list[_Chunk], weight_R: torch.Tensor, spec: _Spec
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Entry-clip metric sums (``DivergenceMetrics`` order) and which tokens had an entry capped."""
    clipped_R = torch.cat([c.entry_C[0] for c in chunks] or [weight_R])
    positive_R = torch.cat([c.entry_C[1] for c in chunks] or [weight_R])
    n_clipped = (weight_R * clipped_R).sum()
    sums = [
        n_clipped,
        weight_R.sum() * _entries_per_token(spec),
        n_clipped * spec.clip,
        (weight_R * positive_R).sum(),
    ]
    return sums, clipped_R > 0


def _cat(chunks: list[_Chunk], field: str, like: torch.Tensor) -> torch.Tensor:
    values = [getattr(c, field) for c in chunks]
    return torch.cat(values) if values else like.new_zeros(0)


class _VocabParallelDivergence(torch.autograd.Function):
    """Forward: chunked per-token losses and saved scalars. Backward: chunked recompute."""

    @staticmethod
    def forward(ctx, student_TW, teacher_TW, weight_T, sampled_ids_T, spec: _Spec):
        rows_R = weight_T.nonzero().flatten()
        weight_R = weight_T[rows_R].to(spec.dtype)
        fwd, scratch = _forward_path(spec), Scratch()
        sources = {"student": student_TW, "teacher": teacher_TW}
        chunks = []
        for rows_C in rows_R.split(spec.chunk_tokens):
            ids_C = None if sampled_ids_T is None else sampled_ids_T[rows_C]
            if spec.compiled:
                chunks.append(_compiled_forward(sources, rows_C, ids_C, spec))
            else:
                chunks.append(fwd(_chunk_loader(sources, rows_C, spec, scratch), ids_C, spec, scratch))
        loss_R, div_R = _cat(chunks, "loss_C", weight_R), _cat(chunks, "div_C", weight_R)
        clipped_R = torch.zeros_like(rows_R, dtype=torch.bool)
        if spec.clip is not None and spec.clip_mode == "token":
            clipped_R = div_R > spec.clip
            loss_R = torch.where(clipped_R, spec.clip, loss_R)  # a constant: no gradient
        entry_sums = []
        if spec.clip_mode == "entry":
            # The token itself is never capped in entry mode; the count says how many were touched.
            entry_sums, clipped_R = _entry_sums(chunks, weight_R, spec)
        topk_mass_R = (
            _cat(chunks, "topk_mass_C", weight_R) if spec.kind in _TOPK_KINDS else torch.zeros_like(weight_R)
        )
        metrics_M = torch.stack(
            [
                (weight_R * div_R).sum(),
                (weight_R * _cat(chunks, "student_entropy_C", weight_R)).sum(),
                (weight_R * _cat(chunks, "teacher_entropy_C", weight_R)).sum(),
                (weight_R * topk_mass_R).sum(),
                (weight_R * clipped_R).sum(),
                weight_R.sum(),
                *entry_sums,
            ]
        )
        loss_sum = (weight_R * loss_R).sum()
        # Token clip: a capped token is a constant. (Entry clip zeroes entries inside the chunks.)
        coef_R = torch.where(clipped_R & (spec.clip_mode == "token"), 0.0, weight_R) / spec.temperature
        saved = {
            key: torch.cat([c.saved[key] for c in chunks]) for key in (chunks[0].saved if chunks else {})
        }
        ctx.spec, ctx.saved_keys = spec, list(saved)
        ctx.save_for_backward(student_TW, teacher_TW, rows_R, coef_R, *saved.values())
        ctx.mark_non_differentiable(metrics_M)
        return loss_sum, metrics_M

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        spec: _Spec = ctx.spec
        student_TW, teacher_TW, rows_R, coef_R, *saved_values = ctx.saved_tensors
        saved_R = dict(zip(ctx.saved_keys, saved_values))
        grad_TW = torch.zeros(student_TW.shape, dtype=student_TW.dtype, device=student_TW.device)
        coef_R = coef_R * grad_loss
        valid_TN = grad_TW[:, : spec.n_cols]
        bwd, scratch = _PATHS[spec.kind][1], Scratch()
        sources = {"student": student_TW, "teacher": teacher_TW}
        for start in range(0, rows_R.numel(), spec.chunk_tokens):
            part = slice(start, start + spec.chunk_tokens)
            saved_C = {k: v[part] for k, v in saved_R.items()}
            if spec.compiled:
                g_CN = _compiled_backward(sources, rows_R[part], saved_C, coef_R[part], spec)
            else:
                load = _chunk_loader(sources, rows_R[part], spec, scratch)
                g_CN = bwd(load, saved_C, spec, scratch).mul_(coef_R[part, None]).to(grad_TW.dtype)
            valid_TN.index_copy_(0, rows_R[part], g_CN)
        return grad_TW, None, None, None, None


def _check_args(
    student_TW: torch.Tensor,
    teacher_TW: torch.Tensor,
    mask_T: torch.Tensor,
    *,
    kind: str,
    beta: float,
    temperature: float,
    vocab_size: int,
    tp_size: int,
    top_k: int | None,
    clip: float | None,
    clip_mode: str,
    sampled_ids_T: torch.Tensor | None,
    chunk_tokens: int,
    implementation: str,
) -> None:
    """Raise ValueError naming the argument and the fix for anything out of range."""

    def fail(what: str) -> None:
        raise ValueError(f"vocab_parallel_divergence: {what}")

    if kind not in KINDS:
        fail(f"kind={kind!r} is unknown; use one of {', '.join(KINDS)}")
    if student_TW.dim() != 2 or student_TW.shape != teacher_TW.shape:
        fail(
            f"student {tuple(student_TW.shape)} and teacher {tuple(teacher_TW.shape)} must both be [tokens, shard]"
        )
    if mask_T.shape != student_TW.shape[:1]:
        fail(f"mask {tuple(mask_T.shape)} must be [tokens] = {tuple(student_TW.shape[:1])}")
    if not 0.0 <= beta <= 1.0:
        fail(f"beta={beta} must be in [0, 1]")
    if temperature <= 0:
        fail(f"temperature={temperature} must be > 0")
    if not 1 <= vocab_size <= student_TW.shape[1] * tp_size:
        fail(f"vocab_size={vocab_size} must be in [1, shard width x TP = {student_TW.shape[1] * tp_size}]")
    if kind in _TOPK_KINDS and (top_k is None or not 1 <= top_k <= vocab_size):
        fail(f"kind={kind!r} needs 1 <= top_k <= vocab_size, got top_k={top_k}")
    if clip is not None and (kind == "pg" or clip <= 0):
        fail(f"clip={clip} must be > 0 and is not defined for kind='pg'; pass clip=None")
    if clip_mode not in CLIP_MODES:
        fail(f"clip_mode={clip_mode!r} is unknown; use one of {', '.join(CLIP_MODES)}")
    if chunk_tokens < 1:
        fail(f"chunk_tokens={chunk_tokens} must be >= 1")
    if implementation not in IMPLEMENTATIONS:
        fail(f"implementation={implementation!r} is unknown; use one of {', '.join(IMPLEMENTATIONS)}")
    if kind == "pg":
        if sampled_ids_T is None or sampled_ids_T.shape != mask_T.shape:
            fail("kind='pg' needs sampled_ids_T, one global token id per token")
        ids = sampled_ids_T[mask_T != 0]
        if ids.numel() and not (int(ids.min()) >= 0 and int(ids.max()) < vocab_size):
            fail(f"sampled_ids_T must lie in [0, vocab_size={vocab_size}) on unmasked tokens")


def vocab_parallel_divergence(
    student_logits_TW: torch.Tensor,
    teacher_logits_TW: torch.Tensor,
    mask_T: torch.Tensor,
    *,
    kind: str,
    beta: float = 0.5,
    temperature: float = 1.0,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None = None,
    top_k: int | None = None,
    clip: float | None = None,
    clip_mode: str = "token",
    sampled_ids_T: torch.Tensor | None = None,
    chunk_tokens: int = 1024,
    implementation: str = "auto",
) -> tuple[torch.Tensor, DivergenceMetrics]:
    """Masked sum over tokens of an OPSD divergence between teacher and student logits.

    Args:
        student_logits_TW: student logits on this TP rank, [tokens, vocab shard] (any float dtype).
        teacher_logits_TW: teacher logits, same shape; never receives a gradient.
        mask_T: [tokens] bool or float; non-zero entries are the tokens that count, a float
            mask weights them (loss and metrics are weighted sums).
        kind: one of ``KINDS`` (see the module docstring).
        beta: JSD mixture weight; 0 is forward KL(p_T || p_S), 1 is reverse KL(p_S || p_T).
            Used by jsd, topk and topk_tail.
        temperature: divides both logits before the softmax.
        vocab_size: true vocab size; global ids >= vocab_size are padding and carry no mass.
        tp_group: the TP group the vocab is split over; None (or size 1) means no TP. Note:
            None is NOT the default world group here.
        top_k: number of teacher tokens kept by topk / topk_tail.
        clip: with ``clip_mode="token"`` a token whose divergence exceeds clip contributes clip,
            with no gradient; with ``"entry"`` each vocabulary entry's pointwise term is capped
            at clip before the sum over the vocabulary (the official OPSD ``--jsd_token_clip``;
            see ``entry_clip``), capped entries passing no gradient.
        clip_mode: ``token`` or ``entry``; only used when ``clip`` is set.
        sampled_ids_T: [tokens] global ids of the sampled tokens (kind ``pg`` only).
        chunk_tokens: tokens per chunk; extra memory is a few [chunk_tokens, shard] buffers.
        implementation: ``torch`` (the operations of this module: the CPU path and the
            reference), ``compiled`` (the fused chunk bodies of ``fused.py`` through
            ``torch.compile``) or ``auto``: compiled for CUDA logits where Triton is usable
            (``runtime.kernels``), torch otherwise.

    Returns:
        (loss_sum, metrics): loss_sum is a 0-dim tensor (float32, or float64 for float64 inputs)
        with a gradient to ``student_logits_TW``; metrics are detached sums (DivergenceMetrics).

    Raises:
        ValueError: an argument is out of range or shapes disagree (the message names it).
    """
    tp_size = group_size(tp_group)
    _check_args(
        student_logits_TW,
        teacher_logits_TW,
        mask_T,
        kind=kind,
        beta=beta,
        temperature=temperature,
        vocab_size=vocab_size,
        tp_size=tp_size,
        top_k=top_k,
        clip=clip,
        clip_mode=clip_mode,
        sampled_ids_T=sampled_ids_T,
        chunk_tokens=chunk_tokens,
        implementation=implementation,
    )
    first_id, n_cols = valid_columns(student_logits_TW.shape[1], vocab_size, group_rank(tp_group))
    dtype = torch.promote_types(
        torch.promote_types(student_logits_TW.dtype, teacher_logits_TW.dtype), torch.float32
    )
    spec = _Spec(
        kind=kind,
        mode=dm.kl_mode(kind, beta),
        beta=float(beta),
        temperature=float(temperature),
        top_k=top_k,
        clip=clip,
        clip_mode=clip_mode if clip is not None else "token",
        chunk_tokens=chunk_tokens,
        group=tp_group if tp_size > 1 else None,
        vocab_size=vocab_size,
        first_id=first_id,
        n_cols=n_cols,
        dtype=dtype,
        compiled=implementation == "compiled"
        or (implementation == "auto" and compiles_kernels_for(student_logits_TW.device)),
    )
    loss_sum, m = _VocabParallelDivergence.apply(
        student_logits_TW, teacher_logits_TW.detach(), mask_T, sampled_ids_T, spec
    )
    metrics = DivergenceMetrics(
        divergence_sum=m[0],
        student_entropy_sum=m[1],
        teacher_entropy_sum=m[2],
        teacher_topk_mass_sum=m[3] if kind in _TOPK_KINDS else None,
        clipped_count=m[4],
        token_count=m[5],
        **(
            dict(clipped_entry_count=m[6], entry_count=m[7], clipped_loss_sum=m[8], positive_loss_sum=m[9])
            if spec.clip_mode == "entry"
            else {}
        ),
    )
    return loss_sum, metrics
