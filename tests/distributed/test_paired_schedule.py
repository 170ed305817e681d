"""The paired teacher/student schedule: layout-invariant loss and gradients, teacher isolation.

Every layout runs the same fixed rollouts on the tiny Qwen3 (tied embeddings, padded vocab)
and returns the loss and the gradient of every parameter, converted to Hugging Face names and
full shapes by the export mapping (the gradients are copied into the parameters first, so
the same gather/unshard code that exports weights exports gradients).
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.helpers import (
    BUDGET_FOUR,
    BUDGET_ONE,
    export_full,
    fixed_rollouts,
    fixed_step,
    my_microbatches,
    paired_setup,
)


def _local_grads(student) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{name}": p.main_grad.detach().clone()
        for i, chunk in enumerate(student.chunks)
        for name, p in chunk.named_parameters()
    }


def layout_worker(
    hf_dir: str,
    tp: int,
    pp: int,
    sp: bool,
    budgets: tuple[int, ...],
    stages: tuple[int | None, int | None] = (None, None),
    vpp: int | None = None,
    algorithm: str = "opsd",
    attention: str = "sdpa",
):
    """Loss and HF-named gradients for each microbatch budget, on this layout.

    Also runs the last budget with logits at every position (the older last-stage path) and
    reports how far its loss and this rank's local gradients are from the response-only path.
    """
    from megaopsd.algorithm.step import forward_backward

    runtime, parts = paired_setup(
        hf_dir,
        tp,
        pp,
        sp=sp,
        vpp=vpp,
        stages=stages,
        algorithm=algorithm,
        model={"attention_backend": attention},
    )
    spec, student, teacher, loss_fn = parts.spec, parts.student, parts.teacher, parts.loss_fn

    def run(budget: int, all_positions: bool):
        mbs = my_microbatches(runtime, budget, algorithm)
        sums, tokens = forward_backward(
            student=student,
            teacher=teacher,
            microbatches=mbs,
            loss_fn=loss_fn,
            parallel=runtime.parallel,
            all_position_logits=all_positions,
        )
        return {
            "loss": sums["loss_sum"] / tokens,
            "tokens": tokens,
            "num_mb": len(mbs),
            "metrics": {k: v / tokens for k, v in sums.items()},
            "teacher": teacher is not None,
        }

    old = run(budgets[-1], True)
    old_grads = _local_grads(student)
    results = [run(budget, False) for budget in budgets]
    new_grads = _local_grads(student)
    path_diff = {
        "loss": abs(results[-1]["loss"] - old["loss"]) / abs(old["loss"]),
        "grads": {name: _rel(new_grads[name], ref) for name, ref in old_grads.items()},
    }
    # Gradients of the last budget (the weights are overwritten by grads: do it last).
    grads = export_full(student.chunks, spec, runtime, grads=True)
    runtime.shutdown()
    return {"runs": results, "grads": grads, "path_diff": path_diff}


def reference_worker(hf_dir: str):
    """Student and teacher as two plain full-model forwards + a float64 full-vocab JSD."""
    from megaopsd.algorithm.batch import build_microbatch

    runtime, parts = paired_setup(hf_dir, 1, 1)
    spec, student, teacher, loss_fn = parts.spec, parts.student, parts.teacher, parts.loss_fn
    rollouts = fixed_rollouts()
    mb = build_microbatch(rollouts, list(range(len(rollouts))), pad_id=0)
    model, frozen = student.chunks[0], teacher.chunk(0)
    s_logits = model(mb.student_tokens_BL, mb.position_ids(mb.student_tokens_BL), None)
    with torch.no_grad():
        t_logits = frozen(mb.teacher_tokens_BL, mb.position_ids(mb.teacher_tokens_BL), None)
    vocab = spec.vocab_size
    # (1) the same float32 loss function on the two-pass logits: isolates the schedule plumbing
    s_rows = s_logits.reshape(-1, s_logits.shape[-1])[mb.student_index_T]
    t_rows = t_logits.reshape(-1, t_logits.shape[-1])[mb.teacher_index_T]
    same_fn = float(loss_fn(s_rows, t_rows, mb.loss_mask_T, mb.target_ids_T)[0]) / mb.num_loss_tokens
    # (2) a plain float64 full-vocabulary JSD(0.5) at temperature 1.1, written out here
    s = s_logits.reshape(-1, s_logits.shape[-1])[mb.student_index_T, :vocab].double() / 1.1
    t = t_logits.reshape(-1, t_logits.shape[-1])[mb.teacher_index_T, :vocab].double() / 1.1
    log_ps, log_pt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    log_m = torch.logsumexp(
        torch.stack(
            [
                log_pt + torch.log(torch.tensor(0.5, dtype=torch.float64)),
                log_ps + torch.log(torch.tensor(0.5, dtype=torch.float64)),
            ]
        ),
        0,
    )
    jsd = 0.5 * (log_pt.exp() * (log_pt - log_m)).sum(-1) + 0.5 * (log_ps.exp() * (log_ps - log_m)).sum(-1)
    runtime.shutdown()
    return {"same_fn": same_fn, "float64": float(jsd.mean())}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def baseline(tiny_qwen3):
    return run_ranks(
        layout_worker, world_size=1, args=(str(tiny_qwen3), 1, 1, False, (BUDGET_ONE, BUDGET_FOUR))
    )[0]


def _unfused(hf_dir) -> dict:
    """The reference: one process with megatron's own (unfused) attention."""
    args = (str(hf_dir), 1, 1, False, (BUDGET_ONE, BUDGET_FOUR), (None, None), None, "opsd", "unfused")
    return run_ranks(layout_worker, world_size=1, args=args)[0]


