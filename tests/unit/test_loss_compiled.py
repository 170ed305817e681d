"""The compiled loss (``implementation="compiled"``, megaopsd/loss/fused.py) on CPU against the
float64 references of test_loss.py and test_loss_entry_clip.py.

What is checked is the math of the fused chunk bodies, every kind (jsd at beta 0, 0.5 and 1,
forward_kl, reverse_kl, pg, topk and topk_tail at beta 0.5) with no clip, token clip and entry
clip, float64, float32 and bfloat16 logits, chunks that do not divide the token count, padded
vocab columns, float masks, ties at the teacher's k-th value. Those graphs are captured by dynamo whole (``fullgraph``: a break is an error) and run by
its "eager" backend: inductor would generate C++ for each of them, seconds apiece on 2 cores.
``test_inductor_kernels_equal_the_torch_path_in_processes_sharing_a_cache`` builds the passes of
three kinds with inductor, the backend ``auto`` uses on CUDA (where it emits Triton instead).

    .venv/bin/python -m pytest tests/unit/test_loss_compiled.py -q
"""

from __future__ import annotations

import pytest
import torch

from megaopsd.config import ConfigError, load_config
from megaopsd.loss import fused, vocab_parallel_divergence
from tests.unit.test_loss import CHUNK, TOL, TOP_K, V, assert_matches, make_inputs, reference, run_both
from tests.unit.test_loss_entry_clip import both, check, middle_positive_clip


@pytest.fixture(autouse=True)
def traced_not_generated(monkeypatch):
    monkeypatch.setattr(fused, "BACKEND", "eager")


CASES = [
    ("jsd", 0.0),
    ("jsd", 0.5),
    ("jsd", 1.0),
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("pg", 0.5),
    ("topk", 0.5),
    ("topk_tail", 0.5),
]
# Every case in float64 (held to 1e-12 of the float64 reference: a float32 intermediate would
# show), float32 for the production loss; bfloat16 in the test below. Each (kind, dtype) is a
# compilation of its own, a second or more on CPU, so the grid is not the full product.
GRID = [(*case, torch.float64) for case in CASES] + [
    (kind, 0.5, torch.float32) for kind in ("jsd", "pg", "topk_tail")
]


@pytest.mark.parametrize(("kind", "beta", "dtype"), GRID)
def test_compiled_matches_the_float64_reference(kind, beta, dtype):
    student, teacher, mask, sampled = make_inputs(dtype)
    kw = dict(kind=kind, beta=beta, temperature=0.7, vocab_size=V, top_k=TOP_K, chunk_tokens=CHUNK)
    ours, ref = run_both(student, teacher, mask, sampled, implementation="compiled", **kw)
    assert ours[0].item() != 0.0 and ours[1].dtype == dtype
    assert_matches(ours, ref, TOL[dtype])


@pytest.mark.parametrize(("kind", "beta"), [c for c in CASES if c[0] != "pg"])
def test_compiled_token_clip(kind, beta):
    student, teacher, mask, sampled = make_inputs(seed=1)
    kw = dict(kind=kind, beta=beta, temperature=0.9, vocab_size=V, top_k=TOP_K)
    _, ref_div, _ = reference(student, teacher, mask, sampled_ids_T=sampled, **kw)
    clip = ref_div[mask].median().item() + 1e-9  # about half the tokens clip
    ours, ref = run_both(
        student, teacher, mask, sampled, clip=clip, chunk_tokens=CHUNK, implementation="compiled", **kw
    )
    assert 0 < ours[2].clipped_count.item() < mask.sum().item()
    assert_matches(ours, ref, TOL[torch.float64])
    assert torch.count_nonzero(ours[1][mask & (ref_div > clip)]) == 0  # clipped tokens: no gradient


@pytest.mark.parametrize(("kind", "beta", "dtype"), [c for c in GRID if c[0] != "pg"])
def test_compiled_entry_clip_matches_the_official_formula(kind, beta, dtype):
    student, teacher, mask, _ = make_inputs(dtype, seed=21)
    kw = dict(kind=kind, beta=beta, temperature=1.1, vocab_size=V)
    clip = middle_positive_clip(student, teacher, mask, **kw)
    ours, ref, terms = both(student, teacher, mask, clip=clip, implementation="compiled", **kw)
    assert 0 < ours[2].clipped_entry_count.item() == (terms[mask] > clip).sum().item()
    check(ours, ref, TOL[dtype])


@pytest.mark.parametrize("kind", ["jsd", "pg"])
def test_chunks_float_masks_and_an_empty_mask(kind):
    student, teacher, mask, sampled = make_inputs(seed=2)
    weights = mask * torch.linspace(0.1, 2.0, mask.numel(), dtype=torch.float64)
    for chunk in (1, 36, 1024):
        kw = dict(
            kind=kind, beta=0.5, temperature=1.0, vocab_size=V, chunk_tokens=chunk, implementation="compiled"
        )
        ours, ref = run_both(student, teacher, weights, sampled, **kw)
        assert_matches(ours, ref, TOL[torch.float64])
    s = student.clone().requires_grad_()
    loss, metrics = vocab_parallel_divergence(
        s,
        teacher,
        torch.zeros_like(mask),
        kind=kind,
        vocab_size=V,
        sampled_ids_T=sampled,
        implementation="compiled",
    )
    loss.backward()
    assert loss.item() == 0.0 and metrics.token_count.item() == 0 and torch.count_nonzero(s.grad) == 0


