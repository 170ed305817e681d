"""Progress with rate and ETA for long work (conversion, evaluation, data preparation).

On a terminal this is an ordinary tqdm bar. Anywhere else (a Slurm log, a pipe, a file) a
redrawn bar turns into thousands of ``\\r`` fragments, so the output is one plain line at the
start, at most one line every ``interval_s`` seconds, and one at the end, each with the rate
averaged since the start and the time left:

    import: 45% 3.1G/6.9G [01:02<01:16, 50.0MB/s]

The interval is ``interval_s``, else ``$MEGAOPSD_PROGRESS_INTERVAL`` (seconds), else 30.

    for row in progress(rows, desc="tokenize", unit="row"):        # wraps an iterable
        ...
    with progress(total=n_bytes, desc="export", unit="B", unit_scale=True) as bar:
        bar.update(tensor.nbytes)

``progress_factory(desc=...)`` makes the callable that vLLM's ``LLM.generate(use_tqdm=...)``
accepts, so generation reports through the same two modes.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

from tqdm import tqdm

DEFAULT_INTERVAL_S = 30.0
INTERVAL_ENV = "MEGAOPSD_PROGRESS_INTERVAL"
_LOG_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_LOG_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def is_terminal(stream: IO[str]) -> bool:
    """Whether ``stream`` is an interactive terminal (a closed or odd stream counts as not)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def interval_from_env(default: float = DEFAULT_INTERVAL_S) -> float:
    """``$MEGAOPSD_PROGRESS_INTERVAL`` in seconds, or ``default``; a bad value is an error."""
    text = os.environ.get(INTERVAL_ENV)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"{INTERVAL_ENV}={text!r} is not a number of seconds; e.g. {INTERVAL_ENV}=30"
        ) from None
    if value < 0:
        raise ValueError(f"{INTERVAL_ENV}={text!r} must be >= 0 seconds")
    return value


class LogLineProgress(tqdm):
    """tqdm for logs: whole lines, the first and the last always, others ``interval_s`` apart."""

    def __init__(self, *args: Any, interval_s: float, **kwargs: Any) -> None:
        self._interval_s = interval_s
        self._line_at: float | None = None
        self._line_n: int | None = None
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm asks to clear the bar: nothing was drawn in place
            return False
        now = time.monotonic()
        if self._line_at is not None and now - self._line_at < self._interval_s:
            return True
        self._write(self.__str__() if msg is None else msg, now)
        return True

    def _write(self, line: str, now: float) -> None:
        self.fp.write(line + "\n")
        self.fp.flush()
        self._line_at, self._line_n = now, self.n

    def close(self) -> None:
        if self.disable:
            return
        final = None
        if self._line_n != self.n or self._line_at is None:
            self._ema_dt = lambda: None  # the rate since the start, not a recent average
            final = self.__str__()
        self.leave = False  # tqdm's own close would clear the bar in place
        super().close()
        if final is not None:
            self._write(final, time.monotonic())


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: float | None = None,
    unit: str = "it",
    unit_scale: bool = False,
    file: IO[str] | None = None,
    interval_s: float | None = None,
    disable: bool = False,
    **tqdm_kwargs: Any,
) -> tqdm:
    """A progress bar on a terminal, throttled plain lines elsewhere (see the module docstring).

    Args:
        iterable: what to iterate over (``total`` defaults to its ``len`` when it has one).
        desc: what is being done, printed first (``import``, ``aime24: generate``).
        total: the amount of work, in ``unit``s; None shows counts and rate without an ETA.
        unit: what one step is (``it``, ``B``, ``row``, ``sample``).
        unit_scale: print 3.1G instead of 3100000000 (use it with bytes).
        file: where to write; default stderr.
        interval_s: seconds between lines when ``file`` is not a terminal (default: see above).
        disable: show nothing (e.g. on ranks other than 0).
        **tqdm_kwargs: passed to tqdm (``postfix``, ``dynamic_ncols``...).
    """
    stream = file if file is not None else sys.stderr
    common = dict(desc=desc, total=total, unit=unit, unit_scale=unit_scale, file=stream, disable=disable)
    if is_terminal(stream):
        return tqdm(iterable, **common, **tqdm_kwargs)
    interval = interval_from_env() if interval_s is None else interval_s
    tqdm_kwargs.pop("dynamic_ncols", None)  # no terminal to measure
    sized = total is not None or (iterable is not None and hasattr(iterable, "__len__"))
    return LogLineProgress(
        iterable,
        interval_s=interval,
        mininterval=interval,  # update() skips formatting until a line could be written
        maxinterval=max(interval, 10.0),
        smoothing=0.0,
        ascii=True,
        bar_format=_LOG_FORMAT if sized else _LOG_FORMAT_NO_TOTAL,
        **common,
        **tqdm_kwargs,
    )


def progress_factory(**fixed: Any) -> Callable[..., tqdm]:
    """A tqdm-like constructor whose keywords in ``fixed`` win (``desc``, ``unit``, ``file``...).

    vLLM's ``LLM.generate(use_tqdm=factory)`` calls it with its own ``desc`` and ``total``.
    """

    def make(*args: Any, **kwargs: Any) -> tqdm:
        kwargs.update(fixed)
        return progress(*args, **kwargs)

    return make
