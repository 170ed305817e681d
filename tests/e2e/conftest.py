"""The end-to-end runs that several test modules read: each is launched once per session, by
whichever pytest-xdist worker needs it first (``made_once`` in tests/conftest.py).

- ``pp2_run``: ``make demo`` (the README's command: a tiny model, 2 processes, PP2, a colocated
  vLLM engine in each, checkpoints, the Hugging Face export) on the 8 fixed prompts for 10
  steps. tests/e2e/test_demo.py checks what the demo promises, tests/e2e/test_trainer.py the
  tags, logprob parity, learning and a resume at TP1, tests/e2e/test_slurm.py compares a
  preempted Slurm job against its final checkpoint.
- ``straight_run``: 6 uninterrupted single-process steps with an EMA teacher, attention dropout
  (an RNG consumer in every step) and the distributed optimizer, a checkpoint after every step:
  the reference of every exact-resume and checkpoint-damage test.

A test that only reads one of these must not write into it: copy what it damages.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from tests.conftest import made_once
from tests.e2e.runs import REPO, resume_overrides, run

PP2_STEPS = 10
STRAIGHT_STEPS = 6


@dataclasses.dataclass(frozen=True)
class Pp2Run:
    out: Path  # output_dir: tensorboard/, checkpoints/, hydra/, hf/ (the export)
    model: Path  # the tiny Qwen3 that `make demo` made
    data: Path  # the 8 fixed prompts
    stdout: str  # what `make demo` printed


@pytest.fixture(scope="session")
def pp2_run(fixed_prompts, tmp_path_factory) -> Pp2Run:
    def make(root: Path) -> None:
        settings = {
            "data.train_files": f"[{fixed_prompts}]",
            "trainer.max_steps": PP2_STEPS,
            "checkpoint.save_interval": 4,
            "rollout.max_new_tokens": 24,
        }
        demo_overrides = " ".join(f"{k}={v}" for k, v in settings.items())
        done = subprocess.run(
            [
                *("make", "demo", f"DEMO={root / 'demo'}", f"TINY={root / 'tiny-qwen3'}"),
                f"DEMO_OVERRIDES={demo_overrides}",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (root / "stdout.txt").write_text(done.stdout)

    root = made_once(tmp_path_factory, "pp2_run", make)
    return Pp2Run(
        out=root / "demo",
        model=root / "tiny-qwen3",
        data=fixed_prompts,
        stdout=(root / "stdout.txt").read_text(),
    )


@pytest.fixture(scope="session")
def straight_run(tiny_qwen3_dropout, fixed_prompts, tmp_path_factory) -> Path:
    def make(out: Path) -> None:
        every_step = {"checkpoint.save_interval": 1, "checkpoint.keep_last": STRAIGHT_STEPS}
        run(resume_overrides(tiny_qwen3_dropout, out, fixed_prompts, **every_step), nproc=1)
        assert (out / "checkpoints" / "latest").read_text().strip() == f"iter_{STRAIGHT_STEPS:07d}"

    return made_once(tmp_path_factory, "straight_run", make)
