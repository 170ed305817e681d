"""megaopsd.loss at TP2 (two gloo processes) against TP1, and no full-vocab tensor on any rank.

One spawn of two ranks runs every case; the test functions assert on what the ranks returned.
The compiled path (megaopsd/loss/fused.py, traced with dynamo's eager backend as in
tests/unit/test_loss_compiled.py) runs every TP2 case as well.

    .venv/bin/python -m pytest tests/distributed/test_loss_tp.py -q

Legend: T = tokens, W = vocab shard width, F = padded full vocab (W x TP), V = true vocab size.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megaopsd.loss import KINDS, fused, vocab_parallel_divergence
from tests.dist_harness import run_ranks

TP, T, F, TOP_K, CHUNK = 2, 29, 256, 6, 8
W = F // TP
# The cases run in float64: TP2 and TP1 differ by summation order only (rounding, ~1e-15).
FP64_TOL = 1e-12
# (vocab size, beta, temperature, whole-number teacher logits): 203 leaves rank 1 with 75 real
# columns, 100 leaves it none; whole numbers put ties across shards at the teacher's k-th value.
SETTINGS = [
    (203, 0.0, 1.0, False),
    (203, 0.5, 0.7, False),
    (203, 1.0, 1.1, False),
    (203, 0.3, 1.0, True),
    (100, 0.5, 1.0, False),
]
MEM_T, MEM_F, MEM_CHUNK = 64, 512, 16


def _inputs(vocab: int, seed: int, tokens: int = T, full: int = F, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    student = 2.0 * torch.randn(tokens, full, generator=g, dtype=torch.float64)
    teacher = student + 1.5 * torch.randn(tokens, full, generator=g, dtype=torch.float64)
    if ties:
        teacher = teacher.round()
    student[:, vocab:] = 50.0 + torch.rand(tokens, full - vocab, generator=g, dtype=torch.float64)
    teacher[:, vocab:] = 50.0 + torch.rand(tokens, full - vocab, generator=g, dtype=torch.float64)
    mask = torch.rand(tokens, generator=g) > 0.2
    sampled = torch.randint(0, vocab, (tokens,), generator=g)
    return student, teacher, mask, sampled


def _loss_and_grad(student, teacher, group, **kw):
    s = student.clone().requires_grad_()
    loss, metrics = vocab_parallel_divergence(s, teacher, tp_group=group, **kw)
    loss.backward()
    values = [loss, *(v for v in vars(metrics).values() if v is not None)]
    return torch.stack([v.detach() for v in values]), s.grad


def _compare_tp1_tp2(rank: int) -> list[dict]:
    lo = rank * W
    out = []
    for kind in KINDS:
        for i, (vocab, beta, tau, ties) in enumerate(SETTINGS):
            clip = 1.0 if (kind != "pg" and i % 2) else None
            student, teacher, mask, sampled = _inputs(vocab, seed=i, ties=ties)
            kw = dict(
                kind=kind,
                beta=beta,
                temperature=tau,
                vocab_size=vocab,
                top_k=TOP_K,
                clip=clip,
                sampled_ids_T=sampled,
                chunk_tokens=CHUNK,
            )
            vals1, grad1 = _loss_and_grad(student, teacher, None, mask_T=mask, **kw)
            shard = slice(lo, lo + W)
            vals2, grad2 = _loss_and_grad(
                student[:, shard].contiguous(),
                teacher[:, shard].contiguous(),
                dist.group.WORLD,
                mask_T=mask,
                **kw,
            )
            # numpy, not tensors: torch would pass tensors through shared memory that dies with the rank
            arrays = dict(vals1=vals1, vals2=vals2, grad1=grad1[:, shard], grad2=grad2)
            arrays["vals2c"], arrays["grad2c"] = _loss_and_grad(
                student[:, shard].contiguous(),
                teacher[:, shard].contiguous(),
                dist.group.WORLD,
                mask_T=mask,
                implementation="compiled",
                **kw,
            )
            out.append(
                dict(case=f"{kind} V={vocab} beta={beta} tau={tau} clip={clip} ties={ties}")
                | {k: v.numpy() for k, v in arrays.items()}
            )
    return out


ENTRY_KINDS = ("jsd", "forward_kl", "reverse_kl", "topk", "topk_tail")
ENTRY_CLIP = 0.02  # caps a good share of the entries of these random rows


def _compare_entry_clip(rank: int) -> list[dict]:
    """clip_mode=entry at TP1 and TP2 next to the float64 reference of the official formula."""
    from tests.unit.test_loss_entry_clip import entry_reference

    lo, out = rank * W, []
    for kind in ENTRY_KINDS:
        for i, (vocab, beta, tau, ties) in enumerate(SETTINGS):
            student, teacher, mask, _ = _inputs(vocab, seed=40 + i, ties=ties)
            weights = mask.double() * torch.linspace(0.5, 1.5, T, dtype=torch.float64)  # weighted mask
            kw = dict(kind=kind, beta=beta, temperature=tau, vocab_size=vocab, clip=ENTRY_CLIP)
            s_ref = student.clone().requires_grad_()
            ref_loss, _, ref_metrics = entry_reference(s_ref, teacher, weights, top_k=TOP_K, **kw)
            ref_loss.backward()
            kw |= dict(mask_T=weights, top_k=TOP_K, clip_mode="entry", chunk_tokens=CHUNK)
            vals1, grad1 = _loss_and_grad(student, teacher, None, **kw)
            shard = slice(lo, lo + W)
            vals2, grad2 = _loss_and_grad(
                student[:, shard].contiguous(), teacher[:, shard].contiguous(), dist.group.WORLD, **kw
            )
            ref_vals = torch.stack([ref_loss.detach(), *ref_metrics.values()])
            arrays = dict(vals1=vals1, vals2=vals2, grad1=grad1[:, shard], grad2=grad2)
            arrays["vals2c"], arrays["grad2c"] = _loss_and_grad(
                student[:, shard].contiguous(),
                teacher[:, shard].contiguous(),
                dist.group.WORLD,
                implementation="compiled",
                **kw,
            )
            arrays |= dict(ref_vals=ref_vals, ref_grad=s_ref.grad[:, shard])
            out.append(
                dict(
                    case=f"entry {kind} V={vocab} beta={beta} tau={tau} ties={ties}", names=list(ref_metrics)
                )
                | {k: v.numpy() for k, v in arrays.items()}
            )
    return out


def _compare_boundary(rank: int) -> list[dict]:
    """First-token boundary sums at TP1 and TP2 (think ids on both shards, one past the vocab)."""
    from megaopsd.loss.boundary import first_token_sums

    out = []
    for vocab in (203, 100):
        student, teacher, _, sampled = _inputs(vocab, seed=60)
        teacher[[0, 5], 3] = 90.0  # rank 0's shard
        teacher[[7, 11], min(vocab - 1, W + 2)] = 90.0  # rank 1's shard when it has real columns
        first = torch.zeros(T, dtype=torch.bool)
        first[[0, 5, 7, 11, 20]] = True
        kw = dict(kind="jsd", beta=0.5, temperature=1.0, top_k=None, vocab_size=vocab, think_ids=[3, W + 2])
        one = first_token_sums(student, teacher, first, sampled, tp_group=None, **kw)
        shard = slice(rank * W, (rank + 1) * W)
        two = first_token_sums(
            student[:, shard].contiguous(),
            teacher[:, shard].contiguous(),
            first,
            sampled,
            tp_group=dist.group.WORLD,
            **kw,
        )
        out.append(dict(vocab=vocab) | {k: (one[k].item(), two[k].item()) for k in one})
    return out


class _AllocationRecorder(TorchDispatchMode):
    """Shapes of every tensor an op creates (view ops, which allocate nothing, are skipped)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            self.shapes += [
                (str(func), tuple(t.shape)) for t in tree_leaves(out) if isinstance(t, torch.Tensor)
            ]
        return out


