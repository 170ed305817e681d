"""Answer extraction, math-verify grading in killable workers, and the pass@k / avg@k / majority@k math.

Real math-verify in real worker processes. One grader serves the whole table (workers start once).

    python -m pytest tests/unit/test_grading.py         # ~10 s
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import pytest

from megaopsd.eval.grading import (
    STATUS_ERROR,
    STATUS_GRADED,
    STATUS_NO_ANSWER,
    STATUS_TIMEOUT,
    Grader,
    GradingSettings,
    extract_boxed,
    reference_answer,
)
from megaopsd.eval.metrics import avg_at_k, majority_at_k, normalize_answer, pass_at_k

# (response, reference, correct) -- every verdict checked by hand.
TABLE = [
    # equivalent forms of one half
    (r"so \boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{1/2}", r"\frac{1}{2}", True),
    (r"\boxed{\dfrac12}", r"\frac{1}{2}", True),
    (r"\boxed{\tfrac{1}{2}}", "1/2", True),
    (r"\boxed{\frac{2}{4}}", r"\frac12", True),
    (r"\boxed{0.25}", r"\frac{1}{2}", False),
    # radicals, polynomials, integers
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", True),
    (r"\boxed{x^2+1}", "1+x^2", True),
    (r"\boxed{070}", "70", True),
    (r"\boxed{70}", "71", False),
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{-3}", "-3", True),
    (r"\boxed{3}", "-3", False),
    (r"\boxed{3.14}", r"\pi", False),
    # intervals
    (r"\boxed{(1, 2]}", "(1,2]", True),
    (r"\boxed{[1,2]}", "(1,2]", False),
    (r"\boxed{[0, \infty)}", r"[0,\infty)", True),
    (r"\boxed{(-\infty, 3)}", r"(-\infty,3]", False),
    # sets (escaped braces inside the box) and solution lists
    (r"\boxed{\{3,2,1\}}", r"\{1,2,3\}", True),
    (r"\boxed{\{1,2\}}", r"\{1,2,3\}", False),
    (r"\boxed{2, 1}", "1,2", True),
    # units, degrees, percentages, currency, text choices, equations, matrices
    (r"\boxed{5\text{ cm}}", "5", True),
    (r"\boxed{5}", r"5\text{ cm}", True),
    (r"\boxed{10^\circ}", "10", True),
    (r"\boxed{50\%}", "50", True),
    (r"\boxed{50}", r"50\%", True),
    (r"\boxed{\$18.90}", "18.90", True),
    (r"\boxed{\text{(C)}}", "C", True),
    (r"\boxed{x=3}", "3", True),
    (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", True),
    # which box counts
    (r"first \boxed{1}, then on reflection \boxed{2}", "2", True),
    (r"first \boxed{2}, then \boxed{1}", "2", False),
    (r"\fbox{7}", "7", True),
    (r"The answer is \boxed 5", "5", True),
    (r"$\boxed{\pi}$.", r"\pi", True),
    (r"\boxed{12}", r"Adding gives $5+7$, so the answer is $\boxed{12}$.", True),  # a worked reference
    # no answer
    ("the answer is 4", "4", False),
    (r"\boxed{}", "4", False),
    (r"truncated \boxed{\frac{1}{2", "1/2", False),
]

# Malformed or pathological answers: graded wrong, never a crash or a hang.
MALFORMED = [
    r"\boxed{\frac{}{}}",
    r"\boxed{\sqrt{}}",
    r"\boxed{((((}",
    r"\boxed{\left(}",
    r"\boxed{\begin{pmatrix}}",
    r"\boxed{\}}",
    r"\boxed{\frac{1}{0}}",
    r"\boxed{x^{x^{x^{x^{x}}}}}",
    r"\boxed{10^{10^{10^{10}}}}",
    r"\boxed{(10^{100})!}",
    r"\boxed{" + "{" * 300 + "1" + "}" * 300 + "}",
    r"\boxed{" + "\\frac{" * 200 + "}",
    r"\boxed{" + "1+" * 2000 + "}",
    "\\boxed{\x00\ufffd\\\\}",
]


@pytest.fixture(scope="module")
def grader():
    with Grader(GradingSettings(timeout_s=5.0, soft_timeout_s=1, num_workers=2)) as g:
        yield g


def test_grading_table(grader):
    assert len(TABLE) >= 30
    grades = grader.grade_responses([r for r, _, _ in TABLE], [ref for _, ref, _ in TABLE])
    wrong = [(row, g) for row, g in zip(TABLE, grades) if g.correct != row[2]]
    assert not wrong, "\n".join(f"{row} -> {g}" for row, g in wrong)
    no_answer = [g for g in grades if g.status == STATUS_NO_ANSWER]
    assert len(no_answer) == 3 and all(g.extracted_answer is None for g in no_answer)
    assert all(g.status == STATUS_GRADED for g in grades if g.extracted_answer is not None)
    assert grader.restarts == 0


def test_malformed_latex_neither_crashes_nor_hangs(grader):
    start = time.monotonic()
    grades = grader.grade_responses(MALFORMED, ["5"] * len(MALFORMED))
    elapsed = time.monotonic() - start
    assert [g.correct for g in grades] == [False] * len(MALFORMED)
    assert {g.status for g in grades} <= {STATUS_GRADED, STATUS_ERROR, STATUS_TIMEOUT, STATUS_NO_ANSWER}
    # 14 items on 2 workers, each bounded by the 5 s hard limit (plus a restart): generous margin
    assert elapsed < 60.0
    # the grader still works afterwards
    (after,) = grader.grade_responses([r"\boxed{\frac{10}{2}}"], ["5"])
    assert after.correct


def test_hard_timeout_kills_and_replaces_the_worker():
    # no soft limit: only the parent's kill can end 10^{10^{10^{10}}}
    with Grader(GradingSettings(timeout_s=1.5, soft_timeout_s=0)) as g:
        start = time.monotonic()
        grades = g.grade_answers([r"10^{10^{10^{10}}}", "2"], ["5", "2"])
        elapsed = time.monotonic() - start
        assert [(x.correct, x.status) for x in grades] == [(False, STATUS_TIMEOUT), (True, STATUS_GRADED)]
        assert g.restarts == 1
        assert elapsed < 30.0


def test_a_dead_worker_is_replaced():
    with Grader(GradingSettings(timeout_s=5.0, soft_timeout_s=1)) as g:
        assert g.grade_answers(["1"], ["1"])[0].correct
        (pid,) = g.worker_pids()
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        assert g.grade_answers(["3"], ["3"])[0].correct
        assert g.restarts == 1 and g.worker_pids() != [pid]


def test_grading_works_off_the_main_thread(grader):
    # math-verify's own signal timeouts raise ValueError outside the main thread; workers avoid that
    out = {}
    thread = threading.Thread(target=lambda: out.update(g=grader.grade_answers(["0.5"], [r"\frac12"])))
    thread.start()
    thread.join(60)
    assert out["g"][0].correct


def test_duplicate_items_are_graded_once(grader):
    grades = grader.grade_answers(["4", "4", "4", None], ["4", "4", "5", "4"])
    assert [g.correct for g in grades] == [True, True, False, False]


def test_extract_boxed():
    assert extract_boxed(r"\boxed{\frac{a}{\sqrt{b}}} tail") == r"\frac{a}{\sqrt{b}}"
    assert extract_boxed(r"\boxed{1} and \fbox{2}") == "2"
    assert extract_boxed(r"\boxed{\{1\}} x") == r"\{1\}"
    assert extract_boxed(r"\boxed{\}}") == r"\}"
    assert extract_boxed(r"\boxed { 12 }") == "12"
    assert extract_boxed(r"\boxedx{3}") is None
    assert extract_boxed("nothing") is None
    assert extract_boxed(r"\boxed{1} \boxed{2") is None
    assert reference_answer(r"so $\boxed{9}$") == "9" and reference_answer(" 9 ") == "9"


def test_grader_rejects_mismatched_lengths(grader):
    with pytest.raises(ValueError, match="2 answers but 1 references"):
        grader.grade_answers(["1", "2"], ["1"])
    with pytest.raises(ValueError, match="num_workers"):
        GradingSettings(num_workers=0)


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 0, 1, 0.0),
        (4, 4, 1, 1.0),
        (4, 1, 1, 0.25),
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (2, 1, 2, 1.0),  # n == k: any correct sample passes
        (3, 0, 3, 0.0),
    ],
)
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomials_and_validates():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)
    with pytest.raises(ValueError):
        pass_at_k(2, 3, 1)


def test_avg_at_k():
    assert avg_at_k([True, False, False, True]) == 0.5
    assert avg_at_k([False] * 3) == 0.0
    with pytest.raises(ValueError):
        avg_at_k([])


def test_majority_at_k():
    # "3" has two votes against one correct "2"
    assert majority_at_k(["2", "3", "3", None], [True, False, False, False]) == 0.0
    # correct answers vote together however they are written: 2 vs 2, the correct group came first
    assert majority_at_k([r"1/2", r"\frac12", "0.7", "0.7"], [True, True, False, False]) == 1.0
    # the same tie with the wrong group first
    assert majority_at_k(["0.7", "0.7", r"1/2", r"\frac12"], [False, False, True, True]) == 0.0
    # wrong answers group after normalisation: (1,2) twice beats one correct 5
    assert majority_at_k([r"\left(1,2\right)", "(1, 2)", "5"], [False, False, True]) == 0.0
    assert majority_at_k([None, None], [False, False]) == 0.0
    assert majority_at_k([None, "4"], [False, True]) == 1.0
    assert normalize_answer(r"\dfrac{1}{2} \, m") == r"\frac{1}{2}m"
