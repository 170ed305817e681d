"""When the trainer saves, resumes and stops: the bookkeeping around ``megaopsd.checkpoint``.

``megaopsd.checkpoint`` knows how to write and read one checkpoint; this module knows *when*:
resume from the newest complete checkpoint at start, save every ``save_interval`` steps and at the last step,
and on a stop signal agree across ranks on the step boundary and save that step unless it is
already on disk. The trainer decides *what* goes into ``trainer_state`` (data position, counters).

    checkpoints = CheckpointManager(cfg, runtime, student=..., teacher=...)
    state = checkpoints.resume()          # None on a fresh start
    ...
    if checkpoints.should_save(step):
        checkpoints.save(step, trainer_state)
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megaopsd.algorithm.optim import TrainableStudent
from megaopsd.algorithm.teacher import Teacher
from megaopsd.checkpoint import resume_latest, save_checkpoint
from megaopsd.config import Config
from megaopsd.convert import copy_side_files
from megaopsd.models.lora import base_fingerprint
from megaopsd.runtime.distributed import collective_device
from megaopsd.runtime.parallel import Runtime
from megaopsd.runtime.signals import StopRequest


class CheckpointManager:
    """Resume, periodic saves and the agreed stop of one run (every call is collective)."""

    def __init__(self, cfg: Config, runtime: Runtime, *, student: TrainableStudent, teacher: Teacher | None):
        self.cfg, self.runtime = cfg.checkpoint, runtime
        self.max_steps = cfg.trainer.max_steps
        self.hf_path = cfg.model.hf_path
        self.student, self.teacher = student, teacher
        self.saved_step: int | None = None  # the newest step known to be on disk
        # LoRA checkpoints hold adapters only: the base they were trained on is checked on resume.
        self.base_fingerprint = None
        self.lora_state: dict[str, Any] = {}
        if cfg.lora.enabled:
            self.base_fingerprint = base_fingerprint(cfg.model.hf_path)
            # What export-hf needs to rebuild the model: the adapters' settings and the base.
            self.lora_state = {
                "base_fingerprint": self.base_fingerprint,
                "base_model": str(Path(cfg.model.hf_path).resolve()),
                "lora": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg.lora).items()},
            }

    def resume(self) -> dict[str, Any] | None:
        """Load the newest complete checkpoint when resuming is on; its trainer state, else None.

        Damaged checkpoints are passed over with a warning (``megaopsd.checkpoint.resume_latest``).

        Raises:
            CheckpointError: checkpoints exist but none can be read (one line: path and fix).
        """
        root = self.cfg.dir
        if not (self.cfg.resume and Path(root).is_dir()):
            return None
        found = resume_latest(
            root,
            student=self.student,
            teacher=self.teacher,
            parallel=self.runtime.parallel,
            say=self._say,
            base_fingerprint=self.base_fingerprint,
        )
        if found is None:
            return None
        path, state = found
        self.saved_step = state["step"]  # the resumed step is on disk
        self._say(f"resumed from {path} at step {state['step']}; RNG {state['rng_note']}")
        return state

    def should_save(self, step: int) -> bool:
        """Every ``save_interval`` steps and at the last step."""
        return step % self.cfg.save_interval == 0 or step == self.max_steps

    def save(self, step: int, trainer_state: dict[str, Any]) -> None:
        """Write checkpoint ``step`` (model, optimizer, teacher, RNG, ``trainer_state``)."""

        path = save_checkpoint(
            self.cfg.dir,
            step,
            student=self.student,
            teacher=self.teacher,
            parallel=self.runtime.parallel,
            trainer_state={**trainer_state, **self.lora_state},
            keep_last=self.cfg.keep_last,
            side_files=functools.partial(copy_side_files, self.hf_path),
        )
        self.saved_step = step
        self._say(f"saved {path}")

    def save_before_stop(self, step: int, trainer_state: dict[str, Any]) -> None:
        """Save ``step`` unless nothing ran yet or it is already on disk."""
        if step > 0 and self.saved_step != step:
            self.save(step, trainer_state)

    def stop_agreed(self, stop: StopRequest) -> bool:
        """Any rank that got a signal stops every rank at the same step boundary."""
        flag = torch.tensor(float(stop.signum or 0), device=collective_device())
        if self.runtime.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag > 0:
            stop.signum = int(flag)
        return bool(flag > 0)

    def _say(self, message: str) -> None:
        if self.runtime.is_main:
            print(f"[megaopsd] {message}", flush=True)