def _naive_full_vocab_jsd(student_TW, teacher_TW, group) -> torch.Tensor:
    """A positive control for the recorder: gathers full-vocab logits like the naive baseline."""
    parts = [torch.empty_like(student_TW) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, student_TW.detach(), group=group)
    full_TF = torch.cat(parts, dim=1)
    return torch.log_softmax(full_TF, dim=-1).sum()


def _record_allocations(rank: int) -> dict:
    student, teacher, mask, sampled = _inputs(MEM_F - 37, seed=11, tokens=MEM_T, full=MEM_F)
    w = MEM_F // TP
    shard = slice(rank * w, (rank + 1) * w)
    s, t = student[:, shard].float().requires_grad_(), teacher[:, shard].float()
    per_kind = {}
    runs = [(kind, None, "token") for kind in KINDS] + [(kind, 0.02, "entry") for kind in ENTRY_KINDS]
    for kind, clip, clip_mode in runs:
        with _AllocationRecorder() as rec:
            loss, _ = vocab_parallel_divergence(
                s,
                t,
                mask,
                kind=kind,
                beta=0.5,
                vocab_size=MEM_F - 37,
                tp_group=dist.group.WORLD,
                top_k=TOP_K,
                clip=clip,
                clip_mode=clip_mode,
                sampled_ids_T=sampled,
                chunk_tokens=MEM_CHUNK,
            )
            loss.backward()
        per_kind[f"{kind} {clip_mode}"] = rec.shapes
        s.grad = None
    with _AllocationRecorder() as control:
        _naive_full_vocab_jsd(s, t, dist.group.WORLD)
    return dict(per_kind=per_kind, control=control.shapes)


