"""Helpers for the end-to-end tests: launch ``megaopsd.train``, read its TensorBoard events and
checkpoints. Not a test module; the shared runs built with them are in tests/e2e/conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

# The README's metrics table: every training step logs each of these.
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

# Engine and trainer score the sampled tokens with the same weights: the worst token of a step
# may differ by float32 rounding only, at step 1 and after every weight sync.
LOGPROB_MAX_DIFF = 1e-5

# The exact-resume runs: an EMA teacher that moves every step (its state must resume too), the
# distributed optimizer (its sharded Adam moments and steps must resume too).
RESUME = {
    "teacher.mode": "ema",
    "teacher.ema_decay": 0.9,
    "parallel.use_distributed_optimizer": "true",
}

# The trainer's entry point with checkpoints' RNG restore replaced by a no-op: the positive
# control that shows a resume test fails when the RNG states are not restored.
WITHOUT_RNG_RESTORE = (
    "import runpy, sys; import megaopsd.checkpoint as c; c.restore_rng_state = lambda state: None; "
    "sys.argv[0] = 'megaopsd.train'; runpy.run_module('megaopsd.train', run_name='__main__')"
)


def overrides(model: Path, out: Path, data: Path, **extra) -> list[str]:
    """The tiny recipe on ``data``, 6 steps of 8 prompts, short responses; ``extra`` on top."""
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
    """``overrides`` with the exact-resume settings (``RESUME``)."""
    return overrides(model, out, data, **{**RESUME, **extra})


def command(args: list[str], nproc: int, *, rng_restore: bool = True) -> list[str]:
    if nproc == 1:
        entry = ["-m", "megaopsd.train"] if rng_restore else ["-c", WITHOUT_RNG_RESTORE]
        return [sys.executable, *entry, *args, "parallel.pipeline_model_parallel_size=1"]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    # --standalone: a free rendezvous port, so runs of parallel test workers never share one.
    return [torchrun, "--standalone", "--nproc-per-node", str(nproc), "-m", "megaopsd.train", *args]


def run(
    args: list[str], *, nproc: int = 1, timeout: float = 600, rng_restore: bool = True
) -> subprocess.CompletedProcess:
    """One trainer launch to the end; fails the test with its output's tail unless it exits 0."""
    out = subprocess.run(
        command(args, nproc, rng_restore=rng_restore),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def kill_when(args: list[str], ready, *, timeout: float = 300, poll_s: float = 0.002, nproc: int = 1) -> None:
    """Start a run of ``nproc`` processes and SIGKILL all of them once ``ready()`` is true: its
    session, and under torchrun the workers too (the agent starts them in sessions of their
    own), workers first."""
    import psutil

    proc = subprocess.Popen(
        command(args, nproc),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before the moment to kill it"
            assert time.time() < deadline, f"not ready to kill within {timeout} s"
            time.sleep(poll_s)
    finally:
        family = psutil.Process(proc.pid).children(recursive=True)
        for child in family:
            child.send_signal(signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        psutil.wait_procs(family, timeout=30)


def assert_logprob_parity(values: dict[str, dict[int, float]], steps: range) -> None:
    """Every step's worst-token |engine - trainer| logprob difference is within rounding."""
    worst, mean = values["rollout/logprob_abs_diff_max"], values["rollout/logprob_abs_diff"]
    assert sorted(worst) == list(steps), sorted(worst)
    for step in steps:
        assert 0.0 <= mean[step] <= worst[step] <= LOGPROB_MAX_DIFF, (step, mean[step], worst[step])


def scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` from every event file of a run (later files win per step)."""
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

    # A directory of its own: checkpoints shared by both test workers (straight_run) are read by
    # two tests at once, and a file beside the checkpoint would be one worker's to delete.
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "state.pt"
        dcp_to_torch_save(str(path), str(target))
        state = torch.load(target, weights_only=False)
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


def _held_by_a_process(paths: set[Path]) -> set[Path]:
    """Which of ``paths`` a live process has open or mapped (its /proc fds and maps)."""
    names, held = {str(p): p for p in paths}, set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            targets = {line.split(maxsplit=5)[-1] for line in (proc / "maps").read_text().splitlines()}
            fds = list((proc / "fd").iterdir())
        except OSError:  # the process left, or is not ours to read
            continue
        for fd in fds:
            with contextlib.suppress(OSError):  # closed since the listing (the listing's own fd among them)
                targets.add(os.readlink(fd))
        held |= {names[t] for t in targets if t in names}
    return held


def leaked_shared_memory(before: set[Path], settle_s: float = 10.0) -> set[Path]:
    """Entries of /dev/shm that appeared since ``before`` and that no live process holds, once
    they have stayed so for ``settle_s``: a run's leaks, not the segments of a test that the
    other suite worker is running at the same time (those are held, or unlinked when it ends)."""
    deadline = time.time() + settle_s
    while True:
        new = set(Path("/dev/shm").iterdir()) - before
        unheld = new - _held_by_a_process(new)
        if not unheld or time.time() > deadline:
            return unheld
        time.sleep(0.5)
