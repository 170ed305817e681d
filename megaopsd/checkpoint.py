"""Save and resume the full training state, atomically.

A checkpoint is ``<dir>/iter_NNNNNNN/`` holding a megatron-core distributed checkpoint
(torch_dist) of the student model, its optimizer, the teacher copy (fixed / EMA, with the EMA's
float32 average when the model is not float32) and, in
``common.pt``, the LR scheduler; plus ``trainer_state.json`` (step, data position, layout)
``rng/rank_XXXXX.safetensors`` (every RNG of every rank, as tensors and plain numbers) and
``manifest.json`` (every file with its size, written last). The ``latest`` file names the
newest complete checkpoint.

Atomicity: everything is written into ``iter_NNNNNNN.partial``; only when all ranks are done
does rank 0 rename it and then replace ``latest`` (write-then-rename). A crash at any point
leaves ``latest`` naming a complete checkpoint; stale ``.partial`` directories are removed by
the next save.

Hostile or damaged checkpoints: nothing is unpickled (``megaopsd.convert.safe_load`` reads
dist-checkpointing's pickles through allow-lists; RNG files are safetensors). ``find_resumable``
verifies a checkpoint against its manifest before trusting it; a damaged one (a truncated or
missing file, a ``latest`` that names a missing or partial directory or holds garbage) is passed
over for the newest complete one, with a warning naming both. ``resume_latest`` also falls back
when a checkpoint that looked complete fails to load, and raises ``CheckpointError`` (one line:
the path and the fix) when nothing is usable.

Resume at a different TP/PP works for the model, the optimizer (non-distributed) and the
teacher through dist_checkpointing's resharding; per-rank RNG states only restore when the
layout is unchanged (otherwise the run reseeds from the config seed and says so).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megaopsd.algorithm.optim import TrainableStudent
from megaopsd.algorithm.teacher import AdapterEmaTeacher, EmaTeacher, Teacher
from megaopsd.convert import model_sharded_state_dict
from megaopsd.convert.dist_ckpt import in_process_write_results, load_model_state, model_state_key
from megaopsd.convert.safe_load import load_dist_checkpoint
from megaopsd.models.builder import unwrap_chunk
from megaopsd.models.lora import adapters_of
from megaopsd.runtime.parallel import ParallelState
from megaopsd.runtime.rng import capture_rng_state, load_rng_file, restore_rng_state, save_rng_file
from megaopsd.runtime.signals import stop_signals_blocked

LATEST = "latest"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2  # 2: manifest + safetensors RNG files; 1 (no field): pickled RNG, no manifest
# Files every torch_dist checkpoint of ours has: dist-checkpointing's metadata and our state.
REQUIRED_FILES = ("metadata.json", ".metadata", "common.pt", STATE_FILE)
_ITER_NAME = re.compile(r"iter_(\d{7})")
# Optimizer sharding metadata that reshards on CPU (docs/cpu-emulation.md, "Checkpoints on CPU").
SHARDING_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
    "singleton_local_shards": False,
}


class CheckpointError(RuntimeError):
    """No checkpoint can be resumed from; the message is one line naming the path and the fix."""


def iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def rng_file(path: Path, rank: int) -> Path:
    return path / "rng" / f"rank_{rank:05d}.safetensors"


def verify_checkpoint(path: str | Path) -> str | None:
    """Why ``path`` is not a complete checkpoint (a short phrase), or None when it is.

    Complete: ``trainer_state.json`` readable and naming this step, and every file the manifest
    lists present with its recorded size (for checkpoints from before manifests: the required
    files present and not empty).
    """
    path = Path(path)
    if not path.is_dir():
        return "missing"
    try:
        state = json.loads((path / STATE_FILE).read_text())
        step_ok = isinstance(state, dict) and state.get("step") == int(path.name[5:])
    except (OSError, ValueError):
        return f"{STATE_FILE} is missing or unreadable"
    if not step_ok:
        return f"{STATE_FILE} names another step"
    if state.get("format_version", 1) < FORMAT_VERSION:
        empty = [n for n in REQUIRED_FILES if not (path / n).is_file() or (path / n).stat().st_size == 0]
        return f"{empty[0]} is missing or empty" if empty else None
    try:
        files = json.loads((path / MANIFEST_FILE).read_text())["files"]
        listed = {str(name): int(size) for name, size in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST_FILE} is missing or unreadable"
    for name in REQUIRED_FILES[:-1]:
        if name not in listed:
            return f"{MANIFEST_FILE} lists no {name}"
    for name, size in listed.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} when saved"
    return None


def _read_latest(root: Path) -> tuple[int | None, str | None]:
    """The step ``latest`` names, or None and why it names none (None, None: no file)."""
    marker = root / LATEST
    if not marker.is_file():
        return None, None if not marker.exists() else f"{marker} is not a file"
    raw = marker.read_bytes()[:200]
    match = _ITER_NAME.fullmatch(raw.decode("utf-8", "replace").strip())
    if match is None:
        return None, f"{marker} holds {raw[:40]!r}, not a checkpoint name"
    return int(match.group(1)), None


def find_resumable(root: str | Path) -> tuple[list[Path], list[str]]:
    """The complete checkpoints to try, best first, and warnings about damaged ones.

    ``latest`` is trusted when it names a complete checkpoint; a damaged one it names is passed
    over for the newest complete one before it. A missing or garbled ``latest`` (with checkpoints
    present) falls back to the newest complete checkpoint. Newer directories than the one
    ``latest`` names belong to an abandoned future and are ignored.

    Raises:
        CheckpointError: checkpoints exist but none is complete.
    """
    root = Path(root)
    steps = sorted((int(p.name[5:]) for p in root.glob("iter_???????") if p.is_dir()), reverse=True)
    named, problem = _read_latest(root)
    if named is None and problem is None and not steps:
        return [], []  # a fresh start
    warnings = [f"{problem}; looking for the newest complete checkpoint"] if problem else []
    if named is None and problem is None:
        warnings.append(f"no {root / LATEST}; looking for the newest complete checkpoint")
    damaged: list[str] = []
    complete: list[Path] = []
    for step in [named] if named is not None and named not in steps else []:
        damaged.append(f"{iteration_dir(root, step).name} (named by latest) is missing")
    for step in steps:
        if named is not None and step > named:
            continue
        why = verify_checkpoint(iteration_dir(root, step))
        if why is None:
            complete.append(iteration_dir(root, step))
        elif not complete:
            damaged.append(f"{iteration_dir(root, step).name}: {why}")
    if not complete:
        raise CheckpointError(
            f"{root}: no complete checkpoint to resume from ({'; '.join(damaged) or 'none found'}); "
            "move the damaged iter_* directories and latest away to start over, or set checkpoint.resume=false"
        )
    if damaged:
        warnings.append(f"damaged checkpoint {damaged[0]}; resuming from {complete[0].name} instead")
        warnings += [f"also damaged: {d}" for d in damaged[1:]]
    return complete, warnings


def find_latest(root: str | Path) -> Path | None:
    """The checkpoint a resume would start from (None: start fresh); see ``find_resumable``."""
    complete, _ = find_resumable(root)
    return complete[0] if complete else None


def _sharded_state(student: TrainableStudent, teacher: Teacher | None, *, is_loading: bool) -> dict[str, Any]:
    # The same model layout as tools/convert_checkpoint.py, so export-hf reads trainer checkpoints.
    state: dict[str, Any] = model_sharded_state_dict(student.chunks)
    if _has_adapters(student):
        # LoRA: the base comes from model.hf_path (checked by fingerprint), only adapters are saved.
        state = {key: {k: v for k, v in chunk.items() if ".lora." in k} for key, chunk in state.items()}
    if is_loading:
        _prepare_optimizer_state(student)
    state["optimizer"] = student.optimizer.sharded_state_dict(
        state, is_loading=is_loading, metadata=SHARDING_METADATA
    )
    if teacher is not None and teacher.holds_weights:
        for index in range(len(student.chunks)):
            state[f"teacher{index}"] = teacher.chunk(index).sharded_state_dict(prefix="teacher.")
            if getattr(teacher, "has_shadow", False):  # a non-float32 EMA: its float32 average
                state[f"teacher_shadow{index}"] = teacher.shadow_sharded_state(index)
    if isinstance(teacher, AdapterEmaTeacher):
        state["teacher_lora"] = teacher.sharded_averages()
    state["scheduler"] = student.scheduler.state_dict()
    return state


def _has_adapters(student: TrainableStudent) -> bool:
    return bool(adapters_of(student.chunks[:1]))


def _load_model(student: TrainableStudent, loaded: dict[str, Any]) -> None:
    """Model entries into the chunks; with LoRA the adapters only (every one of them)."""
    if not _has_adapters(student):
        load_model_state(student.chunks, loaded)
        return
    for i, chunk in enumerate(student.chunks):
        result = unwrap_chunk(chunk).load_state_dict(
            loaded[model_state_key(i, len(student.chunks))], strict=False
        )
        missing = [k for k in result.missing_keys if ".lora." in k]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"the checkpoint's adapters do not match the model (missing {missing[:3]}, unexpected "
                f"{result.unexpected_keys[:3]}); resume with the lora.* settings the run was started with"
            )


def _check_fingerprint(path: Path, expected: str | None) -> None:
    saved = json.loads((path / STATE_FILE).read_text()).get("base_fingerprint")
    if saved is not None and expected is not None and saved != expected:
        raise RuntimeError(
            f"{path} holds LoRA adapters trained on a different base model (fingerprint {saved}, "
            f"model.hf_path has {expected}); point model.hf_path at the run's base model"
        )


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
    layout = {
        "tp": parallel.tp_size,
        "pp": parallel.pp_size,
        "dp": parallel.dp_size,
        "vpp": parallel.vpp_size or 1,
    }
    # Uneven stages only when set, so checkpoints of even layouts keep matching their layout.
    for key, value in (
        ("first_stage_layers", parallel.num_layers_in_first_pipeline_stage),
        ("last_stage_layers", parallel.num_layers_in_last_pipeline_stage),
    ):
        if value is not None:
            layout[key] = value
    return layout


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
    in_process_write_results()
    # torch_dist saving forks writer processes: they must survive a preemption notice, or the
    # checkpoint that the notice asks for fails (megaopsd.runtime.signals).
    with stop_signals_blocked():
        dist_checkpointing.save(
            _sharded_state(student, teacher, is_loading=False),
            str(partial),
            sharded_strategy=get_default_save_sharded_strategy("torch_dist"),
        )
    (partial / "rng").mkdir(exist_ok=True)
    save_rng_file(capture_rng_state(), rng_file(partial, rank))
    dist.barrier()
    if rank == 0:
        if side_files is not None:
            side_files(partial)
        body = {
            "step": step,
            "format_version": FORMAT_VERSION,
            "layout": _layout(parallel),
            "world_size": dist.get_world_size(),
            **trainer_state,
        }
        _write_atomic(partial / STATE_FILE, json.dumps(body, indent=2))
        _write_manifest(partial)  # last: it vouches for every file above
        if final.exists():  # a re-save of the same step (from an abandoned future)
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(Path(root))
        _write_atomic(Path(root) / LATEST, final.name)
        _fsync_dir(Path(root))
        _prune(Path(root), keep_last, step)
    dist.barrier()
    return final


def _write_manifest(directory: Path) -> None:
    """Every file of the checkpoint with its size, for ``verify_checkpoint``."""
    files = {
        str(f.relative_to(directory)): f.stat().st_size
        for f in sorted(directory.rglob("*"))
        if f.is_file() and f.name != MANIFEST_FILE
    }
    _write_atomic(directory / MANIFEST_FILE, json.dumps({"files": files}, indent=1))


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


def _has_teacher_shadow(path: Path) -> bool:
    """Whether the checkpoint holds an EMA teacher's float32 shadow (older ones do not)."""
    from megatron.core import dist_checkpointing

    return any(
        k.startswith(EmaTeacher.SHADOW_PREFIX) for k in dist_checkpointing.load_tensors_metadata(str(path))
    )


