"""An EMA teacher resumes exactly, also in bfloat16 where its average lives in a float32 shadow.

Two ranks (TP2, so the shadow is saved sharded like the weights), real Megatron, real
checkpoint files: 2 steps, save, 2 more steps is the reference; new student and teacher
objects load the checkpoint and take the same 2 steps. Student, teacher weights and the float32
shadow must equal the reference bit for bit. Rebuilding the shadow from the bfloat16 teacher
weights (what checkpoints held before they saved it) loses its low bits; the test checks that
those bits exist, so it would fail without the saved shadow.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_ranks

pytestmark = pytest.mark.distributed


def _components(hf_dir: str, runtime, par_cfg, dtype: str):
    from megaopsd.algorithm.loss import make_loss_fn
    from megaopsd.algorithm.optim import wrap_student
    from megaopsd.algorithm.teacher import make_teacher
    from megaopsd.config import LossConfig, ModelConfig, TeacherConfig, TrainerConfig
    from megaopsd.convert import load_hf_weights
    from megaopsd.models import build_model_chunks, load_hf_config

    spec = load_hf_config(hf_dir)
    model_cfg = ModelConfig(hf_path=hf_dir, dtype=dtype)

    def build():
        return build_model_chunks(spec, model_cfg, runtime.parallel)

    chunks = build()
    load_hf_weights(chunks, spec, hf_dir, runtime.parallel)
    teacher = make_teacher(TeacherConfig(mode="ema", ema_decay=0.9), chunks, build)
    student = wrap_student(
        chunks,
        trainer=TrainerConfig(lr=1e-3, max_steps=100, clip_grad=1.0),
        parallel=par_cfg,
        bf16=dtype == "bfloat16",
    )
    loss_fn = make_loss_fn(
        LossConfig(kind="jsd", beta=0.5), vocab_size=spec.vocab_size, tp_group=runtime.parallel.tp_group
    )
    return student, teacher, loss_fn


def _steps(runtime, student, teacher, loss_fn, count: int) -> None:
    from megaopsd.algorithm.step import train_step
    from tests.distributed.test_paired_schedule import BUDGET_FOUR, _my_microbatches

    for _ in range(count):
        result = train_step(
            student=student,
            teacher=teacher,
            microbatches=_my_microbatches(runtime, BUDGET_FOUR),
            loss_fn=loss_fn,
            parallel=runtime.parallel,
        )
        assert not result.skipped


def _state(student, teacher) -> dict[str, torch.Tensor]:
    from megaopsd.algorithm.teacher import unwrap

    out = {
        f"student.{k}": v.clone() for k, v in unwrap(student.chunks[0]).state_dict().items() if v is not None
    }
    out.update({f"teacher.{k}": v.clone() for k, v in teacher.chunk(0).state_dict().items() if v is not None})
    out.update({f"shadow.{k}": v.clone() for k, v in teacher.shadows(0).items()})
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def ema_resume_worker(hf_dir: str, ckpt_dir: str, dtype: str) -> dict:
    from megaopsd.checkpoint import load_checkpoint, save_checkpoint
    from megaopsd.config import ParallelConfig, RuntimeConfig
    from megaopsd.runtime import Runtime

    # bfloat16 with megatron's non-distributed optimizer cannot save (its float32 norm weights
    # are missing from the optimizer's parameter map); the distributed optimizer can.
    par_cfg = ParallelConfig(tensor_model_parallel_size=2, use_distributed_optimizer=dtype == "bfloat16")
    runtime = Runtime.start(par_cfg, RuntimeConfig(seed=7))
    try:
        student, teacher, loss_fn = _components(hf_dir, runtime, par_cfg, dtype)
        _steps(runtime, student, teacher, loss_fn, 2)
        common = dict(student=student, teacher=teacher, parallel=runtime.parallel)
        save_checkpoint(ckpt_dir, 2, **common, trainer_state={}, keep_last=1)
        _steps(runtime, student, teacher, loss_fn, 2)
        reference = _state(student, teacher)
        # The shadow's low bits: what a float32 shadow rebuilt from the bfloat16 weights loses.
        lost_bits = any(
            not torch.equal(shadow, dict(teacher.chunk(0).named_parameters())[name].float())
            for name, shadow in teacher.shadows(0).items()
        )
        student, teacher, loss_fn = _components(hf_dir, runtime, par_cfg, dtype)
        load_checkpoint(
            f"{ckpt_dir}/iter_0000002", student=student, teacher=teacher, parallel=runtime.parallel
        )
        _steps(runtime, student, teacher, loss_fn, 2)
        resumed = _state(student, teacher)
        return {
            "keys": sorted(reference) == sorted(resumed),
            "shadows": sum(k.startswith("shadow.") for k in reference),
            "lost_bits": lost_bits,
            "differ": [k for k in reference if not torch.equal(reference[k], resumed[k])],
        }
    finally:
        runtime.shutdown()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_ema_teacher_resumes_bit_identically(tiny_qwen3, tmp_path, dtype):
    results = run_ranks(
        ema_resume_worker, world_size=2, args=(str(tiny_qwen3), str(tmp_path / "ckpt"), dtype)
    )
    for rank, result in enumerate(results):
        assert result["keys"], f"rank {rank}"
        assert result["differ"] == [], f"rank {rank}: {result['differ'][:5]}"
        if dtype == "bfloat16":
            # Every bfloat16 weight has a shadow, and the shadows carry bits the weights lack.
            assert result["shadows"] > 0 and result["lost_bits"], f"rank {rank}: {result}"
        else:
            assert result["shadows"] == 0, f"rank {rank}: float32 averages live in the module"
