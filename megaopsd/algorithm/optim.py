"""Student wrapping for training: Megatron DDP, the Megatron optimizer and the LR schedule.

Losses are token SUMS with ``calculate_per_token_loss``: megatron's ``finalize_model_grads``
divides the gradients by the number of loss tokens summed over all microbatches and DP ranks,
so the update is the global token mean whatever the layout or microbatch cut.
"""

from __future__ import annotations

import dataclasses

import torch

from megaopsd.config import ParallelConfig, TrainerConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainableStudent:
    """The student's DDP-wrapped chunks with their optimizer and LR scheduler."""

    chunks: list[torch.nn.Module]
    optimizer: object  # megatron.core.optimizer.MegatronOptimizer (ChainedOptimizer)
    scheduler: object  # megatron.core.optimizer_param_scheduler.OptimizerParamScheduler


def wrap_student(
    chunks: list[torch.nn.Module],
    *,
    trainer: TrainerConfig,
    parallel: ParallelConfig,
    bf16: bool = False,
) -> TrainableStudent:
    """DDP-wrap raw GPTModel chunks and build Adam + the LR schedule for them."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = chunks[0].config
    config.calculate_per_token_loss = True  # read by DDP (grad scaling) and the schedules
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=index > 0
        )
        for index, chunk in enumerate(chunks)
    ]
    for chunk in wrapped:
        chunk.broadcast_params()  # DP replicas start from identical weights
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=trainer.lr,
            min_lr=trainer.min_lr,
            weight_decay=trainer.weight_decay,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_eps=1e-8,
            clip_grad=trainer.clip_grad,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=parallel.use_distributed_optimizer,
        ),
        wrapped,
        use_gloo_process_groups=False,
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if parallel.overlap_grad_reduce:
        # The schedule holds the DP reduction back until the last microbatch and starts each
        # bucket's reduction as its gradients are ready.
        single = len(wrapped) == 1
        config.no_sync_func = wrapped[0].no_sync if single else [c.no_sync for c in wrapped]
        config.grad_sync_func = wrapped[0].start_grad_sync if single else [c.start_grad_sync for c in wrapped]
    if parallel.overlap_param_gather:
        config.param_sync_func = (
            wrapped[0].start_param_sync if len(wrapped) == 1 else [c.start_param_sync for c in wrapped]
        )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if trainer.warmup_steps else trainer.lr,
        max_lr=trainer.lr,
        min_lr=trainer.min_lr,
        lr_warmup_steps=trainer.warmup_steps,
        lr_decay_steps=trainer.max_steps,
        lr_decay_style=trainer.lr_schedule,
        start_wd=trainer.weight_decay,
        end_wd=trainer.weight_decay,
        wd_incr_steps=trainer.max_steps,
        wd_incr_style="constant",
        # On resume the config wins (a lowered lr, a longer run); the step count still comes
        # from the checkpoint. megatron's default would keep the checkpoint's values silently.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    return TrainableStudent(chunks=wrapped, optimizer=optimizer, scheduler=scheduler)
