"""Stop signals: recorded by the trainer, kept away from its helper processes.

SIGTERM and SIGUSR1 ask the trainer to checkpoint at the next step boundary and exit
(``StopRequest``, installed before anything slow starts, so a notice during start-up is not
fatal). Slurm delivers a preemption notice to EVERY process of a job step, helpers included:
the vLLM engine's processes and the writer processes megatron-core's torch_dist checkpointing
forks. A helper that dies of it takes the trainer's checkpoint or rollouts with it, so helpers
are started with the signals blocked: a spawned child inherits the spawning thread's signal
mask across exec and never acts on them. (In the trainer itself a signal that arrives meanwhile
goes to another thread's unblocked mask or waits for the unblock; either way Python runs the
handler.)
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator, Sequence

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # checkpoint at the next step boundary, then exit


class StopRequest:
    """Remembers the last stop signal received; ``install`` once, early, in the main thread."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, _frame) -> None:
        self.signum = signum


@contextlib.contextmanager
def stop_signals_blocked(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[None]:
    """Block ``signals`` in this thread, and so in every process it starts meanwhile."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
