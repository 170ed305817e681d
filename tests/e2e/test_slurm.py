"""slurm/train.sbatch against a real Slurm controller on localhost (slurm/local/cluster.sh).

The cluster (munged, slurmctld, slurmd) starts once for this module and is stopped by PID at
the end. The preempted job's reference is the session's ``pp2_run`` (the same recipe launched by
torchrun, tests/e2e/conftest.py). CI installs the Debian packages first (`slurm/local/cluster.sh install` in .ci/run).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.dist_harness import free_port
from tests.e2e.conftest import PP2_STEPS as STEPS
from tests.e2e.runs import assert_identical, scalars

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "slurm" / "local" / "cluster.sh"
CPU_JOB = [
    "--nodes=1",
    "--ntasks=2",
    "--ntasks-per-node=2",
    "--cpus-per-task=1",
    "--gpus-per-node=0",
    "--time=00:15:00",
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if shutil.which("slurmctld") is None:
        pytest.fail("Slurm is not installed; run `slurm/local/cluster.sh install` (as root) first")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port())}
    started = subprocess.run(
        ["bash", str(CLUSTER), "start", str(state)], env=env, capture_output=True, text=True, timeout=120
    )
    assert started.returncode == 0, started.stdout + started.stderr
    env["SLURM_CONF"] = str(state / "etc" / "slurm.conf")
    yield env, state
    subprocess.run(["bash", str(CLUSTER), "stop", str(state)], env=env, timeout=60)


def submit(env, state, args: list[str], *, extra: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", f"--output={state}/job-%j.out", *args],
        cwd=REPO,
        env={**env, **(extra or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_field(env, job: str, field: str) -> str:
    text = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", text)
    return match.group(1) if match else ""


def wait_done(env, job: str, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_field(env, job, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not finish in {timeout} s")


def train_args(model: Path, data: Path) -> list[str]:
    """``pp2_run``'s settings (tests/e2e/conftest.py), checkpointing every 2 steps."""
    return [
        "slurm/train.sbatch",
        "recipe=tiny_cpu",
        f"model.hf_path={model}",
        f"data.train_files=[{data}]",
        f"trainer.max_steps={STEPS}",
        "checkpoint.save_interval=2",
        "rollout.max_new_tokens=24",
    ]


def test_preempted_job_saves_requeues_resumes_and_matches(slurm, pp2_run, tmp_path):
    """The tiny recipe as a 2-task job (srun tasks, no torchrun: a colocated vLLM engine in each
    trainer process), preempted by USR1 after its first checkpoint: it saves, requeues itself,
    resumes and ends bit-identical to the same run launched by torchrun (the session's
    ``pp2_run``, `make demo`, with the same model, prompts and steps)."""
    env, state = slurm
    job = submit(
        env,
        state,
        [*CPU_JOB, "--job-name=preempted", *train_args(pp2_run.model, pp2_run.data)],
        extra={"OUTPUT_ROOT": str(tmp_path)},
    )
    log = state / f"job-{job}.out"
    deadline = time.time() + 300
    # Trigger on the step-2 checkpoint, not on the job log: slurmstepd may write the log late.
    latest = tmp_path / f"preempted-{job}" / "checkpoints" / "latest"
    while time.time() < deadline and not latest.is_file():
        time.sleep(0.1)
    assert latest.is_file(), log.read_text()[-3000:] if log.is_file() else "no job output"
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True, timeout=30)
    assert wait_done(env, job) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert "on 1 node(s), 2 tasks" in text
    assert "requeueing job" in text and "(restart 1)" in text and "resumed from" in text
    assert job_field(env, job, "Restarts") == "1"
    run_dir = tmp_path / f"preempted-{job}"
    stopped = re.search(r"stopping after step (\d+)", text)
    assert stopped and 2 <= int(stopped.group(1)) < STEPS, text[-3000:]
    values = scalars(run_dir / "tensorboard")
    assert sorted(values["train/loss"]) == list(range(1, STEPS + 1))
    assert values["rollout/engines"][1] == 2 and values["rollout/logprob_abs_diff_max"][STEPS] <= 1e-5
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{STEPS:07d}"
    assert_identical(
        pp2_run.out / "checkpoints" / f"iter_{STEPS:07d}", run_dir / "checkpoints" / f"iter_{STEPS:07d}"
    )


def test_impossible_request_fails_at_submission(slurm):
    env, _ = slurm
    start = time.time()
    out = subprocess.run(
        [
            "sbatch",
            "--ntasks=64",
            "--cpus-per-task=1",
            "--gpus-per-node=0",
            "slurm/train.sbatch",
            "recipe=tiny_cpu",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and time.time() - start < 30
    assert "More processors requested than permitted" in out.stderr or "not available" in out.stderr, (
        out.stderr
    )


def test_script_rejects_missing_settings(slurm, tmp_path):
    env, state = slurm
    outside = subprocess.run(
        ["bash", "slurm/train.sbatch", "recipe=tiny_cpu"],
        cwd=REPO,
        env={k: v for k, v in env.items() if not k.startswith("SLURM_JOB")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert outside.returncode == 2 and "not inside a Slurm job" in outside.stderr
    job = submit(
        env,
        state,
        [
            "--ntasks=1",
            "--ntasks-per-node=1",
            "--cpus-per-task=1",
            "--gpus-per-node=0",
            "slurm/train.sbatch",
            "trainer.max_steps=1",
        ],
    )
    assert wait_done(env, job, timeout=120) == "FAILED"
    assert "no recipe given; append recipe=NAME" in (state / f"job-{job}.out").read_text()
    job = submit(
        env,
        state,
        [
            "--ntasks=1",
            "--ntasks-per-node=1",
            "--cpus-per-task=1",
            "--gpus-per-node=0",
            "slurm/train.sbatch",
            "recipe=tiny_cpu",
        ],
        extra={"MEGAOPSD_PYTHON": str(tmp_path / "missing" / "python")},
    )
    assert wait_done(env, job, timeout=120) == "FAILED"
    assert "no python at MEGAOPSD_PYTHON" in (state / f"job-{job}.out").read_text()


def test_the_argument_checks_read_every_argument_without_a_pipe(tmp_path):
    """The script's own checks, run by bash outside Slurm (a job id in the environment is all
    they need): a recipe first, then thousands of overrides, then a forbidden output_dir. The
    old check (``printf | grep -q`` under pipefail) lost printf to SIGPIPE when grep left at the
    first match, reported "no recipe given" at random, and once failed a requeued job's restart."""
    args = ["recipe=tiny_cpu", *(f"+filler{i}=1" for i in range(5000)), f"output_dir={tmp_path}"]
    env = {**os.environ, "SLURM_JOB_ID": "7", "MEGAOPSD_DIR": str(REPO)}
    for _ in range(3):
        out = subprocess.run(
            ["bash", str(REPO / "slurm" / "train.sbatch"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2 and "do not set output_dir" in out.stderr, out.stderr[-500:]