RLSD_LAMBDA, RLSD_EPS = 0.5, 0.2


def _rows_microbatch(sampled, mask, sample, **extra):
    """A microbatch whose scored rows are the T rows of the test logits, in order."""
    from megaopsd.algorithm.batch import PairedMicrobatch

    return PairedMicrobatch(
        student_tokens_BL=torch.zeros(1, T, dtype=torch.long),
        teacher_tokens_BL=torch.zeros(1, T, dtype=torch.long),
        student_index_T=torch.arange(T),
        teacher_index_T=torch.arange(T),
        target_ids_T=sampled,
        loss_mask_T=mask,
        sample_T=sample,
        **extra,
    )


def _rlsd_reference(student, teacher, mask, sampled, advantage, engine, vocab):
    """RLSD's loss written out in float64 (docs/variants.md), full vocabulary, plain autograd."""
    s = student.clone().requires_grad_()
    logp = torch.log_softmax(s[:, :vocab], -1).gather(1, sampled[:, None]).squeeze(1)
    t_logp = torch.log_softmax(teacher[:, :vocab], -1).gather(1, sampled[:, None]).squeeze(1)
    delta = (t_logp - logp).detach()
    weight = torch.exp(torch.sign(advantage) * delta).clamp(1 - RLSD_EPS, 1 + RLSD_EPS)
    token_adv = advantage * ((1 - RLSD_LAMBDA) + RLSD_LAMBDA * weight)
    ratio = torch.exp(logp - engine)
    per_token = -torch.minimum(ratio * token_adv, ratio.clamp(1 - 0.2, 1 + 0.28) * token_adv)
    loss = (per_token * mask).sum()
    loss.backward()
    return loss.detach(), s.grad, (weight * mask).sum()


def _compare_rlsd(rank: int) -> list[dict]:
    """RlsdLoss at TP1 (whole rows) and TP2 (this rank's shard) against the float64 formula."""
    from megaopsd.algorithm.policy_loss import RlsdLoss
    from megaopsd.config import AlgorithmConfig

    cfg = AlgorithmConfig(name="rlsd", rlsd_lambda=RLSD_LAMBDA, rlsd_epsilon_w=RLSD_EPS)
    out = []
    for vocab, seed in ((203, 0), (100, 1)):
        student, teacher, mask, sampled = _inputs(vocab, seed)
        g = torch.Generator().manual_seed(seed + 100)
        advantage = torch.randn(T, generator=g, dtype=torch.float64)
        full_logp = torch.log_softmax(student[:, :vocab], -1).gather(1, sampled[:, None]).squeeze(1)
        # the engine's logprobs: near the trainer's, so ratios fall inside and outside the clip
        engine = full_logp + 0.3 * torch.randn(T, generator=g, dtype=torch.float64)
        mb = _rows_microbatch(
            sampled, mask, torch.zeros(T, dtype=torch.long), engine_logprobs_T=engine, advantage_T=advantage
        )
        ref_loss, ref_grad, ref_weight = _rlsd_reference(
            student, teacher, mask, sampled, advantage, engine, vocab
        )
        results = {}
        for name, (lo, hi, group) in {
            "tp1": (0, F, None),
            "tp2": (rank * W, (rank + 1) * W, dist.group.WORLD),
        }.items():
            loss_fn = RlsdLoss(cfg, vocab_size=vocab, tp_group=group, chunk_tokens=CHUNK)
            s = student[:, lo:hi].clone().requires_grad_()
            loss, metrics = loss_fn(s, teacher[:, lo:hi], mb)
            loss.backward()
            results[name] = (loss.detach(), s.grad, metrics["rlsd_weight_sum"].detach(), (lo, hi))
        out.append(dict(reference=(ref_loss, ref_grad, ref_weight), **results))
    return out