@pytest.mark.parametrize("kind", ["jsd", "reverse_kl", "pg", "topk_tail"])
def test_bfloat16_logits_give_the_torch_paths_loss_and_a_bfloat16_gradient(kind):
    student, teacher, mask, sampled = make_inputs(torch.float32, seed=3)
    student, teacher = student.bfloat16(), teacher.bfloat16()
    out = {}
    for implementation in ("torch", "compiled"):
        s = student.clone().requires_grad_()
        loss, metrics = vocab_parallel_divergence(
            s,
            teacher,
            mask,
            kind=kind,
            vocab_size=V,
            top_k=TOP_K,
            sampled_ids_T=sampled,
            implementation=implementation,
        )
        loss.backward()
        assert loss.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
        out[implementation] = (loss, s.grad.float(), metrics.student_entropy_sum)
    for got, want in zip(out["compiled"], out["torch"]):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()  # float32 math on the same inputs


def test_auto_compiles_only_on_cuda_and_an_unknown_implementation_is_named():
    student, teacher, mask, _ = make_inputs(torch.float32, seed=4)
    before = fused._compile.cache_info().currsize
    for kind in ("jsd", "topk_tail"):
        vocab_parallel_divergence(student, teacher, mask, kind=kind, top_k=3, vocab_size=V, chunk_tokens=64)
    assert fused._compile.cache_info().currsize == before  # CPU logits: the torch path
    with pytest.raises(ValueError, match="implementation='triton' is unknown"):
        vocab_parallel_divergence(student, teacher, mask, kind="jsd", vocab_size=V, implementation="triton")
    with pytest.raises(ConfigError, match=r"loss.implementation='triton' is unknown; use one of auto"):
        load_config({"model": {"hf_path": "u"}, "loss": {"kind": "topk", "implementation": "triton"}})


@pytest.mark.parametrize("kind", ["topk", "topk_tail"])
def test_compiled_topk_ties_go_to_the_lowest_token_id_like_the_torch_path(kind):
    """Whole-number teacher logits tie at the k-th value: both paths keep the lowest ids."""
    student, teacher, mask, sampled = make_inputs(seed=11)
    teacher = teacher.round()
    for k in (1, 7, 20):
        kw = dict(kind=kind, beta=0.5, temperature=1.0, vocab_size=V, top_k=k, chunk_tokens=CHUNK)
        ours, ref = run_both(student, teacher, mask, sampled, implementation="compiled", **kw)
        assert_matches(ours, ref, TOL[torch.float64])


def inductor_job(job: dict) -> dict:
    """In a fresh process: each case's loss, entropy sums and gradient through inductor's kernels
    and through the torch path, as largest differences relative to the torch path's values."""
    torch.set_num_threads(1)
    student, teacher, mask, sampled = make_inputs(torch.float32, seed=5)
    out = {}
    for kind, clip in job["cases"]:
        results = []
        for implementation in ("torch", "compiled"):
            s = student.clone().requires_grad_()
            loss, metrics = vocab_parallel_divergence(
                s,
                teacher,
                mask,
                kind=kind,
                vocab_size=V,
                top_k=TOP_K,
                clip=clip,
                clip_mode="entry" if clip is not None else "token",
                sampled_ids_T=sampled,
                chunk_tokens=CHUNK,
                implementation=implementation,
            )
            loss.backward()
            results.append([loss, metrics.student_entropy_sum, metrics.teacher_entropy_sum, s.grad])
        out[f"{kind} clip={clip}"] = [
            ((got - want).abs().max() / want.abs().max()).item() for want, got in zip(*results)
        ]
    return out


def test_inductor_kernels_equal_the_torch_path_in_processes_sharing_a_cache(tmp_path, monkeypatch):
    """Real inductor builds (C++ here) in two processes that share inductor's on-disk cache, the
    second with another entry clip: a kernel that compiled a clip in would be handed to it
    (tensors carry temperature, beta and clip into the graphs for that reason)."""
    from tests.subprocess_job import run_job

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    first = run_job(inductor_job, {"cases": [("jsd", 0.05)]}, tmp_path, name="first")
    second = run_job(
        inductor_job, {"cases": [("jsd", 0.02), ("pg", None), ("topk_tail", None)]}, tmp_path, name="second"
    )
    assert set(first) | set(second) == {
        "jsd clip=0.05",
        "jsd clip=0.02",
        "pg clip=None",
        "topk_tail clip=None",
    }
    for case, errors in (first | second).items():
        assert max(errors) <= 1e-5, (case, errors)  # float32 math, other summation order


def test_more_configs_in_one_process_than_dynamos_default_recompile_limit():
    """Nine variants of one graph (three modes x three logit dtypes): past dynamo's default of 8 a
    fullgraph function raises instead of falling back; fused.py raises the limit."""
    student, teacher, mask, _ = make_inputs(torch.float64, seed=6)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for kind, beta in (("jsd", 0.5), ("forward_kl", 0.5), ("reverse_kl", 0.5)):
            s = student.to(dtype, copy=True).requires_grad_()
            loss, _ = vocab_parallel_divergence(
                s, teacher.to(dtype), mask, kind=kind, beta=beta, vocab_size=V, implementation="compiled"
            )
            loss.backward()
            assert torch.isfinite(loss) and s.grad.dtype == dtype
