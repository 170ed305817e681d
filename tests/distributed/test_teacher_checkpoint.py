"""An EMA teacher resumes exactly, also in bfloat16 where its average lives in a float32 shadow.

Two ranks (TP2, so the shadow is saved sharded like the weights), real Megatron, real
checkpoint files: 2 steps, save, 2 more steps is the reference; new student and teacher
objects load the checkpoint and take the same 2 steps. Student, teacher weights and the float32
shadow must equal the reference bit for bit. Rebuilding the shadow from the bfloat16 teacher
weights (what checkpoints held before they saved it) loses its low bits; the test checks that
those bits exist, so it would fail without the saved shadow.
"""

from __future__ import annotations

import torch

from tests.dist_harness import run_ranks


def _config(hf_dir: str, dtype: str):
    from megaopsd.config import (
        Config,
        LossConfig,
        ModelConfig,
        ParallelConfig,
        RuntimeConfig,
        TeacherConfig,
        TrainerConfig,
    )

    # bfloat16 with megatron's non-distributed optimizer cannot save (its float32 norm weights
    # are missing from the optimizer's parameter map; validation refuses it); the distributed
    # optimizer can.
    return Config(
        model=ModelConfig(hf_path=hf_dir, dtype=dtype),
        parallel=ParallelConfig(tensor_model_parallel_size=2, use_distributed_optimizer=dtype == "bfloat16"),
        runtime=RuntimeConfig(seed=7),
        teacher=TeacherConfig(mode="ema", ema_decay=0.9),
        trainer=TrainerConfig(lr=1e-3, max_steps=100, clip_grad=1.0),
        loss=LossConfig(kind="jsd", beta=0.5),
    )


def _steps(runtime, parts, count: int) -> None:
    from tests.helpers import fixed_step

    for _ in range(count):
        assert not fixed_step(runtime, parts).skipped


def _state(student, teacher) -> dict[str, torch.Tensor]:
    from megaopsd.models import unwrap_chunk

    out = {
        f"student.{k}": v.clone()
        for k, v in unwrap_chunk(student.chunks[0]).state_dict().items()
        if v is not None
    }
    out.update({f"teacher.{k}": v.clone() for k, v in teacher.chunk(0).state_dict().items() if v is not None})
    out.update({f"shadow.{k}": v.clone() for k, v in teacher.shadows(0).items()})
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def ema_resume_worker(hf_dir: str, ckpt_dir: str, dtype: str) -> dict:
    from megaopsd.checkpoint import load_checkpoint, save_checkpoint
    from megaopsd.components import build_components
    from megaopsd.runtime import Runtime

    cfg = _config(hf_dir, dtype)
    runtime = Runtime.start(cfg.parallel, cfg.runtime)
    try:
        parts = build_components(cfg, runtime)
        student, teacher = parts.student, parts.teacher
        _steps(runtime, parts, 2)
        common = dict(student=student, teacher=teacher, parallel=runtime.parallel)
        save_checkpoint(ckpt_dir, 2, **common, trainer_state={}, keep_last=1)
        _steps(runtime, parts, 2)
        reference = _state(student, teacher)
        # The shadow's low bits: what a float32 shadow rebuilt from the bfloat16 weights loses.
        lost_bits = any(
            not torch.equal(shadow, dict(teacher.chunk(0).named_parameters())[name].float())
            for name, shadow in teacher.shadows(0).items()
        )
        parts = build_components(cfg, runtime)  # new objects, as a restarted run has
        student, teacher = parts.student, parts.teacher
        load_checkpoint(
            f"{ckpt_dir}/iter_0000002", student=student, teacher=teacher, parallel=runtime.parallel
        )
        _steps(runtime, parts, 2)
        resumed = _state(student, teacher)
        return {
            "keys": sorted(reference) == sorted(resumed),
            "shadows": sum(k.startswith("shadow.") for k in reference),
            "lost_bits": lost_bits,
            "differ": [k for k in reference if not torch.equal(reference[k], resumed[k])],
        }
    finally:
        runtime.shutdown()


def test_bfloat16_ema_teacher_resumes_bit_identically(tiny_qwen3, tmp_path):
    """(float32 EMA resume, SIGKILL and SIGTERM included: tests/e2e/test_trainer.py.)"""
    results = run_ranks(
        ema_resume_worker, world_size=2, args=(str(tiny_qwen3), str(tmp_path / "ckpt"), "bfloat16")
    )
    for rank, result in enumerate(results):
        assert result["keys"], f"rank {rank}"
        assert result["differ"] == [], f"rank {rank}: {result['differ'][:5]}"
        # Every bfloat16 weight has a shadow, and the shadows carry bits the weights lack.
        assert result["shadows"] > 0 and result["lost_bits"], f"rank {rank}: {result}"
