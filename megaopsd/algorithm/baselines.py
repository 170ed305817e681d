"""What GRPO and SFT put into a step, before the schedule: rewards, groups, reference responses.

    batch = grpo_batch(rollouts, prompts, grader, tokenizer, cfg.algorithm, with_reference=...)
    train on batch.rollouts with batch.advantages and batch.in_loss
    references = reference_responses(prompts[mine], tokenizer, max_tokens=...)   # SFT

GRPO: the reward of a response is 1 when the last ``\\boxed{}`` of its text is graded correct by
math-verify against the reference solution's last box (the project's ``Grader``, in killable
worker processes, so no pathological answer stalls a step), else 0. Groups are the ``n``
responses to one prompt; a replica always holds whole groups (``trainer.prompts_per_step`` is a
multiple of the data-parallel size for GRPO).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from megaopsd.algorithm.grpo import group_advantages, groups_to_keep
from megaopsd.config import AlgorithmConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class GrpoBatch:
    """This replica's GRPO training rollouts and the counts its metrics need.

    Attributes:
        rollouts: the rollouts to train on (dynamic sampling removed the uniform groups; when
            none is left a single masked-out rollout keeps the replica in the schedule).
        advantages: one per rollout of ``rollouts``.
        in_loss: one per rollout of ``rollouts``; False for a masked-out placeholder.
        counts: reward sum, correct count, rollouts, groups, kept groups (this replica).
    """

    rollouts: list[Any]
    advantages: list[float]
    in_loss: list[bool]
    counts: tuple[float, float, float, float, float]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReferenceResponse:
    """An SFT example in the shape the microbatch builder reads (no engine logprobs)."""

    prompt_index: int
    student_prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    response_ids: list[int]
    engine_logprobs: None = None
    finish_reason: str = "stop"


def rewards_of(rollouts: Sequence[Any], prompts: Sequence[Any], grader: Any, tokenizer: Any) -> list[float]:
    """1.0 for each rollout whose last boxed answer math-verify accepts, else 0.0."""
    texts = [tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in rollouts]
    references = [prompts[r.prompt_index].solution for r in rollouts]
    return [1.0 if grade.correct else 0.0 for grade in grader.grade_responses(texts, references)]


def grpo_batch(
    rollouts: Sequence[Any],
    rewards: Sequence[float],
    cfg: AlgorithmConfig,
    *,
    with_reference: bool,
    min_rollouts: int = 1,
) -> GrpoBatch:
    """Advantages per group, dynamic sampling, and (for the KL reference) the student prompt twice.

    Args:
        rollouts: this replica's rollouts (whole groups).
        rewards: one per rollout.
        cfg: the algorithm section (std switch, dynamic sampling).
        with_reference: the reference model scores the response after the STUDENT prompt: the
            teacher sequence is replaced by the student's.
        min_rollouts: keep at least this many rollouts (masked out if from dropped groups), so
            the replica still runs its part of the schedule (PP with an interleaved schedule
            needs ``pp`` microbatches).
    """
    groups = [r.prompt_index for r in rollouts]
    advantages = group_advantages(rewards, groups, normalize_std=cfg.normalize_std)
    all_groups = set(groups)
    kept = groups_to_keep(rewards, groups) if cfg.dynamic_sampling is not False else all_groups
    order = [i for i, g in enumerate(groups) if g in kept]
    in_loss = [True] * len(order)
    if len(order) < min_rollouts:
        extra = [i for i in range(len(rollouts)) if i not in set(order)][: min_rollouts - len(order)]
        order += extra
        in_loss += [False] * len(extra)
    chosen = [rollouts[i] for i in order]
    if with_reference:
        chosen = [dataclasses.replace(r, teacher_prompt_ids=list(r.student_prompt_ids)) for r in chosen]
    counts = (
        float(sum(rewards)),
        float(sum(1 for r in rewards if r > 0)),
        float(len(rollouts)),
        float(len(all_groups)),
        float(len(kept)),
    )
    return GrpoBatch(
        rollouts=chosen, advantages=[advantages[i] for i in order], in_loss=in_loss, counts=counts
    )


def reference_responses(
    prompts: Sequence[Any],
    first_index: int,
    tokenizer: Any,
    *,
    max_tokens: int,
    with_teacher_prompt: bool = False,
) -> list[ReferenceResponse]:
    """The reference solution, tokenised and ended with EOS, as the response to each student prompt.

    Args:
        prompts: this replica's prompts (``PromptPair``).
        first_index: the global index of ``prompts[0]`` in the step's batch.
        tokenizer: the model's tokenizer.
        max_tokens: longest response kept (longer solutions are cut, EOS dropped: like a
            truncated rollout).
        with_teacher_prompt: also the same response after the TEACHER prompt (in the student
            stream), right after each student example (``algorithm.sft_prompts=both``).
    """
    out = []
    for offset, prompt in enumerate(prompts):
        ids = list(tokenizer.encode(prompt.solution, add_special_tokens=False))
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        contexts = [prompt.student_prompt_ids]
        if with_teacher_prompt:
            contexts.append(prompt.teacher_prompt_ids)
        for context in contexts:
            out.append(
                ReferenceResponse(
                    prompt_index=first_index + offset,
                    student_prompt_ids=list(context),
                    teacher_prompt_ids=[],
                    response_ids=ids[:max_tokens],
                    finish_reason="stop" if len(ids) <= max_tokens else "length",
                )
            )
    return out
