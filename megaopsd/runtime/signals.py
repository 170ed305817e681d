"""Stop signals and the helper processes that must not die of them.

Slurm delivers a preemption notice (SIGUSR1) or a cancel (SIGTERM) to EVERY process of a job
step, helpers included: the vLLM engine's processes and the Manager process megatron-core's
torch_dist checkpointing spawns. A helper that dies of the notice takes the trainer's
checkpoint or rollouts with it. Helpers are therefore started with the stop signals blocked:
a spawned child inherits the signal mask across exec, so the notice stays pending there for
ever, while the trainer gets any signal that arrived meanwhile as soon as the block lifts.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # checkpoint at the next step boundary, then exit


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals in this thread (and in every process started meanwhile)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
