"""One OPSD optimizer step over paired microbatches.

    zero grads -> forward/backward of every microbatch (one schedule, both streams)
    -> optimizer step (clip, Adam) -> LR schedule -> teacher update

Metrics come back as global token means: every rank returns the same numbers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from megaopsd.algorithm.batch import PairedMicrobatch
from megaopsd.algorithm.forward import LogprobFn, LossFn, PairedForward
from megaopsd.algorithm.optim import TrainableStudent
from megaopsd.algorithm.policy_loss import StudentLoss
from megaopsd.algorithm.teacher import Teacher
from megaopsd.runtime.distributed import collective_device, dp_sum
from megaopsd.runtime.parallel import ParallelState


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepResult:
    loss: float  # token-mean loss over the global batch
    grad_norm: float
    lr: float
    num_tokens: int  # loss tokens in the global batch
    skipped: bool  # the optimizer skipped the update (non-finite gradients)
    # other token means reported by the loss (divergence, entropies, ...); ``*_max``: maxima
    metrics: dict[str, float]


def _reduce_metrics(outputs: list[dict[str, torch.Tensor]], parallel: ParallelState) -> dict[str, float]:
    """Reduce per-microbatch metrics over microbatches and DP ranks, on every pipeline stage.

    Names ending in ``_max`` take the maximum (a worst case must not be averaged away); all
    others are sums. Only the last stage has loss outputs; it tells the other stages the
    metric names first.
    """
    names = [sorted(outputs[0]) if outputs else []]
    if parallel.pp_size > 1:
        last = dist.get_global_rank(parallel.pp_group, parallel.pp_size - 1)
        dist.broadcast_object_list(names, src=last, group=parallel.pp_group)
    names = names[0]
    reduced = {}
    for is_max in (False, True):
        group = [name for name in names if name.endswith("_max") == is_max]
        if not group:
            continue
        start = -math.inf if is_max else 0.0
        values = torch.full((len(group),), start, dtype=torch.float64, device=collective_device())
        for out in outputs:
            for i, name in enumerate(group):
                value = out[name].double()
                values[i] = torch.maximum(values[i], value) if is_max else values[i] + value
        if parallel.pp_size > 1:
            dist.broadcast(values, src=last, group=parallel.pp_group)
        op = dist.ReduceOp.MAX if is_max else dist.ReduceOp.SUM
        dist.all_reduce(values, op=op, group=parallel.dp_group)
        reduced.update({name: float(values[i]) for i, name in enumerate(group)})
    return reduced


def forward_backward(
    *,
    student: TrainableStudent,
    teacher: Teacher | None,
    microbatches: Sequence[PairedMicrobatch],
    loss_fn: LossFn | StudentLoss,
    parallel: ParallelState,
    forward_only: bool = False,
    logprob_fn: LogprobFn | None = None,
    all_position_logits: bool = False,
) -> tuple[dict[str, float], int]:
    """Zero the grads and run every microbatch through one paired schedule.

    ``all_position_logits`` selects the older last-stage path (output layer at every
    position); the default applies it to the scored rows only, with the same result.
    ``teacher=None`` runs the student stream alone (GRPO without a reference, SFT).

    Returns the loss outputs summed over microbatches and DP ranks (same on every rank) and
    the global number of loss tokens. After it, each parameter's ``main_grad`` holds the
    gradient of the global token-mean loss.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in student.chunks:
        chunk.zero_grad_buffer()
    student.optimizer.zero_grad()
    forward_step = PairedForward(
        student_chunks=student.chunks,
        teacher=teacher,
        loss_fn=loss_fn,
        sequence_parallel_size=parallel.tp_size if parallel.sequence_parallel else 1,
        logprob_fn=logprob_fn,
        all_position_logits=all_position_logits,
    )
    num_chunks = len(student.chunks)
    iterators = [iter(microbatches) for _ in range(num_chunks)]
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if num_chunks > 1 else iterators[0],
        model=student.chunks if num_chunks > 1 else student.chunks[0],
        num_microbatches=len(microbatches),
        seq_length=max(mb.student_len + mb.teacher_len for mb in microbatches),
        micro_batch_size=max(mb.batch_size for mb in microbatches),
        forward_only=forward_only,
    )
    sums = _reduce_metrics(list(outputs), parallel)
    (tokens,) = dp_sum([sum(mb.num_loss_tokens for mb in microbatches)], parallel.dp_group)
    return sums, int(tokens)