@pytest.fixture(scope="module")
def unfused(tiny_qwen3):
    return _unfused(tiny_qwen3)


def _assert_paths_agree(results):
    """Response-only logits give the all-position path's loss and gradients (every rank)."""
    for rank, result in enumerate(results):
        diff = result["path_diff"]
        assert diff["loss"] <= 1e-6, (rank, diff["loss"])
        assert diff["grads"], rank
        worst = max(diff["grads"].items(), key=lambda item: item[1])
        assert worst[1] <= 1e-6, (rank, worst)


def _assert_matches(result, baseline):
    for run, ref in zip(result["runs"], baseline["runs"], strict=True):
        assert run["tokens"] == ref["tokens"]
        assert abs(run["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (run, ref)
    grads, ref_grads = result["grads"], baseline["grads"]
    assert sorted(grads) == sorted(ref_grads)
    for name, ref in ref_grads.items():
        assert _rel(grads[name], ref) <= 1e-5, (name, _rel(grads[name], ref))


def test_response_only_logits_equal_all_positions_tp1(baseline):
    _assert_paths_agree([baseline])


def test_microbatch_cut_does_not_change_loss_or_grads(baseline, tiny_qwen3):
    one, four = baseline["runs"]
    assert one["num_mb"] == 1 and four["num_mb"] >= 3
    assert abs(one["loss"] - four["loss"]) <= 1e-6 * abs(one["loss"])
    # The baseline's gradients come from the multi-microbatch run; one microbatch must agree.
    single = run_ranks(layout_worker, world_size=1, args=(str(tiny_qwen3), 1, 1, False, (BUDGET_ONE,)))[0]
    for name, ref in baseline["grads"].items():
        assert _rel(single["grads"][name], ref) <= 1e-5, name


def test_schedule_loss_equals_two_pass_reference(baseline, tiny_qwen3):
    ref = run_ranks(reference_worker, world_size=1, args=(str(tiny_qwen3),))[0]
    loss = baseline["runs"][0]["loss"]
    assert abs(loss - ref["same_fn"]) <= 1e-6 * ref["same_fn"], (loss, ref)
    # Against float64 math the float32 loss differs by rounding only (measured 1.8e-6 relative).
    assert abs(loss - ref["float64"]) <= 1e-5 * ref["float64"], (loss, ref)


@pytest.mark.parametrize(
    ("tp", "pp", "sp", "world"),
    [(2, 1, False, 2), (2, 1, True, 2), (1, 2, False, 2), (1, 1, False, 2)],
    ids=["tp2", "tp2-sp", "pp2", "dp2"],
)
def test_layouts_match_single_process(baseline, unfused, tiny_qwen3, tp, pp, sp, world):
    """Every layout (SDPA attention, the default) equals one process, and megatron's unfused
    attention in one process, within 1e-5."""
    results = run_ranks(
        layout_worker, world_size=world, args=(str(tiny_qwen3), tp, pp, sp, (BUDGET_ONE, BUDGET_FOUR))
    )
    _assert_matches(results[0], baseline)
    _assert_matches(results[0], unfused)
    _assert_paths_agree(results)


def test_sdpa_attention_equals_the_unfused_reference(baseline, unfused):
    _assert_matches(baseline, unfused)


@pytest.mark.parametrize("budget", ["one", "four"])
def test_pp2_vpp2_matches_single_process(baseline, unfused, tiny_qwen3, budget):
    """PP2 x VPP2, also at a budget that fits the step in one microbatch: with exactly 2 (PP)
    microbatches every pass of the first stage is warm-up and the stages' gloo sends no longer
    pair up (the step hung); the count rule gives the schedule 4 (``microbatch_count_rule``)."""
    index, tokens = {"one": (0, BUDGET_ONE), "four": (1, BUDGET_FOUR)}[budget]
    results = run_ranks(
        layout_worker,
        world_size=2,
        args=(str(tiny_qwen3), 1, 2, False, (tokens,), (None, None), 2),
        timeout_s=180,
    )
    run = results[0]["runs"][0]
    assert run["num_mb"] % 2 == 0 and run["num_mb"] >= 4
    for reference in (baseline, unfused):  # SDPA in one process; megatron's unfused attention
        ref = reference["runs"][index]
        assert run["tokens"] == ref["tokens"]
        assert abs(run["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (run, ref)
        for name, grad in reference["grads"].items():
            assert _rel(results[0]["grads"][name], grad) <= 1e-5, name
    _assert_paths_agree(results)


@pytest.fixture(scope="module")
def baseline_3layers(tiny_qwen3_3layers):
    return run_ranks(
        layout_worker, world_size=1, args=(str(tiny_qwen3_3layers), 1, 1, False, (BUDGET_ONE, BUDGET_FOUR))
    )[0]


@pytest.fixture(scope="module")
def unfused_3layers(tiny_qwen3_3layers):
    return _unfused(tiny_qwen3_3layers)


@pytest.mark.parametrize("stages", [(2, None), (None, 2)], ids=["2+1", "1+2"])
def test_uneven_pipeline_stages_match_single_process(
    baseline_3layers, unfused_3layers, tiny_qwen3_3layers, stages
):
    """3 layers at PP2 (megatron's num_layers_in_first/last_pipeline_stage) equal TP1 within
    1e-5, with SDPA or megatron's unfused attention there."""
    results = run_ranks(
        layout_worker,
        world_size=2,
        args=(str(tiny_qwen3_3layers), 1, 2, False, (BUDGET_ONE, BUDGET_FOUR), stages),
    )
    _assert_matches(results[0], baseline_3layers)
    _assert_matches(results[0], unfused_3layers)
    _assert_paths_agree(results)
    assert any(".layers.2." in name for name in results[0]["grads"])  # all 3 layers, HF-named


@pytest.mark.parametrize("sp", [False, True], ids=["tp2-pp2", "tp2-sp-pp2"])
def test_tp2_pp2_matches_single_process(baseline, unfused, tiny_qwen3, sp):
    results = run_ranks(
        layout_worker, world_size=4, args=(str(tiny_qwen3), 2, 2, sp, (BUDGET_ONE, BUDGET_FOUR))
    )
    _assert_matches(results[0], baseline)
    _assert_matches(results[0], unfused)
    _assert_paths_agree(results)


@pytest.fixture(scope="module")
def baselines_tp1(tiny_qwen3):
    return {
        algorithm: run_ranks(
            layout_worker,
            world_size=1,
            args=(str(tiny_qwen3), 1, 1, False, (BUDGET_ONE, BUDGET_FOUR), (None, None), None, algorithm),
        )[0]
        for algorithm in ("grpo", "sft")
    }


@pytest.mark.parametrize("algorithm", ["grpo", "sft"])
@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_baseline_losses_match_single_process(baselines_tp1, tiny_qwen3, algorithm, tp, pp):
    """GRPO (with its reference stream) and SFT (student stream only): TP2 and PP2 equal TP1."""
    baseline = baselines_tp1[algorithm]
    one, four = baseline["runs"]
    assert abs(one["loss"] - four["loss"]) <= 1e-6 * abs(one["loss"])
    # GRPO keeps a reference (KL 0.05); SFT builds no teacher at all
    assert one["teacher"] == (algorithm == "grpo")
    if algorithm == "grpo":
        m = one["metrics"]
        assert 0 < m["clip_low_sum"] + m["clip_high_sum"] < 1  # some ratios left the clip range
        assert m["kl_sum"] == 0.0  # the reference holds the initial weights: k3 is exactly 0 at step 0
    results = run_ranks(
        layout_worker,
        world_size=2,
        args=(str(tiny_qwen3), tp, pp, False, (BUDGET_ONE, BUDGET_FOUR), (None, None), None, algorithm),
    )
    _assert_matches(results[0], baseline)
    if algorithm == "grpo":
        for key in ("clip_low_sum", "clip_high_sum", "ratio_sum"):
            assert results[0]["runs"][0]["metrics"][key] == pytest.approx(
                one["metrics"][key], rel=1e-5, abs=1e-9
            )


def teacher_worker(hf_dir: str, tp: int, pp: int, mode: str, steps: int):
    """Train ``steps`` steps; return teacher/student weights per step and the received-tensor grads."""
    from megaopsd.algorithm import forward as forward_module
    from megaopsd.algorithm.step import train_step
    from megaopsd.models import unwrap_chunk

    received = []
    original_call = forward_module.PairedForward.__call__

    def capturing_call(self, data_iterator, model):
        tensor = unwrap_chunk(model).decoder.input_tensor
        if tensor is not None:
            received.append(tensor)
        return original_call(self, data_iterator, model)

    forward_module.PairedForward.__call__ = capturing_call
    runtime, parts = paired_setup(hf_dir, tp, pp, mode=mode, decay=0.8, lr=3e-3)
    spec, student, teacher, loss_fn = parts.spec, parts.student, parts.teacher, parts.loss_fn
    copies = [teacher.chunk(i) for i in range(len(student.chunks))]
    isolated = (
        all(
            p.grad is None and not hasattr(p, "main_grad") and not p.requires_grad
            for c in copies
            for p in c.parameters()
        )
        if mode != "current"
        else True
    )
    history = {
        "teacher": [export_full(copies, spec, runtime, grads=False)],
        "student": [export_full(student.chunks, spec, runtime, grads=False)],
        "loss": [],
    }
    received_grads = []
    for _ in range(steps):
        received.clear()
        result = train_step(
            student=student,
            teacher=teacher,
            microbatches=my_microbatches(runtime, BUDGET_FOUR),
            loss_fn=loss_fn,
            parallel=runtime.parallel,
        )
        history["loss"].append(result.loss)
        received_grads += [t.grad.clone() for t in received if t.grad is not None]
        history["teacher"].append(export_full(copies, spec, runtime, grads=False))
        history["student"].append(export_full(student.chunks, spec, runtime, grads=False))
    isolated = (
        isolated and all(p.grad is None for c in copies for p in c.parameters())
        if mode != "current"
        else True
    )
    mbs = my_microbatches(runtime, BUDGET_FOUR)
    runtime.shutdown()
    return {
        "history": history,
        "isolated": isolated,
        "received_grads": received_grads,
        "student_rows": [mb.student_len for mb in mbs],
        "num_received": len(received_grads),
    }


def test_fixed_teacher_gets_no_gradient_and_never_moves(tiny_qwen3):
    results = run_ranks(teacher_worker, world_size=2, args=(str(tiny_qwen3), 1, 2, "fixed", 10))
    rank0, last = results[0], results[1]
    history = rank0["history"]
    assert history["loss"][-1] < history["loss"][0]  # the student moves toward the teacher
    for snapshot in history["teacher"][1:]:
        for name, tensor in history["teacher"][0].items():
            assert torch.equal(snapshot[name], tensor), name  # bit-identical after every step
    assert any(not torch.equal(history["student"][-1][n], t) for n, t in history["student"][0].items())
    assert rank0["isolated"] and last["isolated"]
    # The last stage received cat([student, teacher]) rows; the teacher rows sent no gradient upstream.
    grads = last["received_grads"]
    assert len(grads) == 10 * len(last["student_rows"])
    for grad, rows in zip(grads, last["student_rows"] * 10, strict=True):
        assert grad[:rows].abs().sum() > 0
        assert torch.count_nonzero(grad[rows:]) == 0


def test_ema_teacher_follows_the_formula(tiny_qwen3):
    history = run_ranks(teacher_worker, world_size=1, args=(str(tiny_qwen3), 1, 1, "ema", 10))[0]["history"]
    expected = {n: t.double() for n, t in history["teacher"][0].items()}
    for step in range(1, 11):
        for name in expected:
            expected[name] = 0.8 * expected[name] + 0.2 * history["student"][step][name].double()
            assert _rel(history["teacher"][step][name], expected[name]) <= 1e-6, (step, name)
    assert history["loss"][-1] < history["loss"][0]


def overlap_worker(hf_dir: str, overlap: bool, steps: int):
    """DP2, distributed optimizer: losses and the final weights after ``steps`` steps."""
    knobs = {
        "use_distributed_optimizer": True,
        "overlap_grad_reduce": overlap,
        "overlap_param_gather": overlap,
    }
    runtime, parts = paired_setup(hf_dir, 1, 1, lr=3e-3, parallel=knobs)
    ddp = parts.student.chunks[0].ddp_config
    assert (ddp.overlap_grad_reduce, ddp.overlap_param_gather, ddp.use_distributed_optimizer) == (
        overlap,
        overlap,
        True,
    )
    assert (parts.student.chunks[0].config.grad_sync_func is not None) == overlap
    losses = [fixed_step(runtime, parts).loss for _ in range(steps)]
    weights = export_full(parts.student.chunks, parts.spec, runtime, grads=False)
    runtime.shutdown()
    return {"losses": losses, "weights": weights}


def test_overlapped_grad_reduce_and_param_gather_equal_the_plain_distributed_optimizer(tiny_qwen3):
    """parallel.overlap_grad_reduce + overlap_param_gather (DP2, distributed optimizer, several
    microbatches): the same losses and weights after 3 steps as without the overlap."""
    plain, overlapped = (
        run_ranks(overlap_worker, world_size=2, args=(str(tiny_qwen3), overlap, 3))[0]
        for overlap in (False, True)
    )
    assert plain["losses"][-1] < plain["losses"][0]
    for a, b in zip(plain["losses"], overlapped["losses"], strict=True):
        assert abs(a - b) <= 1e-6 * abs(a), (plain["losses"], overlapped["losses"])
    for name, tensor in plain["weights"].items():
        assert _rel(overlapped["weights"][name], tensor) <= 1e-6, name