PW_W_MIN, PW_TAU, PW_S, PW_CLIP, PW_TEMPERATURE = 0.25, 0.3, 0.1, 0.05, 1.1
PW_LENGTHS = (7, 9, 5, 8)  # four responses, 29 scored tokens


def _pw_opsd_reference(student, teacher, mask, vocab, reduction):
    """Position-weighted OPSD written out in float64 as the official trainer computes it
    (docs/variants.md): responses as padded rows, the forward KL with the per-entry clip at
    temperature 1.1, w = w_min + (1 - w_min) sigmoid(((cumsum(mask) - 0.5) / L - tau) / s)."""
    s = student.clone().requires_grad_()
    ls = torch.log_softmax(s[:, :vocab] / PW_TEMPERATURE, -1)
    lt = torch.log_softmax(teacher[:, :vocab] / PW_TEMPERATURE, -1)
    per_token = (lt.exp() * (lt - ls)).clamp(max=PW_CLIP).sum(-1)  # kl_div(ls, lt, log_target)
    rows, masks, start = [], [], 0
    for length in PW_LENGTHS:
        rows.append(per_token[start : start + length])
        masks.append(mask[start : start + length].double())
        start += length
    width = max(PW_LENGTHS)
    loss_BL = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])
    mask_BL = torch.stack([torch.nn.functional.pad(m, (0, width - len(m))) for m in masks])
    length_B = mask_BL.sum(1).clamp(min=1.0)
    index_BL = mask_BL.cumsum(1) * mask_BL
    frac = (index_BL - 0.5).clamp(min=0.0) / length_B[:, None]
    weight_BL = PW_W_MIN + (1 - PW_W_MIN) * torch.sigmoid((frac - PW_TAU) / PW_S)
    weighted = loss_BL * weight_BL * mask_BL
    if reduction == "sequence":
        valid = mask_BL.sum(1) > 0
        loss = (weighted.sum(1) / length_B)[valid].mean()
    else:
        loss = weighted.sum() / mask_BL.sum()
    loss.backward()
    return loss.detach(), s.grad, (weight_BL * mask_BL).sum() / mask_BL.sum()