def microbatches_for_expert_groups(
    build: Callable[[int], list[PairedMicrobatch]], parallel: ParallelState, min_count: int = 0
) -> list[PairedMicrobatch]:
    """``build(min_count)``, with as many microbatches on every data-parallel replica when the
    experts are dealt over ranks of several replicas (EP > 1).

    Each MoE layer's token dispatch is a collective over its expert-parallel group, whose ranks
    sit in different data-parallel replicas: they must run the same number of forwards (and
    backwards), or the first rank to finish waits for the others forever. Collective over the
    data-parallel group when EP > 1; ``build(n)`` cuts this replica's rollouts into at least n.
    """
    microbatches = build(min_count)
    if parallel.ep_size == 1:
        return microbatches
    count = torch.tensor([len(microbatches)], dtype=torch.int64, device=collective_device())
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=parallel.dp_group)
    agreed = int(count)
    return microbatches if len(microbatches) == agreed else build(agreed)


def moe_aux_loss(student: TrainableStudent, num_microbatches: int) -> float | None:
    """The student's load-balancing loss this step (None for a dense model), and reset megatron's
    tracker for the next step.

    Megatron's routers add the loss, and record it per layer, only when gradients are on, so the
    teacher stream (``torch.no_grad``) neither adds nor records one. The value is megatron's
    switch loss E * sum_i f_i P_i (without the coefficient), averaged over the MoE layers, the
    microbatches and the data-parallel replicas (megatron's own reduction over the ranks).
    """
    config = student.chunks[0].config
    if getattr(config, "num_moe_experts", None) is None:
        return None
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    tracker = get_moe_layer_wise_logging_tracker()
    if "load_balancing_loss" not in tracker:  # no student forward with gradients yet
        return 0.0
    reduce_aux_losses_tracker_across_ranks(["load_balancing_loss"])
    value = float(tracker["load_balancing_loss"]["values"].sum()) / (config.num_layers * num_microbatches)
    clear_aux_losses_tracker()
    return value


def _all_finite(student: TrainableStudent, loss_sum: float) -> bool:
    """Loss and every gradient finite, agreed over all ranks (one all-reduce)."""
    device = collective_device()
    grads = [
        p.main_grad
        for c in student.chunks
        for p in c.parameters()
        if getattr(p, "main_grad", None) is not None
    ]
    # One reduction on the device, one host sync: not one sync per parameter.
    finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
    flag = finite.to(device=device, dtype=torch.float32) * (1.0 if math.isfinite(loss_sum) else 0.0)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def _gather_params_now(student: TrainableStudent) -> None:
    """With ``overlap_param_gather`` the distributed optimizer leaves the updated parameters
    scattered until the next forward; the teacher update, the rollout refit and checkpoints
    read them right after the step, so gather them here (synchronously)."""
    for chunk in student.chunks:
        if getattr(chunk, "ddp_config", None) is not None and chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def train_step(
    *,
    student: TrainableStudent,
    teacher: Teacher | None,
    microbatches: Sequence[PairedMicrobatch],
    loss_fn: LossFn | StudentLoss,
    parallel: ParallelState,
    logprob_fn: LogprobFn | None = None,
) -> StepResult:
    """One optimizer step: paired forward/backward, clip + Adam, LR schedule, teacher update.

    A non-finite loss or gradient skips the update (weights, optimizer state, LR schedule and
    teacher stay as they were) and returns ``skipped=True``; the caller decides when to stop.
    """
    sums, num_tokens = forward_backward(
        student=student,
        teacher=teacher,
        microbatches=microbatches,
        loss_fn=loss_fn,
        parallel=parallel,
        logprob_fn=logprob_fn,
    )
    loss_sum = sums.pop("loss_sum", math.nan)
    aux = moe_aux_loss(student, len(microbatches))
    grad_norm, ok = math.nan, _all_finite(student, loss_sum)
    lr = student.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
    if ok:
        ok, grad_norm, _ = student.optimizer.step()
        _gather_params_now(student)
        if ok:
            student.scheduler.step(increment=1)
            if teacher is not None:
                teacher.after_optimizer_step()
    denominator = max(num_tokens, 1)
    return StepResult(
        loss=loss_sum / denominator,
        grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
        lr=lr,
        num_tokens=num_tokens,
        skipped=not ok,
        metrics={
            name: value if name.endswith("_max") else value / denominator for name, value in sums.items()
        }
        | ({} if aux is None else {"moe_aux_loss": aux}),
    )
