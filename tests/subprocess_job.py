"""Run one JSON-in / JSON-out function of a test module in a fresh Python process.

Some e2e tests need a process of their own: an in-process vLLM engine changes process-wide
state (a no-op ``torch.set_num_threads``, environment variables inherited by every later
subprocess, its own torch.distributed group), which must not leak into the pytest process.

    result = run_job(engine_job, {"kind": "in_process", ...}, tmp_dir)

The child imports the function's module by name (``tests.e2e.test_x``), calls it with the job
dict and writes the returned dict as JSON; the parent reads it back.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_job(
    fn: Callable[[dict], dict], job: dict, workdir: Path, *, name: str = "job", timeout: float = 400
) -> dict:
    """``fn(job)`` in a fresh interpreter (repo root as cwd and PYTHONPATH); its JSON result."""
    target = f"{fn.__module__}:{fn.__qualname__}"
    job_file, result_file = workdir / f"{name}-job.json", workdir / f"{name}-result.json"
    job_file.write_text(json.dumps(job))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.subprocess_job", target, str(job_file), str(result_file)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"{target} failed in its own process:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return json.loads(result_file.read_text())


def _main(target: str, job_file: str, result_file: str) -> int:
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    Path(result_file).write_text(json.dumps(fn(json.loads(Path(job_file).read_text()))))
    return 0


if __name__ == "__main__":  # the spawn start method re-imports __main__: keep the guard
    from megaopsd.runtime.distributed import exit_without_teardown

    exit_without_teardown(_main(*sys.argv[1:4]))  # as the trainer exits: no ~2 s of teardown
