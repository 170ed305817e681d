"""Shared test fixtures that are not pytest fixtures: fixed rollouts and the paired-step setup.

Workers started by ``tests.dist_harness.run_ranks`` import these (pytest fixtures do not reach
the worker processes).
"""

from __future__ import annotations

import dataclasses
import random

import torch

BUDGET_ONE = 10**6  # one microbatch per step
BUDGET_FOUR = 170  # cuts the 8 fixed rollouts into several microbatches


@dataclasses.dataclass
class FixedRollout:
    student_prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    response_ids: list[int]


def fixed_rollouts(vocab: int = 549, count: int = 8) -> list[FixedRollout]:
    """Deterministic rollouts of mixed lengths; rollout 3's teacher prompt is shorter on purpose."""
    rng = random.Random(1234)
    out = []
    for i in range(count):
        student = [rng.randrange(vocab) for _ in range(rng.randint(5, 14))]
        # The teacher prompt holds the student's plus a "solution"; one is shorter on purpose.
        extra = [rng.randrange(vocab) for _ in range(rng.randint(0, 12) if i != 3 else 0)]
        teacher = student[:2] + extra + student[2:] if i != 3 else student[:3]
        response = [rng.randrange(vocab) for _ in range(rng.randint(2, 9))]
        out.append(FixedRollout(student, teacher, response))
    return out


def paired_setup(
    hf_dir: str,
    tp: int,
    pp: int,
    *,
    sp: bool = False,
    vpp: int | None = None,
    stages: tuple[int | None, int | None] = (None, None),
    mode: str = "fixed",
    decay: float = 0.9,
    lr: float = 1e-3,
    lora: dict | None = None,
    checkpoint_dir: str = "outputs/checkpoints",
    with_config: bool = False,
    algorithm: str = "opsd",
    parallel: dict | None = None,
    model: dict | None = None,
):
    """Start the runtime and build the components for the tiny model: JSD(0.5) at temperature 1.1.

    ``algorithm="grpo"`` uses clip 0.2/0.28 and a k3 KL (0.05) to the frozen reference;
    ``"sft"`` the cross-entropy. ``stages``: layers on the first / last pipeline stage (uneven
    stages), None for an even split. ``parallel``, ``model``: further ``ParallelConfig`` and
    ``ModelConfig`` fields.

    Returns ``(runtime, components)``, or ``(runtime, components, config)`` with ``with_config``.
    """
    from megaopsd.components import build_components
    from megaopsd.config import (
        AlgorithmConfig,
        CheckpointConfig,
        Config,
        LoraConfig,
        LossConfig,
        ModelConfig,
        ParallelConfig,
        RuntimeConfig,
        TeacherConfig,
        TrainerConfig,
    )
    from megaopsd.runtime import Runtime

    cfg = Config(
        model=ModelConfig(hf_path=hf_dir, **(model or {})),
        parallel=ParallelConfig(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
            sequence_parallel=sp,
            num_layers_in_first_pipeline_stage=stages[0],
            num_layers_in_last_pipeline_stage=stages[1],
            **(parallel or {}),
        ),
        runtime=RuntimeConfig(seed=7),
        teacher=TeacherConfig(mode=mode, ema_decay=decay),
        trainer=TrainerConfig(lr=lr, max_steps=100, clip_grad=1.0),
        loss=LossConfig(kind="jsd", beta=0.5, temperature=1.1),
        lora=LoraConfig(**(lora or {})),
        checkpoint=CheckpointConfig(dir=checkpoint_dir),
        algorithm=AlgorithmConfig(name=algorithm, kl_coef=0.05 if algorithm == "grpo" else 0.0),
    )
    runtime = Runtime.start(cfg.parallel, cfg.runtime)
    parts = build_components(cfg, runtime)
    return (runtime, parts, cfg) if with_config else (runtime, parts)


@dataclasses.dataclass
class GrpoRollout(FixedRollout):
    engine_logprobs: list[float]
    advantage: float


def grpo_rollouts() -> list[GrpoRollout]:
    """``fixed_rollouts`` as GRPO sees them: the reference scores the student prompt; engine
    logprobs near the tiny model's (about -log 549) so that some ratios leave [0.8, 1.28]."""
    rng = random.Random(99)
    out = []
    for i, r in enumerate(fixed_rollouts()):
        engine = [-6.3 + rng.uniform(-0.6, 0.6) for _ in r.response_ids]
        out.append(
            GrpoRollout(
                r.student_prompt_ids, list(r.student_prompt_ids), r.response_ids, engine, (-1) ** i * 0.75
            )
        )
    return out


def my_microbatches(runtime, budget: int, algorithm: str = "opsd"):
    """This data-parallel replica's share of the fixed rollouts cut at ``budget`` tokens."""
    from megaopsd.algorithm.batch import build_microbatches, microbatch_count_rule

    par = runtime.parallel
    rollouts = grpo_rollouts() if algorithm == "grpo" else fixed_rollouts()
    mine = rollouts[par.dp_rank :: par.dp_size]
    pad = par.tp_size if par.sequence_parallel else 1
    multiple, minimum = microbatch_count_rule(par.pp_size, par.vpp_size)  # the interleaved schedule's
    return build_microbatches(
        mine,
        max_tokens=budget,
        pad_id=0,
        pad_multiple=pad,
        count_multiple=multiple,
        min_count=minimum,
        student_only=algorithm == "sft",
        advantages=[r.advantage for r in mine] if algorithm == "grpo" else None,
    )


def fixed_step(runtime, parts, budget: int = BUDGET_FOUR):
    """One optimizer step of ``parts`` on this replica's share of the fixed rollouts (a StepResult)."""
    from megaopsd.algorithm.step import train_step

    return train_step(
        student=parts.student,
        teacher=parts.teacher,
        microbatches=my_microbatches(runtime, budget),
        loss_fn=parts.loss_fn,
        parallel=runtime.parallel,
    )


def export_full(chunks, spec, runtime, *, grads: bool) -> dict[str, torch.Tensor] | None:
    """HF-named full tensors on rank 0: the weights, or (grads=True) each param's main_grad."""
    from megaopsd.convert import export_hf_weights
    from megaopsd.models import unwrap_chunk

    modules = [unwrap_chunk(c) for c in chunks]
    if grads:
        with torch.no_grad():
            for module in modules:
                for param in module.parameters():
                    param.copy_(param.main_grad)
    out = {name: t.clone() for name, t in export_hf_weights(modules, spec, runtime.parallel)}
    return out if torch.distributed.get_rank() == 0 else None
