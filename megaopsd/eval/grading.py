"""Final-answer extraction and math-verify grading with a hard per-item time limit.

The answer of a response is the content of its last ``\\boxed{...}`` (or ``\\fbox{...}``),
braces matched; a response without one, or whose last box is empty or never closed (a
truncated response), has no answer and is graded wrong. The reference and the answer are
both parsed by math-verify as inline LaTeX (``$...$``) and compared with ``verify(gold,
target)``, the grading the OPSD paper's evaluation uses.

Why a worker process: math-verify bounds its own work with ``signal.alarm``, which only works
in a process's main thread (elsewhere it raises ValueError) and cannot interrupt long C-level
work. Sympy can spend minutes or gigabytes on a model's ``10^{10^{10}}`` or ``(10^{100})!``.
So grading runs in ``python -m megaopsd.eval._grade_worker`` subprocesses that read one
JSON request per line and answer one line: math-verify's own (soft) limits handle the common
slow cases without a restart, and the parent kills a worker that overruns the hard limit
(the item is graded wrong, status ``timeout``) and starts a new one. The workers are plain
subprocesses, not multiprocessing children, so nothing of the parent (vLLM, torch threads,
the trainer's ``__main__``) is forked or re-imported into them.

    with Grader(GradingSettings(timeout_s=10)) as grader:
        grades = grader.grade_responses([r"... so \\boxed{\\frac12}"], ["0.5"])
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from megaopsd.config import EvalConfig
from megaopsd.progress import progress as show_progress

STATUS_GRADED = "graded"  # math-verify gave a verdict (correct or not)
STATUS_NO_ANSWER = "no_answer"  # no usable \boxed{} in the response
STATUS_TIMEOUT = "timeout"  # the worker overran the hard limit and was killed
STATUS_ERROR = "error"  # math-verify raised, or the worker died

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_REPO_ROOT = Path(__file__).resolve().parents[2]  # the worker imports megaopsd from here


# ----------------------------------------------------------------------------- extraction


def _braced_group(text: str, start: int) -> str | None:
    """The content of the ``{...}`` group opening at ``text[start]``, or None if it never closes.

    A backslash escapes the next character, so ``\\{`` and ``\\}`` (set braces) do not count
    and ``\\\\`` (a LaTeX line break) does not escape what follows it.
    """
    depth, i = 0, start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, stripped.

    Nested braces are matched. ``\\boxed 5`` (a single token, no braces) is accepted as TeX
    does. Returns None when there is no box, or the last box is empty or unterminated: the
    final answer is the last one written, and an earlier box is not a substitute for it.
    """
    matches = list(_BOX_COMMAND.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        content = _braced_group(text, i)
    else:
        token = re.match(r"[A-Za-z0-9.]+", text[i:])
        content = token.group(0) if token else None
    if content is None or not content.strip():
        return None
    return content.strip()


def reference_answer(reference: str) -> str:
    """A reference as the grader uses it: the last box of a worked solution, else the text itself."""
    boxed = extract_boxed(reference)
    return boxed if boxed is not None else reference.strip()


# ----------------------------------------------------------------------------- math-verify


def _as_inline_latex(answer: str) -> str:
    """``$answer$`` with the answer's own unescaped ``$`` removed, so math-verify sees one formula."""
    return "$" + re.sub(r"(?<!\\)\$", "", answer).strip() + "$"


def verify_answer(answer: str, reference: str, *, soft_timeout_s: int = 0) -> bool:
    """math-verify's verdict on ``answer`` against ``reference``, both plain LaTeX answers.

    Runs math-verify in the calling thread: only safe in a process's main thread and with no
    hard bound (``Grader`` calls it inside a killable worker).

    Args:
        answer: the extracted answer (no ``\\boxed``), e.g. ``\\dfrac12``.
        reference: the reference answer, e.g. ``0.5``.
        soft_timeout_s: math-verify's own limit (whole seconds, signal-based) per parse and
            per comparison; 0 disables it.
    """
    from math_verify import parse, verify

    timeout = soft_timeout_s if soft_timeout_s > 0 else None
    gold = parse(_as_inline_latex(reference), parsing_timeout=timeout)
    target = parse(_as_inline_latex(answer), parsing_timeout=timeout)
    if not gold or not target:
        return False
    return bool(verify(gold, target, timeout_seconds=timeout))


# ----------------------------------------------------------------------------- the grader


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradingSettings:
    """Limits of the grading workers.

    Attributes:
        timeout_s: hard limit per graded item; past it the worker is killed and the item is
            graded wrong with status ``timeout``.
        soft_timeout_s: math-verify's own limit per parse/comparison inside the worker (whole
            seconds; 0 disables). Keep it well under ``timeout_s``: it ends slow items without a
            worker restart.
        num_workers: grading processes working in parallel.
        memory_limit_mb: address-space limit of each worker (a huge integer becomes a
            MemoryError, graded wrong, instead of swapping the node); 0 disables.
        start_timeout_s: how long a worker may take to import math-verify and report ready.
    """

    timeout_s: float = 10.0
    soft_timeout_s: int = 3
    num_workers: int = 1
    memory_limit_mb: int = 4096
    start_timeout_s: float = 120.0

    @classmethod
    def of(cls, cfg: EvalConfig) -> GradingSettings:
        """The limits the ``eval`` section sets (the trainer's rewards and its evaluator share them)."""
        return cls(timeout_s=cfg.grading_timeout_s, num_workers=cfg.grading_workers)

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.soft_timeout_s < 0:
            raise ValueError(f"soft_timeout_s must be >= 0 (0 disables it), got {self.soft_timeout_s}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Grade:
    """The verdict on one response.

    Attributes:
        extracted_answer: the last boxed answer, or None.
        correct: whether it equals the reference (False for every status but ``graded``).
        status: ``graded``, ``no_answer``, ``timeout`` or ``error``.
    """

    extracted_answer: str | None
    correct: bool
    status: str


class _Worker:
    """One grading subprocess speaking JSON lines on stdin/stdout."""

    def __init__(self, settings: GradingSettings) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH")) if p)
        command = [sys.executable, "-m", "megaopsd.eval._grade_worker"]
        command += ["--soft-timeout", str(settings.soft_timeout_s)]
        command += ["--memory-limit-mb", str(settings.memory_limit_mb)]
        # A preemption notice (USR1, sent by Slurm to every process of the step) is the trainer's
        # to act on; a grading worker that died of it would fail the evaluation in flight.
        # (Blocked around the spawn, inherited by the child; not megaopsd.runtime.signals, whose
        # package imports torch, which this module stays free of.)
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
        try:
            self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self.stdout: IO[bytes] = self.proc.stdout  # type: ignore[assignment]
        ready = self._read_line(settings.start_timeout_s)
        if ready != {"ready": True}:
            self.kill()
            raise RuntimeError(f"grading worker failed to start (got {ready!r}); see its stderr above")

    def _read_line(self, timeout_s: float) -> dict | None:
        readable, _, _ = select.select([self.stdout], [], [], max(timeout_s, 0.0))
        if not readable:
            return None
        line = self.stdout.readline()
        return json.loads(line) if line else None

    def send(self, request: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()

    def receive(self) -> dict | None:
        """The answer to the last request (call when stdout is readable); None if the worker died."""
        line = self.stdout.readline()
        return json.loads(line) if line else None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        """Ask the worker to exit (EOF on stdin); kill it if it does not."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()


class Grader:
    """Grades answers against references in killable worker processes.

    Workers start on first use and live until ``close()`` (use it as a context manager, or
    keep one for a whole training run so evaluations do not pay the ~1-2 s start each time).
    Identical (answer, reference) pairs in one call are graded once.

    Args:
        settings: hard and soft time limits, worker count, memory limit.
    """

    def __init__(self, settings: GradingSettings | None = None) -> None:
        self.settings = settings or GradingSettings()
        self._idle: list[_Worker] = []
        self.restarts = 0  # workers killed for overrunning or dying, for logs and tests

    def grade_responses(
        self, responses: Sequence[str], references: Sequence[str], *, progress: str | None = None
    ) -> list[Grade]:
        """Extract each response's last boxed answer and grade it against its reference.

        ``progress``: a description to show progress under (``megaopsd.progress``); None: silent.
        """
        return self.grade_answers([extract_boxed(r) for r in responses], references, progress=progress)

    def grade_answers(
        self, answers: Sequence[str | None], references: Sequence[str], *, progress: str | None = None
    ) -> list[Grade]:
        """Grade already extracted answers (None: no answer) against their references."""
        if len(answers) != len(references):
            raise ValueError(f"{len(answers)} answers but {len(references)} references")
        keys = [(a, reference_answer(r)) for a, r in zip(answers, references)]
        todo = list(dict.fromkeys(key for key in keys if key[0] is not None))
        quiet = progress is None or not todo
        with show_progress(total=len(todo), desc=progress or "", unit="answer", disable=quiet) as bar:
            verdicts = self._run(todo, on_result=bar.update) if todo else {}
        grades = []
        for answer, reference in keys:
            if answer is None:
                grades.append(Grade(extracted_answer=None, correct=False, status=STATUS_NO_ANSWER))
            else:
                correct, status = verdicts[(answer, reference)]
                grades.append(Grade(extracted_answer=answer, correct=correct, status=status))
        return grades

    def _run(
        self, items: list[tuple[str, str]], on_result: Callable[[int], Any] | None = None
    ) -> dict[tuple[str, str], tuple[bool, str]]:
        """Feed ``items`` to the workers; each gets ``timeout_s`` from the moment it is sent.

        ``on_result(k)`` is told of each ``k`` new verdicts (progress).
        """
        while len(self._idle) < min(self.settings.num_workers, len(items)):
            self._idle.append(_Worker(self.settings))
        pending = collections.deque(items)
        busy: dict[_Worker, tuple[tuple[str, str], float]] = {}
        results: dict[tuple[str, str], tuple[bool, str]] = {}
        reported = 0
        try:
            while pending or busy:
                while pending and self._idle:
                    worker, item = self._idle.pop(), pending.popleft()
                    try:
                        worker.send({"answer": item[0], "reference": item[1]})
                    except OSError:  # it died while idle: replace it and send the item again
                        pending.appendleft(item)
                        self._replace(worker)
                        continue
                    busy[worker] = (item, time.monotonic() + self.settings.timeout_s)
                wait_s = min(deadline for _, deadline in busy.values()) - time.monotonic()
                readable, _, _ = select.select([w.stdout for w in busy], [], [], max(wait_s, 0.0))
                for worker in [w for w in busy if w.stdout in readable]:
                    item, _ = busy.pop(worker)
                    reply = worker.receive()
                    if reply is None:  # the worker died (e.g. killed by the OOM killer)
                        results[item] = (False, STATUS_ERROR)
                        self._replace(worker)
                    else:
                        results[item] = (bool(reply["correct"]), reply["status"])
                        self._idle.append(worker)
                now = time.monotonic()
                for worker in [w for w, (_, deadline) in busy.items() if deadline <= now]:
                    item, _ = busy.pop(worker)
                    results[item] = (False, STATUS_TIMEOUT)
                    self._replace(worker)
                if on_result is not None and len(results) > reported:
                    on_result(len(results) - reported)
                    reported = len(results)
        except BaseException:
            for worker in busy:  # their state is unknown: do not reuse them
                worker.kill()
            raise
        return results

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self.restarts += 1
        self._idle.append(_Worker(self.settings))

    def worker_pids(self) -> list[int]:
        """Process ids of the idle workers (for monitoring)."""
        return [worker.proc.pid for worker in self._idle]

    def close(self) -> None:
        """Stop every worker."""
        workers, self._idle = self._idle, []
        for worker in workers:
            worker.close()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
