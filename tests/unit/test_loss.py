"""megaopsd.loss at TP1 against a plain float64 full-vocab autograd reference.

Every kind, beta and temperature; masked tokens, a padded vocab whose padding holds large
values, chunk sizes that do not divide the token count, clipping, float masks and an empty mask.

    .venv/bin/python -m pytest tests/unit/test_loss.py -q

Legend: T = tokens, W = padded vocab width (one shard at TP1), V = true vocab size, K = top-k.
"""

from __future__ import annotations

import math

import pytest
import torch

from megaopsd.loss import KINDS, vocab_parallel_divergence

T, W, V, TOP_K, CHUNK = 37, 256, 203, 7, 8
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
TAUS = (0.7, 1.0, 1.1)
# float64 agrees with the float64 reference to rounding (measured <= 1e-14 relative): a looser
# bound would hide a precision regression such as a float32 intermediate.
TOL = {torch.float64: 1e-12, torch.float32: 1e-4}


# ----------------------------------------------------------------------------- reference


def _kl_family(ls_TN, lt_TN, kind: str, beta: float) -> torch.Tensor:
    """Per-token divergence between two rows of log-probs, written the plain way."""
    if kind == "forward_kl" or (kind != "reverse_kl" and beta == 0.0):
        return (lt_TN.exp() * (lt_TN - ls_TN)).sum(-1)
    if kind == "reverse_kl" or beta == 1.0:
        return (ls_TN.exp() * (ls_TN - lt_TN)).sum(-1)
    lm_TN = torch.logsumexp(torch.stack([ls_TN + math.log(1 - beta), lt_TN + math.log(beta)]), dim=0)
    kl_t = (lt_TN.exp() * (lt_TN - lm_TN)).sum(-1)
    kl_s = (ls_TN.exp() * (ls_TN - lm_TN)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def reference(
    student_TW,
    teacher_TW,
    mask_T,
    *,
    kind,
    beta,
    temperature,
    vocab_size,
    top_k=None,
    clip=None,
    sampled_ids_T=None,
):
    """(loss_sum, per-token divergence, metrics dict) in float64 over the full, unpadded vocab."""
    ls = torch.log_softmax(student_TW[:, :vocab_size].double() / temperature, dim=-1)
    lt = torch.log_softmax(teacher_TW[:, :vocab_size].double() / temperature, dim=-1)
    w = mask_T.double()
    mass = None
    if kind == "pg":
        y = sampled_ids_T[:, None]
        lps, lpt = ls.gather(1, y)[:, 0], lt.gather(1, y)[:, 0]
        per_token = -(lpt - lps).detach() * lps
        div = (lps - lpt).detach()
    else:
        if kind in ("topk", "topk_tail"):
            # Ties in the teacher's k-th value go to the lowest token id (a stable sort keeps them).
            idx = torch.sort(lt, dim=-1, descending=True, stable=True).indices[:, :top_k]
            ks, kt = ls.gather(1, idx), lt.gather(1, idx)
            mass = kt.exp().sum(-1)
            if kind == "topk":
                ks, kt = torch.log_softmax(ks, -1), torch.log_softmax(kt, -1)
            else:
                in_k = torch.zeros_like(ls, dtype=torch.bool).scatter(1, idx, True)
                tail_s = ls.masked_fill(in_k, float("-inf")).logsumexp(-1, keepdim=True)
                tail_t = lt.masked_fill(in_k, float("-inf")).logsumexp(-1, keepdim=True)
                ks, kt = torch.cat([ks, tail_s], 1), torch.cat([kt, tail_t], 1)
            ls_d, lt_d = ks, kt
        else:
            ls_d, lt_d = ls, lt
        div = _kl_family(ls_d, lt_d, kind, beta)
        per_token = div
        if clip is not None:
            per_token = torch.where(div > clip, torch.full_like(div, clip), div)
        div = div.detach()
    metrics = {
        "divergence_sum": (w * div).sum(),
        "student_entropy_sum": (w * -(ls.exp() * ls).sum(-1)).sum().detach(),
        "teacher_entropy_sum": (w * -(lt.exp() * lt).sum(-1)).sum().detach(),
        "clipped_count": (w * (div > clip)).sum() if clip is not None else w.new_zeros(()),
        "token_count": w.sum(),
    }
    if mass is not None:
        metrics["teacher_topk_mass_sum"] = (w * mass).sum()
    return (w * per_token).sum(), div, metrics


# ----------------------------------------------------------------------------- helpers


def make_inputs(dtype=torch.float64, seed=0, tokens=T, width=W, vocab=V):
    """Random logits with an unmasked-token pattern and padding columns set to large values."""
    g = torch.Generator().manual_seed(seed)
    student = 2.0 * torch.randn(tokens, width, generator=g, dtype=torch.float64)
    teacher = student + 1.5 * torch.randn(tokens, width, generator=g, dtype=torch.float64)
    # Padding far above every real logit: any leak of mass into it would dominate the result.
    student[:, vocab:] = 40.0 + 10.0 * torch.rand(tokens, width - vocab, generator=g, dtype=torch.float64)
    teacher[:, vocab:] = 40.0 + 10.0 * torch.rand(tokens, width - vocab, generator=g, dtype=torch.float64)
    mask = torch.rand(tokens, generator=g) > 0.25
    sampled = torch.randint(0, vocab, (tokens,), generator=g)
    return student.to(dtype), teacher.to(dtype), mask, sampled


def run_both(student, teacher, mask, sampled, **kw):
    """Our loss and gradient next to the reference's, both for the same inputs."""
    s_ours = student.detach().clone().requires_grad_()
    loss, metrics = vocab_parallel_divergence(s_ours, teacher, mask, sampled_ids_T=sampled, **kw)
    loss.backward()
    kw.pop("chunk_tokens", None)
    kw.pop("implementation", None)  # the reference has one
    s_ref = student.detach().to(torch.float64, copy=True).requires_grad_()
    ref_loss, ref_div, ref_metrics = reference(s_ref, teacher, mask, sampled_ids_T=sampled, **kw)
    ref_loss.backward()
    return (loss, s_ours.grad, metrics), (ref_loss, s_ref.grad, ref_metrics, ref_div)


def assert_rel(actual, expected, tol, what=""):
    """|a - e| <= tol * max(|e|, max |e| for tensors), i.e. relative to the tensor's scale."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = max(expected.abs().max().item(), 1e-30)
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol:g} x scale {scale:.3g}"


def assert_matches(ours, ref, tol, check_grad=True):
    (loss, grad, metrics), (ref_loss, ref_grad, ref_metrics, _) = ours, ref
    assert_rel(loss, ref_loss, tol, "loss")
    if check_grad:
        assert_rel(grad, ref_grad, tol, "grad")
        assert torch.count_nonzero(grad[:, V:]) == 0, "padding columns received gradient"
    for name, value in ref_metrics.items():
        assert_rel(getattr(metrics, name), value, tol, name)


def _cases():
    for kind in KINDS:
        for beta in BETAS if kind != "pg" and kind not in ("forward_kl", "reverse_kl") else (0.5,):
            for tau in TAUS:
                yield kind, beta, tau


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("kind", "beta", "tau"), list(_cases()))
def test_matches_reference(kind, beta, tau, dtype):
    student, teacher, mask, sampled = make_inputs(dtype)
    ours, ref = run_both(
        student,
        teacher,
        mask,
        sampled,
        kind=kind,
        beta=beta,
        temperature=tau,
        vocab_size=V,
        top_k=TOP_K,
        chunk_tokens=CHUNK,
    )
    assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ours[1].dtype == dtype
    assert ours[0].item() != 0.0
    assert_matches(ours, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "pg"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_clip(kind, beta, dtype):
    student, teacher, mask, sampled = make_inputs(dtype, seed=1)
    kw = dict(kind=kind, beta=beta, temperature=0.9, vocab_size=V, top_k=TOP_K)
    _, ref_div, _ = reference(student, teacher, mask, sampled_ids_T=sampled, **kw)
    # Half-way between two middle values: about half the tokens clip, none sits on the boundary.
    middle = ref_div[mask].sort().values[mask.sum() // 2 - 1 : mask.sum() // 2 + 1]
    clip = middle.mean().item()
    ours, ref = run_both(student, teacher, mask, sampled, clip=clip, chunk_tokens=CHUNK, **kw)
    n_clipped = ours[2].clipped_count.item()
    assert 0 < n_clipped < mask.sum().item()
    assert n_clipped == (ref_div[mask] > clip).sum().item()
    assert_matches(ours, ref, TOL[dtype])
    # A clipped token gets no gradient at all.
    clipped_rows = mask & (ref_div > clip)
    assert torch.count_nonzero(ours[1][clipped_rows]) == 0


@pytest.mark.parametrize("chunk", [1, 5, 36, 37, 38, 1024])
@pytest.mark.parametrize("kind", ["jsd", "topk_tail", "pg"])
def test_chunk_sizes(kind, chunk):
    student, teacher, mask, sampled = make_inputs(seed=2)
    kw = dict(kind=kind, beta=0.5, temperature=1.0, vocab_size=V, top_k=TOP_K)
    ours, ref = run_both(student, teacher, mask, sampled, chunk_tokens=chunk, **kw)
    assert_matches(ours, ref, TOL[torch.float64])


@pytest.mark.parametrize("kind", KINDS)
def test_empty_mask(kind):
    student, teacher, _, sampled = make_inputs(seed=3)
    s = student.clone().requires_grad_()
    mask = torch.zeros(T, dtype=torch.bool)
    loss, metrics = vocab_parallel_divergence(
        s,
        teacher,
        mask,
        kind=kind,
        beta=0.5,
        vocab_size=V,
        top_k=TOP_K,
        sampled_ids_T=sampled,
        chunk_tokens=CHUNK,
    )
    loss.backward()
    assert loss.item() == 0.0 and metrics.token_count.item() == 0.0
    assert metrics.divergence_sum.item() == 0.0 and metrics.clipped_count.item() == 0.0
    assert s.grad.shape == student.shape and torch.count_nonzero(s.grad) == 0


@pytest.mark.parametrize("kind", ["jsd", "topk", "pg"])
def test_float_mask_weights_tokens(kind):
    student, teacher, mask, sampled = make_inputs(seed=4)
    weights = mask.double() * torch.linspace(0.2, 2.0, T, dtype=torch.float64)
    ours, ref = run_both(
        student,
        teacher,
        weights,
        sampled,
        kind=kind,
        beta=0.3,
        temperature=1.0,
        vocab_size=V,
        top_k=TOP_K,
        chunk_tokens=CHUNK,
    )
    assert_matches(ours, ref, TOL[torch.float64])
    assert ours[2].token_count.item() == pytest.approx(weights.sum().item())


@pytest.mark.parametrize("kind", KINDS)
def test_padding_values_do_not_matter(kind):
    student, teacher, mask, sampled = make_inputs(seed=5)
    kw = dict(kind=kind, beta=0.5, vocab_size=V, top_k=TOP_K, sampled_ids_T=sampled)
    loss_a, _ = vocab_parallel_divergence(student, teacher, mask, **kw)
    student[:, V:], teacher[:, V:] = 1e4, -1e4
    loss_b, _ = vocab_parallel_divergence(student, teacher, mask, **kw)
    assert loss_a.item() == loss_b.item()


def test_topk_tail_with_all_vocab_in_topk_is_full_divergence():
    # k = vocab: the top-k is the whole vocab, renormalisation is a no-op and the tail is empty.
    student, teacher, mask, _ = make_inputs(seed=6)
    kw = dict(beta=0.5, temperature=1.0, vocab_size=V, chunk_tokens=CHUNK)
    full, _ = vocab_parallel_divergence(student, teacher, mask, kind="jsd", **kw)
    for kind in ("topk", "topk_tail"):
        loss, metrics = vocab_parallel_divergence(student, teacher, mask, kind=kind, top_k=V, **kw)
        assert_rel(loss, full, 1e-9, kind)
        assert_rel(metrics.teacher_topk_mass_sum, metrics.token_count, 1e-9, kind)


@pytest.mark.parametrize("kind", ["topk", "topk_tail"])
def test_topk_ties_go_to_the_lowest_token_id(kind):
    # Whole-number teacher logits: many ties, also at the k-th value.
    student, teacher, mask, sampled = make_inputs(seed=11)
    teacher = teacher.round()
    for k in (1, 3, 7, 20):
        ours, ref = run_both(
            student,
            teacher,
            mask,
            sampled,
            kind=kind,
            beta=0.5,
            temperature=1.0,
            vocab_size=V,
            top_k=k,
            chunk_tokens=CHUNK,
        )
        assert_matches(ours, ref, TOL[torch.float64])


def test_bfloat16_inputs_compute_in_float32():
    student, teacher, mask, sampled = make_inputs(torch.bfloat16, seed=7)
    ours, ref = run_both(student, teacher, mask, sampled, kind="jsd", beta=0.5, temperature=1.0, vocab_size=V)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.bfloat16
    assert_rel(ours[0], ref[0], 1e-5, "loss")
    assert_rel(ours[1], ref[1], 1e-2, "grad")  # the gradient is rounded to bfloat16


def test_gradient_scales_with_upstream_grad():
    student, teacher, mask, sampled = make_inputs(seed=8)
    s = student.clone().requires_grad_()
    loss, _ = vocab_parallel_divergence(
        s, teacher, mask, kind="jsd", beta=0.5, vocab_size=V, chunk_tokens=CHUNK
    )
    (loss / 10.0).backward()
    _, ref = run_both(student, teacher, mask, sampled, kind="jsd", beta=0.5, temperature=1.0, vocab_size=V)
    assert_rel(s.grad, ref[1] / 10.0, 1e-9, "grad")


def test_teacher_gets_no_gradient_and_metrics_are_detached():
    student, teacher, mask, _ = make_inputs(seed=9)
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    loss, metrics = vocab_parallel_divergence(s, t, mask, kind="reverse_kl", vocab_size=V)
    loss.backward()
    assert t.grad is None
    assert all(not v.requires_grad for v in vars(metrics).values() if v is not None)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        (dict(kind="kl"), "kind="),
        (dict(kind="jsd", beta=1.5), "beta="),
        (dict(kind="jsd", temperature=0.0), "temperature="),
        (dict(kind="jsd", vocab_size=W + 1), "vocab_size="),
        (dict(kind="topk"), "top_k"),
        (dict(kind="topk_tail", top_k=V + 1), "top_k"),
        (dict(kind="pg", clip=1.0), "clip="),
        (dict(kind="jsd", clip=-1.0), "clip="),
        (dict(kind="pg"), "sampled_ids_T"),
        (dict(kind="pg", sampled_ids_T=torch.full((T,), V)), "sampled_ids_T"),
        (dict(kind="jsd", chunk_tokens=0), "chunk_tokens="),
    ],
)
def test_bad_arguments_name_the_field(kw, needle):
    student, teacher, mask, _ = make_inputs(seed=10)
    kw = {"vocab_size": V, **kw}
    with pytest.raises(ValueError, match=needle):
        vocab_parallel_divergence(student, teacher, mask, **kw)
