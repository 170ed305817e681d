"""``.ci/run`` passes pytest's exit code through, so a run that collects no tests (exit 5) fails.

The script's two outside steps are replaced by recording doubles in a copy of the tree:
``make`` (a stand-in on PATH that exits with a chosen code instead of running the suite) and
``slurm/local/cluster.sh`` (exits 0 instead of installing Debian packages).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _executable(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run_ci(tmp_path: Path, make_exit: int) -> subprocess.CompletedProcess:
    tree = tmp_path / "tree"
    shutil.copytree(REPO / ".ci", tree / ".ci")
    _executable(tree / "slurm/local/cluster.sh", "exit 0\n")
    calls = tmp_path / "make_calls.txt"
    _executable(tmp_path / "bin" / "make", f'echo "$@" >> {calls}\nexit {make_exit}\n')
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(tree / ".ci/run")], capture_output=True, text=True, env=env, timeout=60)
    assert calls.read_text().startswith("test "), "the CI script did not run `make test`"
    return out


@pytest.mark.parametrize("code", [0, 1, 5])
def test_ci_exit_code_is_pytests(tmp_path, code):
    out = _run_ci(tmp_path, code)
    assert out.returncode == code, out.stdout


def test_no_tests_collected_fails_with_a_message(tmp_path):
    out = _run_ci(tmp_path, 5)
    assert out.returncode != 0
    assert "collected no tests" in out.stdout