def _compare_pw_opsd(rank: int) -> list[dict]:
    """PositionWeightedDivergence at TP1 and TP2, divided by the step's token count as the
    schedule does, against the float64 formula, for both reductions."""
    from megaopsd.algorithm.loss import PositionWeightedDivergence, make_loss_fn
    from megaopsd.config import AlgorithmConfig, LossConfig

    loss_cfg = LossConfig(
        kind="forward_kl",
        beta=0.0,
        clip=PW_CLIP,
        clip_mode="entry",
        temperature=PW_TEMPERATURE,
        chunk_tokens=CHUNK,
    )
    sample = torch.cat([torch.full((n,), i + 3, dtype=torch.long) for i, n in enumerate(PW_LENGTHS)])
    out = []
    for (vocab, seed), reduction in itertools.product(((203, 0), (100, 1)), ("sequence", "token")):
        student, teacher, _, sampled = _inputs(vocab, seed)
        mask = torch.ones(T, dtype=torch.bool)
        mask[:2] = False  # response 0: its first two tokens left out (trainer.skip_first_tokens)
        mask[7 + 4] = False  # response 1: a token inside it left out
        mask[16:21] = False  # response 2: out of the loss
        mb = _rows_microbatch(sampled, mask, sample)
        ref_loss, ref_grad, ref_weight = _pw_opsd_reference(student, teacher, mask, vocab, reduction)
        cfg = AlgorithmConfig(
            name="pw_opsd",
            position_w_min=PW_W_MIN,
            position_tau=PW_TAU,
            position_s=PW_S,
            position_reduction=reduction,
        )
        tokens = float(mask.sum())
        results = {}
        for name, (lo, hi, group) in {
            "tp1": (0, F, None),
            "tp2": (rank * W, (rank + 1) * W, dist.group.WORLD),
        }.items():
            divergence = make_loss_fn(loss_cfg, vocab_size=vocab, tp_group=group)
            loss_fn = PositionWeightedDivergence(divergence, cfg, vocab_size=vocab, tp_group=group)
            loss_fn.sequence_scale = tokens / 3  # three responses have loss tokens
            s = student[:, lo:hi].clone().requires_grad_()
            loss_sum, metrics = loss_fn(s, teacher[:, lo:hi], mb)
            (loss_sum / tokens).backward()
            weight = metrics["position_weight_sum"].detach() / tokens
            results[name] = ((loss_sum / tokens).detach(), s.grad, weight, (lo, hi))
        out.append(dict(case=f"V={vocab} {reduction}", reference=(ref_loss, ref_grad, ref_weight), **results))
    return out


def _compare_bf16_paths(rank: int) -> list[dict]:
    """bfloat16 logits at TP2 (what GPUs train with): the compiled path against the torch path on
    the same shards, entry and token clip, the top-k kinds picking the student's bf16 values
    across ranks."""
    shard = slice(rank * W, (rank + 1) * W)
    out = []
    for kind, clip, clip_mode in [
        ("jsd", None, "token"),
        ("topk_tail", 0.02, "entry"),
        ("topk", 1.0, "token"),
        ("pg", None, "token"),
    ]:
        student, teacher, mask, sampled = _inputs(203, seed=70)
        student, teacher = (x[:, shard].to(torch.bfloat16).contiguous() for x in (student, teacher))
        kw = dict(kind=kind, beta=0.5, vocab_size=203, top_k=TOP_K, clip=clip, clip_mode=clip_mode)
        kw |= dict(sampled_ids_T=sampled, chunk_tokens=CHUNK, mask_T=mask)
        paths = [
            _loss_and_grad(student, teacher, dist.group.WORLD, implementation=impl, **kw)
            for impl in ("torch", "compiled")
        ]
        out.append(
            dict(
                case=f"{kind} clip={clip} {clip_mode}",
                paths=[(v.numpy(), g.float().numpy()) for v, g in paths],
            )
        )
    return out


