"""clip_mode="entry" (the official OPSD --jsd_token_clip) against a float64 full-vocab reference.

The reference is the official formula written the plain way: the unreduced pointwise KL terms
(``F.kl_div(..., reduction="none", log_target=True)``), ``clamp(max=clip)`` on every
(token, vocabulary entry), sum over the vocabulary, mask-weighted sum over tokens; gradients by
autograd. Every kind but pg, padded vocab, float masks, chunk sizes that do not divide T.

    .venv/bin/python -m pytest tests/unit/test_loss_entry_clip.py -q

Legend: T = tokens, W = padded vocab width, V = true vocab size, K = top-k outcomes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megaopsd.loss import vocab_parallel_divergence
from tests.unit.test_loss import CHUNK, TOL, TOP_K, V, assert_rel, make_inputs

ENTRY_KINDS = ("jsd", "forward_kl", "reverse_kl", "topk", "topk_tail")


def pointwise_terms(ls, lt, kind: str, beta: float) -> torch.Tensor:
    """The official per-entry terms (F.kl_div(input, target) = p_target * (log target - input))."""
    if kind == "forward_kl" or (kind != "reverse_kl" and beta == 0.0):
        return F.kl_div(ls, lt, reduction="none", log_target=True)
    if kind == "reverse_kl" or beta == 1.0:
        return F.kl_div(lt, ls, reduction="none", log_target=True)
    lm = torch.logsumexp(torch.stack([ls + math.log1p(-beta), lt + math.log(beta)]), dim=0)
    kl_t = F.kl_div(lm, lt, reduction="none", log_target=True)
    kl_s = F.kl_div(lm, ls, reduction="none", log_target=True)
    return beta * kl_t + (1 - beta) * kl_s


def entry_reference(
    student_TW, teacher_TW, mask_T, *, kind, beta, temperature, vocab_size, clip, top_k=TOP_K
):
    """(loss_sum, terms [T, entries] before the clip, metrics) in float64, autograd to the student."""
    ls = torch.log_softmax(student_TW[:, :vocab_size].double() / temperature, dim=-1)
    lt = torch.log_softmax(teacher_TW[:, :vocab_size].double() / temperature, dim=-1)
    w = mask_T.double()
    ent_s = -(ls.exp() * ls).sum(-1).detach()
    ent_t = -(lt.exp() * lt).sum(-1).detach()
    if kind in ("topk", "topk_tail"):
        idx = torch.sort(lt, dim=-1, descending=True, stable=True).indices[:, :top_k]
        ks, kt = ls.gather(1, idx), lt.gather(1, idx)
        if kind == "topk":
            ls, lt = torch.log_softmax(ks, -1), torch.log_softmax(kt, -1)
        else:
            in_k = torch.zeros_like(ls, dtype=torch.bool).scatter(1, idx, True)
            tail_s = ls.masked_fill(in_k, float("-inf")).logsumexp(-1, keepdim=True)
            tail_t = lt.masked_fill(in_k, float("-inf")).logsumexp(-1, keepdim=True)
            ls, lt = torch.cat([ks, tail_s], 1), torch.cat([kt, tail_t], 1)
    terms = pointwise_terms(ls, lt, kind, beta)
    clipped = terms.clamp(max=clip)  # the official line: jsd.clamp(max=token_clip), pre-sum
    over = (terms > clip).double().detach()
    metrics = {
        "divergence_sum": (w * terms.sum(-1)).sum().detach(),
        "student_entropy_sum": (w * ent_s).sum(),
        "teacher_entropy_sum": (w * ent_t).sum(),
        "clipped_count": (w * (over.sum(-1) > 0)).sum(),
        "token_count": w.sum(),
        "clipped_entry_count": (w * over.sum(-1)).sum(),
        "entry_count": w.sum() * terms.shape[1],
        "clipped_loss_sum": (w * over.sum(-1)).sum() * clip,
        "positive_loss_sum": (w * clipped.detach().clamp(min=0).sum(-1)).sum(),
    }
    return (w * clipped.sum(-1)).sum(), terms.detach(), metrics


def both(student, teacher, mask, *, chunk=CHUNK, implementation="auto", **kw):
    s_ours = student.detach().clone().requires_grad_()
    loss, metrics = vocab_parallel_divergence(
        s_ours,
        teacher,
        mask,
        clip_mode="entry",
        top_k=TOP_K,
        chunk_tokens=chunk,
        implementation=implementation,
        **kw,
    )
    loss.backward()
    s_ref = student.detach().to(torch.float64, copy=True).requires_grad_()
    ref_loss, terms, ref_metrics = entry_reference(s_ref, teacher, mask, **kw)
    ref_loss.backward()
    return (loss, s_ours.grad, metrics), (ref_loss, s_ref.grad, ref_metrics), terms


def middle_positive_clip(student, teacher, mask, **kw) -> float:
    """A cap between two middle positive terms: many entries clip, none sits on the boundary."""
    _, terms, _ = entry_reference(student, teacher, mask, clip=math.inf, **kw)
    positive = terms[mask.bool()].flatten()
    positive = positive[positive > 0].sort().values
    n = positive.numel()
    return positive[n // 2 - 1 : n // 2 + 1].mean().item()


def check(ours, ref, tol):
    (loss, grad, metrics), (ref_loss, ref_grad, ref_metrics) = ours, ref
    assert_rel(loss, ref_loss, tol, "loss")
    assert_rel(grad, ref_grad, tol, "grad")
    assert torch.count_nonzero(grad[:, V:]) == 0, "padding columns received gradient"
    for name, value in ref_metrics.items():
        assert_rel(getattr(metrics, name), value, tol, name)


def _cases():
    for kind in ENTRY_KINDS:
        for beta in (0.0, 0.5, 1.0) if kind in ("jsd", "topk", "topk_tail") else (0.5,):
            for tau in (0.7, 1.1):
                yield kind, beta, tau


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("kind", "beta", "tau"), list(_cases()))
def test_entry_clip_matches_the_official_formula(kind, beta, tau, dtype):
    student, teacher, mask, _ = make_inputs(dtype, seed=21)
    kw = dict(kind=kind, beta=beta, temperature=tau, vocab_size=V)
    clip = middle_positive_clip(student, teacher, mask, **kw)
    ours, ref, terms = both(student, teacher, mask, clip=clip, **kw)
    n_clipped = ours[2].clipped_entry_count.item()
    assert 0 < n_clipped < ours[2].entry_count.item()
    assert n_clipped == (terms[mask] > clip).sum().item()
    check(ours, ref, TOL[dtype])


@pytest.mark.parametrize("kind", ENTRY_KINDS)
def test_clipped_entries_pass_no_gradient(kind):
    # One token whose teacher puts all its mass on entry 5: a single huge term, capped.
    student, teacher, mask, _ = make_inputs(seed=22)
    teacher[0, :V] = -30.0
    teacher[0, 5] = 30.0
    student[0, 5] = -5.0  # the student disagrees: entry 5's term is far over the cap
    mask[:] = False
    mask[0] = True
    kw = dict(kind=kind, beta=0.0, temperature=1.0, vocab_size=V)
    ours, ref, _ = both(student, teacher, mask, clip=0.05, **kw)
    check(ours, ref, 1e-6)
    assert ours[2].clipped_entry_count.item() >= 1
    if kind in ("jsd", "forward_kl"):
        # Forward KL: only entry 5 is over the cap, its -p_T term is gone from the gradient,
        # leaving g = p_S * sum(unclipped p_T) - p_T on the rest (tiny): entry 5 gets p_S,5 * ~0.
        p_s = torch.softmax(student[0, :V], -1)
        assert abs(ours[1][0, 5].item()) < 1e-3 * p_s[5].item() + 1e-20


@pytest.mark.parametrize("kind", ["jsd", "forward_kl", "topk"])
def test_the_loss_goes_negative_like_the_official_one(kind):
    # Forward KL (beta 0) with the released 1.7B cap. Nearly flat rows; the student puts ~0.9
    # on entry 0, the teacher ~0.3 there and ~0.6 on entry 1. Entry 0's term 0.3 log(0.3 / 0.9)
    # = -0.33 is kept, entry 1's ~+4.3 is capped at 0.05: the official loss is ~ -0.28 a token.
    student, teacher, mask, _ = make_inputs(seed=23)
    g = torch.Generator().manual_seed(0)
    base = 0.1 * torch.randn(student.shape[0], V, generator=g, dtype=torch.float64)
    student[:, :V], teacher[:, :V] = base, base
    student[:, 0] = math.log(9 * (V - 1))
    teacher[:, 0], teacher[:, 1] = math.log(3 * (V - 2)), math.log(6 * (V - 2))
    kw = dict(kind=kind, beta=0.0, temperature=1.0, vocab_size=V)
    ours, ref, _ = both(student, teacher, mask, clip=0.05, **kw)
    assert ref[0].item() < 0.0, "the case must make the official loss negative"
    assert ours[0].item() < 0.0
    assert ours[2].divergence_sum.item() > 0.0  # the unclipped divergence is a KL: never negative
    check(ours, ref, 1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 37, 1024])
def test_entry_clip_float_mask_and_chunks(chunk):
    student, teacher, mask, _ = make_inputs(seed=24)
    weights = mask.double() * torch.linspace(0.2, 2.0, mask.numel(), dtype=torch.float64)
    kw = dict(kind="jsd", beta=0.3, temperature=1.0, vocab_size=V)
    clip = middle_positive_clip(student, teacher, weights, **kw)
    ours, ref, _ = both(student, teacher, weights, chunk=chunk, clip=clip, **kw)
    check(ours, ref, 1e-6)


def test_entry_clip_above_every_term_is_the_plain_divergence():
    student, teacher, mask, _ = make_inputs(seed=25)
    kw = dict(kind="jsd", beta=0.5, temperature=1.0, vocab_size=V, chunk_tokens=CHUNK)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    plain, _ = vocab_parallel_divergence(s1, teacher, mask, **kw)
    entry, metrics = vocab_parallel_divergence(s2, teacher, mask, clip=1e9, clip_mode="entry", **kw)
    plain.backward()
    entry.backward()
    assert_rel(entry, plain, 1e-12, "loss")
    assert_rel(s2.grad, s1.grad, 1e-10, "grad")
    assert metrics.clipped_entry_count.item() == 0 and metrics.clipped_loss_sum.item() == 0


def test_token_mode_reports_no_entry_metrics_and_bad_mode_is_named():
    student, teacher, mask, _ = make_inputs(seed=26)
    _, metrics = vocab_parallel_divergence(student, teacher, mask, kind="jsd", vocab_size=V, clip=1.0)
    assert metrics.clipped_entry_count is None and metrics.entry_count is None
    with pytest.raises(ValueError, match="clip_mode="):
        vocab_parallel_divergence(
            student, teacher, mask, kind="jsd", vocab_size=V, clip=1.0, clip_mode="vocab"
        )
