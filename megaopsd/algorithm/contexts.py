"""Teacher contexts: what the self-teacher reads beside the problem (``teacher.context``).

    context = make_context(cfg.teacher)
    batch = context.apply(rollouts, prompts, rewards, decode=..., teacher_prompt_ids=...)

- ``solution`` (the paper's OPSD): the dataset's reference solution, in the teacher prompt the
  prompt builder rendered when the example was loaded; every rollout trains.
- ``successful_rollout`` (SDPO's successful-rollout self-teacher, arXiv 2601.20802, TRL's
  ``use_successful_as_teacher``): no reference solution is read. For each rollout, another
  rollout of the same prompt that the verifier accepted takes the solution's place in the same
  teacher template (its thinking removed); a rollout whose group has no other success has no
  teacher and stays out of the loss.

The reason-first rationale (``teacher.reason_first``) rewrites the teacher prompts before the
rollouts are sampled (``megaopsd.rollout.reason_first``) and composes with ``solution``.
A context's prompt wording is the teacher template's (``megaopsd.data.prompts``), pinned by
tests/unit/test_contexts.py.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from megaopsd.config import TeacherConfig

_THINKING = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


def strip_thinking(text: str) -> str:
    """The text without ``<think>...</think>`` blocks (an unclosed block: everything after it)."""
    text = _THINKING.sub("", text)
    start = text.find("<think>")
    return (text[:start] if start >= 0 else text).strip()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContextBatch:
    """The rollouts the step trains on, with the teacher prompts the context chose."""

    train: list
    in_loss: list[bool]
    too_long: int = 0  # rollouts whose teacher prompt went over the limit (kept out of the loss)


class TeacherContext:
    """One way of building the teacher's privileged context. Subclasses set ``name``."""

    name: ClassVar[str]
    needs_rewards: ClassVar[bool] = False  # the verifier grades the rollouts first
    needs_groups: ClassVar[bool] = False  # every replica must hold whole prompts (rollout.n >= 2)

    def apply(
        self,
        rollouts: Sequence[Any],
        prompts: Sequence[Any],
        rewards: Sequence[float] | None,
        *,
        decode: Callable[[Sequence[int]], str],
        teacher_prompt_ids: Callable[[str, str], list[int] | None],
    ) -> ContextBatch:
        """The step's training rollouts with their teacher prompts.

        Args:
            rollouts: this replica's rollouts (``prompt_index`` into ``prompts``).
            prompts: the step's prompt pairs (problem, reference solution, prompts).
            rewards: one per rollout when ``needs_rewards``, else None.
            decode: token ids -> text (special tokens skipped).
            teacher_prompt_ids: (problem, privileged text) -> the teacher prompt's ids in the
                run's template, or None when it is over ``data.max_teacher_prompt_tokens``.
        """
        raise NotImplementedError


class ReferenceSolution(TeacherContext):
    name = "solution"

    def apply(self, rollouts, prompts, rewards, *, decode, teacher_prompt_ids):
        return ContextBatch(train=list(rollouts), in_loss=[True] * len(rollouts))


class SuccessfulRollout(TeacherContext):
    name = "successful_rollout"
    needs_rewards = True
    needs_groups = True

    def apply(self, rollouts, prompts, rewards, *, decode, teacher_prompt_ids):
        assert rewards is not None and len(rewards) == len(rollouts)
        successes: dict[int, list[int]] = {}
        for i, (rollout, reward) in enumerate(zip(rollouts, rewards, strict=True)):
            if reward > 0:
                successes.setdefault(rollout.prompt_index, []).append(i)
        train, in_loss, too_long = [], [], 0
        for i, rollout in enumerate(rollouts):
            others = [j for j in successes.get(rollout.prompt_index, []) if j != i]
            ids = None
            if others:  # the first other success, in generation order
                demonstration = strip_thinking(decode(rollouts[others[0]].response_ids))
                ids = teacher_prompt_ids(prompts[rollout.prompt_index].problem, demonstration)
                too_long += ids is None
            train.append(rollout if ids is None else dataclasses.replace(rollout, teacher_prompt_ids=ids))
            in_loss.append(ids is not None)
        return ContextBatch(train=train, in_loss=in_loss, too_long=too_long)


CONTEXTS: dict[str, type[TeacherContext]] = {c.name: c for c in (ReferenceSolution, SuccessfulRollout)}


def make_context(cfg: TeacherConfig) -> TeacherContext:
    """The context ``teacher.context`` names."""
    return CONTEXTS[cfg.context]()