def _worker() -> dict:
    torch.set_num_threads(1)
    fused.BACKEND = "eager"
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        return dict(
            compare=_compare_tp1_tp2(rank),
            entry=_compare_entry_clip(rank),
            boundary=_compare_boundary(rank),
            allocations=_record_allocations(rank),
            rlsd=_compare_rlsd(rank),
            pw_opsd=_compare_pw_opsd(rank),
            bf16=_compare_bf16_paths(rank),
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results() -> list[dict]:
    return run_ranks(_worker, world_size=TP, timeout_s=300)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_tp2_equals_tp1_values_grads_and_metrics(rank_results):
    n_cases = len(KINDS) * len(SETTINGS)
    for rank, result in enumerate(rank_results):
        assert len(result["compare"]) == n_cases
        for r in result["compare"]:
            r = {k: torch.from_numpy(v) if k != "case" else v for k, v in r.items()}
            assert r["vals1"][0].item() != 0.0, r["case"]
            for tag in ("2", "2c"):
                for i, (a, b) in enumerate(zip(r["vals" + tag], r["vals1"])):
                    assert abs(a - b).item() <= FP64_TOL * max(abs(b).item(), 1e-12), (
                        f"rank {rank} {r['case']} vals{tag} value {i}"
                    )
                grad = r["grad" + tag]
                if r["grad1"].abs().max() > 0:
                    assert _rel_err(grad, r["grad1"]) <= FP64_TOL, f"rank {rank} {r['case']} grad{tag}"
                else:  # rank 1 with an all-padding shard: nothing to learn there
                    assert torch.count_nonzero(grad) == 0, f"rank {rank} {r['case']} grad{tag}"


def test_no_full_vocab_tensor_on_any_rank(rank_results):
    full_numel, shard_grad = MEM_T * MEM_F, (MEM_T, MEM_F // TP)
    chunk_numel = MEM_CHUNK * (MEM_F // TP + 1)
    for rank, result in enumerate(rank_results):
        allocs = result["allocations"]
        # The recorder sees full-vocab tensors when they exist ...
        assert any(torch.Size(s).numel() >= full_numel for _, s in allocs["control"])
        for kind, shapes in allocs["per_kind"].items():
            assert len(shapes) > 50, f"rank {rank} {kind}: recorder saw too little"
            big = [(op, s) for op, s in shapes if torch.Size(s).numel() >= full_numel]
            assert not big, f"rank {rank} {kind}: full-vocab tensors {big[:3]}"
            # ... and beyond chunk-sized buffers only the [T, W] gradient itself is allocated.
            over_chunk = {s for _, s in shapes if torch.Size(s).numel() > chunk_numel}
            assert over_chunk == {shard_grad}, f"rank {rank} {kind}: {over_chunk}"


_METRIC_ORDER = (
    "divergence_sum",
    "student_entropy_sum",
    "teacher_entropy_sum",
    "clipped_count",
    "token_count",
    "clipped_entry_count",
    "entry_count",
    "clipped_loss_sum",
    "positive_loss_sum",
)


def test_entry_clip_equals_the_official_formula_at_tp1_and_tp2(rank_results):
    """Loss, gradients and every metric of clip_mode=entry vs the float64 reference, both layouts."""
    n_cases = len(ENTRY_KINDS) * len(SETTINGS)
    for rank, result in enumerate(rank_results):
        assert len(result["entry"]) == n_cases
        for r in result["entry"]:
            case = r["case"]
            ref = dict(zip(["loss", *r["names"]], torch.from_numpy(r["ref_vals"])))
            assert ref["clipped_entry_count"] > 0, case
            # vals: loss, divergence, entropies, (top-k mass), clipped, tokens, entry metrics
            for tag in ("vals1", "vals2", "vals2c"):
                vals = torch.from_numpy(r[tag])
                got = dict(zip(["loss", *_METRIC_ORDER], [vals[0], *vals[1:4], *vals[-6:]]))
                for name, want in ref.items():
                    tol = 1e-6 * max(abs(want).item(), 1e-12)
                    assert abs(got[name] - want).item() <= tol, f"rank {rank} {case} {tag} {name}"
            ref_grad = torch.from_numpy(r["ref_grad"])
            for tag in ("grad1", "grad2", "grad2c"):
                grad = torch.from_numpy(r[tag])
                if ref_grad.abs().max() > 0:
                    assert _rel_err(grad, ref_grad) <= 1e-6, f"rank {rank} {case} {tag}"
                else:
                    assert torch.count_nonzero(grad) == 0, f"rank {rank} {case} {tag}"


def test_first_token_boundary_sums_are_layout_independent(rank_results):
    for rank, result in enumerate(rank_results):
        for r in result["boundary"]:
            think = 4.0 if r["vocab"] > W + 2 else 2.0  # id W + 2 is padding when V = 100
            assert r["first_token_count"] == (5.0, 5.0), r
            assert r["first_token_teacher_think_sum"] == (think, think), (rank, r)
            one, two = r["first_token_divergence_sum"]
            assert one > 0 and abs(one - two) <= 1e-9 * one, (rank, r)


def test_rlsd_loss_equals_its_float64_formula_at_tp1_and_tp2(rank_results):
    """Value, gradient and the mean token weight of ``RlsdLoss`` (float64 logits, padded vocab,
    masked tokens, advantages of both signs, ratios inside and outside the clip)."""
    for rank, result in enumerate(rank_results):
        for case in result["rlsd"]:
            ref_loss, ref_grad, ref_weight = case["reference"]
            for name in ("tp1", "tp2"):
                loss, grad, weight, (lo, hi) = case[name]
                assert _rel_err(loss, ref_loss) <= FP64_TOL, (rank, name)
                assert _rel_err(weight, ref_weight) <= FP64_TOL, (rank, name)
                # padded columns get no gradient in either (a shard of only padding: all zeros)
                assert _rel_err(grad, ref_grad[:, lo:hi]) <= FP64_TOL, (rank, name)


def test_position_weighted_opsd_equals_its_float64_formula_at_tp1_and_tp2(rank_results):
    """Value, gradient and the mean position weight of ``PositionWeightedDivergence`` (float64,
    padded vocab, a skipped prefix, a masked token inside a response, a response out of the
    loss) against the official computation, per-response and per-token reduction."""
    for rank, result in enumerate(rank_results):
        assert len(result["pw_opsd"]) == 4
        for case in result["pw_opsd"]:
            ref_loss, ref_grad, ref_weight = case["reference"]
            for name in ("tp1", "tp2"):
                loss, grad, weight, (lo, hi) = case[name]
                assert _rel_err(loss, ref_loss) <= FP64_TOL, (rank, case["case"], name)
                assert _rel_err(weight, ref_weight) <= FP64_TOL, (rank, case["case"], name)
                assert _rel_err(grad, ref_grad[:, lo:hi]) <= FP64_TOL, (rank, case["case"], name)
    # the two reductions differ (responses of unequal length): the test tells them apart
    sequence, token = (c["reference"][0] for c in rank_results[0]["pw_opsd"][:2])
    assert abs(sequence - token) > 1e-3 * abs(token)


def test_bf16_tp2_compiled_equals_the_torch_path(rank_results):
    for rank, result in enumerate(rank_results):
        assert len(result["bf16"]) == 4
        for r in result["bf16"]:
            (vals_t, grad_t), (vals_c, grad_c) = r["paths"]
            vals_t, vals_c = torch.from_numpy(vals_t), torch.from_numpy(vals_c)
            assert vals_t[0].item() != 0.0, r["case"]
            # float32 math on the same bf16 inputs: rounding apart; the gradients are bf16 (one ulp)
            assert ((vals_c - vals_t).abs() <= 1e-5 * vals_t.abs().clamp_min(1.0)).all(), (rank, r["case"])
            grad_t, grad_c = torch.from_numpy(grad_t), torch.from_numpy(grad_c)
            assert (grad_c - grad_t).abs().max() <= 2**-7 * grad_t.abs().max(), (rank, r["case"])


def _inductor_worker(cache_dir: str) -> dict:
    """The TP2 passes built by inductor (C++ here, Triton on CUDA) at a vocab that leaves rank 0
    real columns and rank 1 none: each rank builds one set of graphs, the zero-width shard's on
    rank 1 (one vocab keeps the build to one set per rank: these compiles cost seconds each)."""
    import os

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank, out = dist.get_rank(), {}
        shard = slice(rank * W, (rank + 1) * W)
        for vocab in (100,):
            student, teacher, mask, _ = _inputs(vocab, seed=80)
            s, t = student[:, shard].float().contiguous(), teacher[:, shard].float().contiguous()
            kw = dict(
                kind="topk_tail", beta=0.5, vocab_size=vocab, top_k=TOP_K, mask_T=mask, chunk_tokens=CHUNK
            )
            (v1, g1), (v2, g2) = (
                _loss_and_grad(s, t, dist.group.WORLD, implementation=impl, **kw)
                for impl in ("torch", "compiled")
            )
            out[vocab] = (_rel_err(v2, v1), _rel_err(g2, g1) if g1.abs().max() > 0 else g2.abs().max().item())
        return out
    finally:
        dist.destroy_process_group()


def test_tp2_passes_built_by_inductor_equal_the_torch_path(tmp_path):
    """The rest of this file traces the compiled TP graphs with dynamo's eager backend; here
    inductor builds them, the row max and sum-of-exp passes and a shard of padding only included."""
    for rank, errors in enumerate(
        run_ranks(_inductor_worker, world_size=TP, args=(str(tmp_path),), timeout_s=300)
    ):
        for vocab, (vals, grad) in errors.items():
            assert vals <= 1e-5 and grad <= 1e-5, (rank, vocab, vals, grad)
