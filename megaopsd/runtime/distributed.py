"""Process launch environment and torch.distributed initialisation.

Three ways a megaopsd process is started, told apart from the environment alone:

- ``torchrun`` (or any launcher that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``);
- Slurm ``srun`` without torchrun: Slurm sets ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``
  (``SLURM_NTASKS``), ``SLURM_LOCALID`` and ``SLURM_JOB_NODELIST`` but no ``MASTER_ADDR`` or
  ``RANK``, so the rendezvous address is the first node of the allocation and the port is
  derived from the job id;
- a single process (no launcher at all).

``read_launch_env`` needs no process group, so the config can be validated against the world
size before anything starts.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import datetime
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

import torch
import torch.distributed as dist

from megaopsd.config import DEVICES, Config, check_choice


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher described it."""

    launcher: str  # "torchrun" | "slurm" | "single"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_host(nodelist: str) -> str:
    """First hostname of a Slurm nodelist (``node[03-05,9],gpu1`` -> ``node03``).

    ``scontrol show hostnames`` does the same, but it is not present inside every container.
    """
    match = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Describe the launch from environment variables (torchrun, Slurm, or single process)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            launcher="torchrun",
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
        )
    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        # SLURM_STEP_NUM_TASKS is the size of this srun step; SLURM_NTASKS is the job's, which
        # is also set in the batch script where only one process runs.
        world_size = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
        if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
            world_size = 1  # the batch step itself, not an srun task
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return LaunchEnv(
            launcher="slurm",
            rank=int(env["SLURM_PROCID"]) if world_size > 1 else 0,
            world_size=world_size,
            local_rank=int(env.get("SLURM_LOCALID", "0")) if world_size > 1 else 0,
            master_addr=env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
        )
    return LaunchEnv(
        launcher="single",
        rank=0,
        world_size=1,
        local_rank=0,
        master_addr="127.0.0.1",
        master_port=int(env.get("MASTER_PORT", "0")),
    )


def world_size_from_env() -> int:
    """The number of processes in this launch, read without starting a process group."""
    return read_launch_env(os.environ).world_size


def target_world_size(cfg: Config) -> int:
    """The world size to validate against: ``trainer.dry_run_world_size`` for a dry run that
    names one (planning a cluster job from a laptop), else this launch's world size."""
    if cfg.trainer.dry_run and cfg.trainer.dry_run_world_size is not None:
        return cfg.trainer.dry_run_world_size
    return world_size_from_env()


def select_device(requested: str, launch: LaunchEnv) -> torch.device:
    """``auto`` -> the local GPU if CUDA is available, else the CPU."""
    check_choice("runtime.device", requested, DEVICES)
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("runtime.device=cuda but CUDA is not available; use runtime.device=auto or cpu")
    return torch.device("cuda", launch.local_rank % torch.cuda.device_count())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group(launch: LaunchEnv, device: torch.device, *, timeout_minutes: int = 30) -> None:
    """Start the default process group: NCCL on CUDA, gloo on the CPU.

    A single process still gets a (world size 1) group, because megatron-core's parallel
    state and checkpointing are written against torch.distributed.
    """
    if dist.is_initialized():
        return
    port = launch.master_port or _free_port()
    os.environ["MASTER_ADDR"] = launch.master_addr
    os.environ["MASTER_PORT"] = str(port)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{launch.master_addr}:{port}",
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def collective_device() -> torch.device:
    """Where small tensors for collectives must live: the current GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dp_sum(values: Sequence[float], group: dist.ProcessGroup | None) -> list[float]:
    """``values`` summed over ``group`` (the data-parallel replicas) in float64, on every rank.

    The one way step counters (tokens, rollouts, rewards) become global: exact for counts up
    to 2**53, whatever the model dtype.
    """
    totals = torch.tensor([float(v) for v in values], dtype=torch.float64, device=collective_device())
    dist.all_reduce(totals, group=group)
    return [float(v) for v in totals]


def exit_without_teardown(code: int) -> NoReturn:
    """Exit with ``code`` once the work has shut down, skipping the interpreter's own teardown.

    For entry points (the trainer, tools/eval_math.py, tools/convert_checkpoint.py), once they
    have closed their engines, event files and process groups. Python's atexit handlers and the
    flushes run, then C's ``exit``: its handlers and the native libraries' destructors still run
    (vLLM's CPU communicator unlinks its /dev/shm segments there; ``os._exit`` would leave them
    behind and the next TP2 engine on the machine would fail). What is skipped is freeing every
    module of torch, megatron-core and vLLM object by object: ~2 s of CPU per process, paid by
    every rank of every launch for nothing. The GIL stays held, so no other Python thread runs
    meanwhile (as after a normal finalization). An exception still exits the usual way.
    """
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    ctypes.PyDLL(None).exit(code)
    raise AssertionError("unreachable: exit(3) returned")
