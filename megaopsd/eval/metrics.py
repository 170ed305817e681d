"""Sample-level metrics for k responses per problem: pass@k, avg@k and majority@k.

All functions take one problem's samples and return a number in [0, 1]; a benchmark's score
is the mean over its problems.

- ``pass_at_k(n, c, k)``: the chance that at least one of k responses drawn without
  replacement from n graded ones (c correct) is correct, the unbiased estimator of Chen et al.
  2021 (HumanEval): ``1 - C(n-c, k) / C(n, k)``. With n == k it is 1 if any response is correct.
- ``avg_at_k``: the fraction of correct responses (the paper's Avg@k; the expected pass@1).
- ``majority_at_k``: whether the most frequent answer is correct.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

# Spacing and sizing commands that do not change an answer's value.
_COSMETIC = re.compile(r"\\left|\\right|\\[,;:! ]|\\displaystyle|\s+")


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from ``num_samples`` graded responses of which ``num_correct`` are right.

    Raises:
        ValueError: ``k`` outside [1, num_samples] or ``num_correct`` outside [0, num_samples].
    """
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 1 <= k <= num_samples, got k={k}, num_samples={num_samples}")
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct={num_correct} is outside [0, {num_samples}]")
    if num_samples - num_correct < k:
        return 1.0  # every k-subset holds a correct response
    # 1 - prod_{i = n-c+1}^{n} (1 - k / i): the ratio of binomials without huge integers
    miss = math.prod(1.0 - k / i for i in range(num_samples - num_correct + 1, num_samples + 1))
    return 1.0 - miss


def avg_at_k(correct: Sequence[bool]) -> float:
    """The fraction of correct responses.

    Raises:
        ValueError: no responses.
    """
    if not correct:
        raise ValueError("avg@k of zero responses is undefined")
    return sum(bool(c) for c in correct) / len(correct)


def normalize_answer(answer: str) -> str:
    """An answer with spacing and ``\\left``/``\\right`` removed and ``\\dfrac``/``\\tfrac`` as ``\\frac``.

    Only for grouping votes; grading uses math-verify.
    """
    text = _COSMETIC.sub("", answer)
    return text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def majority_at_k(answers: Sequence[str | None], correct: Sequence[bool]) -> float:
    """1.0 if the most common answer among the responses is correct, else 0.0.

    Votes: every correct answer equals the reference, hence each other, so all correct
    responses form one group however they are written; a wrong answer groups with the wrong
    answers that are the same after ``normalize_answer``. Responses without an answer do not
    vote. A tie goes to the group whose first response came first (sample order), so the
    result is deterministic.

    Args:
        answers: each response's extracted answer (None: no answer).
        correct: each response's grade.
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} grades")
    counts: dict[str, int] = {}  # insertion order = first appearance
    for answer, ok in zip(answers, correct):
        if answer is None:
            continue
        group = "\0correct" if ok else normalize_answer(answer)
        counts[group] = counts.get(group, 0) + 1
    if not counts:
        return 0.0
    winner = max(counts, key=counts.__getitem__)  # max keeps the first of equal counts
    return 1.0 if winner == "\0correct" else 0.0
