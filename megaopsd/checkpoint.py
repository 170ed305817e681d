"""Save and resume the full training state, atomically.

A checkpoint is ``<dir>/iter_NNNNNNN/`` holding a megatron-core distributed checkpoint
(torch_dist) of the student model, its optimizer, the teacher copy (fixed / EMA) and, in
``common.pt``, the LR scheduler; plus ``trainer_state.json`` (step, data position, layout)
and ``rng/rank_XXXXX.pt`` (every RNG of every rank). The ``latest`` file names the newest
complete checkpoint.

Atomicity: everything is written into ``iter_NNNNNNN.partial``; only when all ranks are done
does rank 0 rename it and then replace ``latest`` (write-then-rename). A crash at any point
leaves ``latest`` naming a complete checkpoint; stale ``.partial`` directories are removed by
the next save.

Resume at a different TP/PP works for the model, the optimizer (non-distributed) and the
teacher through dist_checkpointing's resharding; per-rank RNG states only restore when the
layout is unchanged (otherwise the run reseeds from the config seed and says so).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megaopsd.algorithm.optim import TrainableStudent
from megaopsd.algorithm.teacher import Teacher
from megaopsd.runtime.parallel import ParallelState
from megaopsd.runtime.rng import capture_rng_state, restore_rng_state
from megaopsd.runtime.signals import stop_signals_blocked

LATEST = "latest"
STATE_FILE = "trainer_state.json"
# Optimizer sharding metadata that reshards on CPU (docs/cpu-emulation.md, "Checkpoints on CPU").
SHARDING_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
    "singleton_local_shards": False,
}


def iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def find_latest(root: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, if it exists and is complete."""
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    path = Path(root) / marker.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise RuntimeError(
            f"{marker} names {path}, which is not a complete checkpoint; remove {marker} to start over"
        )
    return path


def _sharded_state(student: TrainableStudent, teacher: Teacher | None, *, is_loading: bool) -> dict[str, Any]:
    from megaopsd.convert import model_sharded_state_dict

    # The same model layout as tools/convert_checkpoint.py, so export-hf reads trainer checkpoints.
    state: dict[str, Any] = model_sharded_state_dict(student.chunks)
    if is_loading:
        _prepare_optimizer_state(student)
    state["optimizer"] = student.optimizer.sharded_state_dict(
        state, is_loading=is_loading, metadata=SHARDING_METADATA
    )
    if teacher is not None and teacher.mode != "current":
        for index in range(len(student.chunks)):
            state[f"teacher{index}"] = teacher.chunk(index).sharded_state_dict(prefix="teacher.")
    state["scheduler"] = student.scheduler.state_dict()
    return state


def _prepare_optimizer_state(student: TrainableStudent) -> None:
    """A fresh torch Adam has no state yet; the sharded load needs tensors to load into."""
    for optimizer in getattr(student.optimizer, "chained_optimizers", [student.optimizer]):
        inner = optimizer.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                    }


@contextlib.contextmanager
def _distributed_optimizer_load_fixes(student: TrainableStudent):
    """Loading distributed-optimizer state into torch Adam (no TE / Apex) needs two repairs.

    megatron-core 0.16.1 copies every key of the inner optimizer's per-parameter state from the
    checkpoint's sharded tensors, but those carry no ``step`` (KeyError): supply the parameter's
    own. And its ``load_state_dict`` hands all parameters ONE shared ``step`` tensor, which torch
    Adam then increments once per parameter per step, silently changing the bias correction:
    give every parameter its own copy afterwards. (The third trap, a fresh Adam without state,
    is ``_prepare_optimizer_state``.) See docs/cpu-emulation.md, S11.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original
    for optimizer in getattr(student.optimizer, "chained_optimizers", [student.optimizer]):
        for state in optimizer.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()


def _layout(parallel: ParallelState) -> dict[str, int]:
    return {
        "tp": parallel.tp_size,
        "pp": parallel.pp_size,
        "dp": parallel.dp_size,
        "vpp": parallel.vpp_size or 1,
    }


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    student: TrainableStudent,
    teacher: Teacher | None,
    parallel: ParallelState,
    trainer_state: dict[str, Any],
    keep_last: int,
    side_files: Callable[[Path], Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and point ``latest`` at it (collective call).

    ``side_files(dir)`` runs on rank 0 before the rename, e.g. to copy the model's HF config and
    tokenizer in so that ``tools/convert_checkpoint.py export-hf`` reads the checkpoint as is.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    rank = dist.get_rank()
    final = iteration_dir(root, step)
    partial = final.with_name(final.name + ".partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    # torch_dist saving starts a Manager process on first use: it must survive a preemption
    # notice, or the checkpoint that the notice asks for fails (megaopsd.runtime.signals).
    with stop_signals_blocked():
        dist_checkpointing.save(
            _sharded_state(student, teacher, is_loading=False),
            str(partial),
            sharded_strategy=get_default_save_sharded_strategy("torch_dist"),
        )
    (partial / "rng").mkdir(exist_ok=True)
    torch.save(capture_rng_state(), partial / "rng" / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        if side_files is not None:
            side_files(partial)
        body = {
            "step": step,
            "layout": _layout(parallel),
            "world_size": dist.get_world_size(),
            **trainer_state,
        }
        _write_atomic(partial / STATE_FILE, json.dumps(body, indent=2))
        if final.exists():  # a re-save of the same step (from an abandoned future)
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(Path(root))
        _write_atomic(Path(root) / LATEST, final.name)
        _fsync_dir(Path(root))
        _prune(Path(root), keep_last, step)
    dist.barrier()
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int, current: int) -> None:
    """Keep the newest ``keep_last`` checkpoints up to ``current``; drop the rest and leftovers.

    Checkpoints after ``current`` belong to an abandoned future (a crash before ``latest`` moved,
    then a resume from an older one); keeping them by name could delete the one ``latest`` names.
    """
    steps = sorted(int(p.name[5:]) for p in root.glob("iter_???????") if p.is_dir())
    kept = [s for s in steps if s <= current][-keep_last:]
    for step in steps:
        if step not in kept:
            shutil.rmtree(iteration_dir(root, step), ignore_errors=True)
    for stale in root.glob("iter_???????.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(
    path: str | Path,
    *,
    student: TrainableStudent,
    teacher: Teacher | None,
    parallel: ParallelState,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, teacher and RNG from ``path``; return trainer state."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    from megaopsd.convert.dist_ckpt import load_model_state

    loaded = dist_checkpointing.load(_sharded_state(student, teacher, is_loading=True), str(path))
    load_model_state(student.chunks, loaded)
    with _distributed_optimizer_load_fixes(student):
        student.optimizer.load_state_dict(loaded["optimizer"])
    student.scheduler.load_state_dict(loaded["scheduler"])
    if teacher is not None and teacher.mode != "current":
        for index in range(len(student.chunks)):
            teacher.load_chunk_state(index, loaded[f"teacher{index}"])
    body = json.loads((path / STATE_FILE).read_text())
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if (
        body["layout"] == _layout(parallel)
        and body["world_size"] == dist.get_world_size()
        and rng_file.is_file()
    ):
        restore_rng_state(torch.load(rng_file, weights_only=False))
        body["rng_restored"] = True
    else:
        body["rng_restored"] = False
    return body
