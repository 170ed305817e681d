"""The rank harness itself: a rank that dies without reporting fails the run at once."""

from __future__ import annotations

import os
import time

import pytest

from tests.dist_harness import run_ranks


def die_on_rank_one() -> None:
    if int(os.environ["RANK"]) == 1:
        os._exit(3)  # a hard death: no traceback, no report
    time.sleep(60)


def test_a_rank_that_dies_fails_the_run_without_waiting_for_the_timeout():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 died without a result; exit codes \[None, 3\]"):
        run_ranks(die_on_rank_one, world_size=2, timeout_s=300)
    assert time.monotonic() - start < 30
