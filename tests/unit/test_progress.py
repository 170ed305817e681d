"""megaopsd.progress: a redrawn bar on a terminal, throttled whole lines in logs."""

from __future__ import annotations

import fcntl
import io
import os
import re
import struct
import termios
import time

import pytest

from megaopsd.progress import INTERVAL_ENV, interval_from_env, progress, progress_factory

LINE = re.compile(r"^work: +(\d+)% (\d+)/20 \[[0-9:]+<[0-9:?]+, +[0-9.?]+row/s\]$")


def test_log_lines_are_throttled_and_carry_rate_and_eta():
    buf = io.StringIO()
    start = time.monotonic()
    for _ in progress(range(20), desc="work", unit="row", file=buf, interval_s=0.3):
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    text = buf.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert all(LINE.match(line) for line in lines), lines
    assert lines[0].startswith("work:   0% 0/20") and lines[-1].startswith("work: 100% 20/20")
    # the first and the last line always; in between at most one per 0.3 s, and some
    assert 3 <= len(lines) <= 2 + elapsed / 0.3 + 1, (len(lines), elapsed)
    assert float(lines[-1].split(", ")[-1].split("row/s")[0]) == pytest.approx(20 / elapsed, rel=0.5)


def test_a_long_interval_gives_the_first_and_the_last_line_only():
    buf = io.StringIO()
    with progress(total=3 * 2**20, desc="export", unit="B", unit_scale=True, file=buf, interval_s=1e6) as bar:
        for _ in range(3):
            bar.update(2**20)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("export:   0%") and "100% 3.15M/3.15M" in lines[1]
    assert lines[1].endswith("B/s]")


def test_a_terminal_gets_a_redrawn_bar():
    master, slave = os.openpty()
    # a new pseudo-terminal is 0 columns wide, and tqdm cuts its bar to the width: make it 120
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    with os.fdopen(slave, "w") as terminal:
        for _ in progress(range(5), desc="work", file=terminal, interval_s=1e6):
            pass
    os.set_blocking(master, False)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except (BlockingIOError, OSError):
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    text = b"".join(chunks).decode()
    assert "\r" in text and "work: 100%" in text and "5/5" in text, text


def test_factory_fixes_its_keywords_like_vllm_calls_it():
    buf = io.StringIO()
    bar = progress_factory(desc="aime24: generate", unit="sample", file=buf, interval_s=0)(
        total=4, desc="Processed prompts", dynamic_ncols=True, postfix="est. speed input: 0.00 toks/s"
    )
    bar.postfix = "est. speed input: 9.00 toks/s"  # what vLLM does between updates
    bar.update(4)
    bar.close()
    last = buf.getvalue().splitlines()[-1]
    assert (
        last.startswith("aime24: generate: 100% 4/4") and "sample/s, est. speed input: 9.00 toks/s]" in last
    )


def test_disabled_writes_nothing_and_the_interval_comes_from_the_environment(monkeypatch):
    buf = io.StringIO()
    for _ in progress(range(3), desc="quiet", file=buf, disable=True):
        pass
    assert buf.getvalue() == ""
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert interval_from_env() == 2.5
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match="MEGAOPSD_PROGRESS_INTERVAL='soon' is not a number"):
        interval_from_env()
    monkeypatch.delenv(INTERVAL_ENV)
    assert interval_from_env() == 30.0