def load_checkpoint(
    path: str | Path,
    *,
    student: TrainableStudent,
    teacher: Teacher | None,
    parallel: ParallelState,
    base_fingerprint: str | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, teacher and RNG from ``path``; return trainer state.

    ``rng_restored`` in the result says whether the RNG came back; ``rng_note`` says why not.
    """
    path = Path(path)
    _check_fingerprint(path, base_fingerprint)
    wanted = _sharded_state(student, teacher, is_loading=True)
    if any(k.startswith("teacher_shadow") for k in wanted) and not _has_teacher_shadow(path):
        wanted = {k: v for k, v in wanted.items() if not k.startswith("teacher_shadow")}
    loaded = load_dist_checkpoint(wanted, str(path))
    _load_model(student, loaded)
    with _distributed_optimizer_load_fixes(student):
        student.optimizer.load_state_dict(loaded["optimizer"])
    student.scheduler.load_state_dict(loaded["scheduler"])
    if teacher is not None and teacher.holds_weights:
        for index in range(len(student.chunks)):
            shadow = (
                {"shadow": loaded[f"teacher_shadow{index}"]} if f"teacher_shadow{index}" in loaded else {}
            )
            teacher.load_chunk_state(index, loaded[f"teacher{index}"], **shadow)
    if isinstance(teacher, AdapterEmaTeacher):
        teacher.load_averages(loaded["teacher_lora"])
    body = json.loads((path / STATE_FILE).read_text())
    rng_state, body["rng_note"] = _read_rng(path, body, parallel)
    if rng_state is not None:
        restore_rng_state(rng_state)
    body["rng_restored"] = rng_state is not None
    return body


def _read_rng(path: Path, body: dict[str, Any], parallel: ParallelState) -> tuple[dict[str, Any] | None, str]:
    """This rank's saved RNG state, or None and why the run reseeds instead."""
    if body["layout"] != _layout(parallel) or body["world_size"] != dist.get_world_size():
        return None, "reseeded (layout changed)"
    file = rng_file(path, dist.get_rank())
    pickled = file.with_suffix(".pt")
    if not file.is_file():
        if pickled.is_file():
            return None, (
                f"reseeded: refusing to load {pickled}, a pickle (which can run code when loaded; "
                "megaopsd before format 2 wrote RNG states so)"
            )
        return None, f"reseeded: no {file}"
    try:
        return load_rng_file(file), "restored"
    except ValueError as err:
        return None, f"reseeded: refusing {err}"


def _dcp_exception() -> type[BaseException]:
    """torch distributed checkpoint's error: a ``BaseException``, which ``except Exception`` misses."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _describe_load_error(err: BaseException) -> str:
    """``Type: first line`` of the error, unwrapping torch's per-rank failure collection."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        err = first[0] if isinstance(first, tuple) else first
    lines = str(err).strip().splitlines() or [""]
    return f"{type(err).__name__}: {lines[0][:200]}"


def resume_latest(
    root: str | Path,
    *,
    student: TrainableStudent,
    teacher: Teacher,
    parallel: ParallelState,
    say: Callable[[str], None],
    base_fingerprint: str | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest complete checkpoint under ``root`` (collective); None when there is none.

    Damaged checkpoints are passed over with a warning (``find_resumable``); one that looked
    complete but fails to load is passed over too, for the next older one.

    Raises:
        CheckpointError: checkpoints exist but none can be read (one line: path and fix).
    """
    holder: list[Any] = [None]
    if dist.get_rank() == 0:  # one rank decides, so every rank loads the same checkpoint
        try:
            holder[0] = find_resumable(root)
        except CheckpointError as err:
            holder[0] = str(err)
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(holder, src=0)
    if isinstance(holder[0], str):
        raise CheckpointError(holder[0])
    candidates, warnings = holder[0]
    for warning in warnings:
        say(f"warning: {warning}")
    failures: list[str] = []
    for index, path in enumerate(candidates):
        try:
            return path, load_checkpoint(
                path, student=student, teacher=teacher, parallel=parallel, base_fingerprint=base_fingerprint
            )
        # Whatever dist-checkpointing, torch or safetensors raise on damaged bytes (and the
        # allow-lists on a pickle they refuse): the next older checkpoint may still be good.
        except (Exception, _dcp_exception()) as err:
            reason = _describe_load_error(err)
            failures.append(f"{path} ({reason})")
            if index + 1 < len(candidates):
                say(
                    f"warning: cannot read checkpoint {path} ({reason}); resuming from {candidates[index + 1]} instead"
                )
    if failures:
        raise CheckpointError(
            f"cannot read any checkpoint under {root}: {'; '.join(failures)}; "
            "move the damaged iter_* directories away to resume from an older one, or set checkpoint.resume=false"
        )
    return None
