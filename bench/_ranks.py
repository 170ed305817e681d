"""Run a function on N gloo ranks (fresh processes with torchrun's environment) and collect results.

For benchmarks that compare one process with several; the function must live at module level
of the calling script (each rank re-imports it under a ``__main__`` guard).

Ranks are forked from a "forkserver" that has imported torch, megatron-core and vLLM once
(``PRELOAD``): every call's ranks start in a fraction of a second instead of importing them
again (~5 s of CPU each), and exit without the interpreter's teardown. Nothing is timed across
start-up, so the figures do not change; the wall time of a benchmark does.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

# Imported once by the fork server; each rank starts from a fork of it.
PRELOAD = (
    "torch",
    "megatron.core",
    "megatron.core.models.gpt",
    "transformers",
    "vllm.entrypoints.llm",
    "megaopsd.components",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(fn: Callable, rank: int, world: int, port: int, args: tuple, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    try:
        queue.put((rank, "ok", fn(*args)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
        raise


def run_ranks(fn: Callable, *, world_size: int, args: tuple = (), timeout_s: float = 1200) -> list[Any]:
    """``fn(*args)`` on ``world_size`` ranks; the results by rank (plain picklable values).

    Raises:
        RuntimeError: a rank failed (its traceback is in the message) or timed out.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank, args=(fn, r, world_size, port, args, queue)) for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout_s)
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [results[r] for r in range(world_size)]
