"""Run a function on N gloo ranks, each a fresh process, and collect what it returns.

The workers see the same environment variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), so ``megaopsd.runtime`` takes its real torchrun path. A worker
function must live at module level in an importable module (spawn pickles it by name).

    results = run_ranks(my_worker, world_size=2, args=(x,))   # list, one item per rank

The ranks are forked from a forkserver that imported torch, megatron-core, transformers and
megaopsd once for the whole session: a rank starts in a fraction of a second instead of paying
~5 s of imports per test, and is still a fresh process (nothing one test patches reaches the next).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable
from functools import cache
from typing import Any

import torch

# Imported once in the forkserver; every rank is a fork of it. Keep to modules whose import
# starts no threads and touches no process group (a fork must not copy either).
PRELOAD = (
    "torch",
    "megatron.core",
    "megatron.core.models.gpt",
    "transformers",
    "safetensors.torch",
    "megaopsd.components",
    "megaopsd.algorithm.step",
    "megaopsd.convert",
    "tests.helpers",
)


@cache
def _context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(fn: Callable, rank: int, world_size: int, port: int, args: tuple, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    try:
        # Serialise results to bytes: tensors put on a queue as-is travel through shared-memory
        # handles that die with this process, before the parent reads them.
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
        raise


def run_ranks(
    fn: Callable, *, world_size: int, args: tuple = (), timeout_s: float = 600, spawn: bool = False
) -> list[Any]:
    """Start ``world_size`` processes running ``fn(*args)``; return their results by rank.

    ``spawn=True`` starts fresh interpreters instead of forks of the forkserver: slower (every
    rank imports everything), but the ranks write to this process's current stdout/stderr, so
    pytest's ``capfd`` sees what they print (a fork writes where the forkserver started).

    The rendezvous port is picked free just before the spawn; another process can take it in
    between (seen when suites run side by side), so an "address already in use" failure at
    rendezvous is retried with a new port, twice at most.

    Raises:
        RuntimeError: a rank raised (its traceback is in the message) or the run timed out.
    """
    for attempt in range(3):
        try:
            return _run_once(fn, world_size=world_size, args=args, timeout_s=timeout_s, spawn=spawn)
        except RuntimeError as err:
            if "EADDRINUSE" not in str(err) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _next_result(queue, procs: list, results: dict, timeout_s: float) -> tuple[int, str, Any]:
    """The next rank's report; fails at once when a rank died without one (not after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return queue.get(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
        except queue_module.Empty:
            dead = [r for r, proc in enumerate(procs) if proc.exitcode not in (None, 0) and r not in results]
            if dead:
                try:  # its report may have been flushed just before it died
                    return queue.get(timeout=1.0)
                except queue_module.Empty:
                    codes = [proc.exitcode for proc in procs]
                    raise RuntimeError(f"rank {dead[0]} died without a result; exit codes {codes}") from None
            if time.monotonic() >= deadline:
                raise


def _run_once(fn: Callable, *, world_size: int, args: tuple, timeout_s: float, spawn: bool) -> list[Any]:
    ctx = mp.get_context("spawn") if spawn else _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, args, queue)) for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = _next_result(queue, procs, results, timeout_s)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    except Exception as exc:  # queue.Empty on timeout, or a broken pipe if a rank died hard
        codes = [proc.exitcode for proc in procs]
        errors.append(f"no result from every rank within {timeout_s} s ({exc!r}); exit codes {codes}")
    finally:
        for proc in procs:
            proc.join(timeout=5 if errors else 60)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
