"""Paired teacher/student microbatches built from rollouts.

For each rollout the student sequence is ``student prompt + response[:-1]`` and the teacher
sequence is ``teacher prompt + response[:-1]``: the logits at position ``P + j - 1`` predict
response token ``j``, where ``P`` is that stream's prompt length, so the last response token
never needs to be fed. Both streams keep the same sample order, and the flat index maps
below pick, in the same order, the rows of each stream's logits that predict every response
token: after indexing, row ``t`` of the student logits and row ``t`` of the teacher logits score
the same token.

Student-only microbatches (GRPO, SFT: ``student_only=True``) carry an empty teacher stream
(``Lt == 0``): the forward step then runs no teacher at all. GRPO's per-token advantages and
per-rollout loss switches ride along in the same record.

Shapes: B samples in a microbatch, Ls / Lt padded student / teacher lengths, T response tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import torch


class PairedRollout(Protocol):
    """What a paired microbatch needs from a rollout (``megaopsd.rollout.Rollout`` has it)."""

    student_prompt_ids: Sequence[int]
    teacher_prompt_ids: Sequence[int]
    response_ids: Sequence[int]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairedMicrobatch:
    """One microbatch carrying both streams for the same responses."""

    student_tokens_BL: torch.Tensor  # [B, Ls] int64, right-padded
    teacher_tokens_BL: torch.Tensor  # [B, Lt] int64, right-padded
    student_index_T: torch.Tensor  # [T] rows of the flattened [B*Ls] student logits
    teacher_index_T: torch.Tensor  # [T] rows of the flattened [B*Lt] teacher logits
    target_ids_T: torch.Tensor  # [T] the response tokens being scored
    loss_mask_T: torch.Tensor  # [T] bool; False for response tokens left out of the loss
    sample_T: torch.Tensor  # [T] index (in the list given to build_microbatch) of each token's rollout
    engine_logprobs_T: torch.Tensor | None = None  # [T] the rollout engine's raw logprobs, if known
    advantage_T: torch.Tensor | None = None  # [T] float32 GRPO advantage of each token's rollout

    @property
    def batch_size(self) -> int:
        return self.student_tokens_BL.shape[0]

    @property
    def student_len(self) -> int:
        return self.student_tokens_BL.shape[1]

    @property
    def teacher_len(self) -> int:
        return self.teacher_tokens_BL.shape[1]

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask_T.sum())

    @staticmethod
    def position_ids(tokens_BL: torch.Tensor) -> torch.Tensor:
        """Positions restart at 0 for every sequence (rope; learned positions would need it too)."""
        batch, length = tokens_BL.shape
        return torch.arange(length, device=tokens_BL.device).unsqueeze(0).expand(batch, length)

    def to(self, device: torch.device) -> PairedMicrobatch:
        """The same microbatch with every tensor on ``device`` (itself when already there)."""
        if self.student_tokens_BL.device == device:
            return self
        moved = {
            field.name: None if value is None else value.to(device, non_blocking=True)
            for field in dataclasses.fields(self)
            for value in [getattr(self, field.name)]
        }
        return PairedMicrobatch(**moved)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _sequence_lengths(rollout: PairedRollout, student_only: bool = False) -> tuple[int, int]:
    response = len(rollout.response_ids)
    teacher = 0 if student_only else len(rollout.teacher_prompt_ids) + response - 1
    return len(rollout.student_prompt_ids) + response - 1, teacher


def build_microbatch(
    rollouts: Sequence[PairedRollout],
    sample_ids: Sequence[int],
    *,
    pad_id: int,
    pad_multiple: int = 1,
    skip_first_tokens: int = 0,
    student_only: bool = False,
    advantages: Sequence[float] | None = None,
    in_loss: Sequence[bool] | None = None,
) -> PairedMicrobatch:
    """Pad the two streams of ``rollouts[i] for i in sample_ids`` and build the index maps.

    Args:
        rollouts: all rollouts of the step (indices in ``sample_T`` refer to this list).
        sample_ids: which rollouts go into this microbatch.
        pad_id: token id used for right padding (padded positions are never scored).
        pad_multiple: round both lengths up to this (TP size with sequence parallel).
        skip_first_tokens: leave the first k response tokens of every rollout out of the loss.
        student_only: build no teacher stream (``Lt == 0``; GRPO without a reference, SFT).
        advantages: one advantage per rollout of ``rollouts`` (GRPO), spread over its tokens.
        in_loss: per rollout of ``rollouts``; False masks all its tokens out of the loss.
    """
    lengths = [_sequence_lengths(rollouts[i], student_only) for i in sample_ids]
    student_len = _round_up(max(s for s, _ in lengths), pad_multiple)
    teacher_len = _round_up(max(t for _, t in lengths), pad_multiple)
    batch = len(sample_ids)
    student = torch.full((batch, student_len), pad_id, dtype=torch.long)
    teacher = torch.full((batch, teacher_len), pad_id, dtype=torch.long)
    student_index, teacher_index, targets, mask, owner, engine = [], [], [], [], [], []
    for row, sample in enumerate(sample_ids):
        rollout = rollouts[sample]
        response = list(rollout.response_ids)
        s_prompt, t_prompt = list(rollout.student_prompt_ids), list(rollout.teacher_prompt_ids)
        s_seq, t_seq = s_prompt + response[:-1], t_prompt + response[:-1]
        student[row, : len(s_seq)] = torch.tensor(s_seq, dtype=torch.long)
        positions = torch.arange(len(response))
        student_index.append(row * student_len + len(s_prompt) - 1 + positions)
        if not student_only:
            teacher[row, : len(t_seq)] = torch.tensor(t_seq, dtype=torch.long)
            teacher_index.append(row * teacher_len + len(t_prompt) - 1 + positions)
        targets.append(torch.tensor(response, dtype=torch.long))
        keep = in_loss is None or in_loss[sample]
        mask.append((positions >= skip_first_tokens) & keep)
        owner.append(torch.full((len(response),), sample, dtype=torch.long))
        engine.append(getattr(rollout, "engine_logprobs", None))
    return PairedMicrobatch(
        student_tokens_BL=student,
        teacher_tokens_BL=teacher,
        student_index_T=torch.cat(student_index),
        teacher_index_T=torch.cat(teacher_index) if teacher_index else torch.zeros(0, dtype=torch.long),
        target_ids_T=torch.cat(targets),
        loss_mask_T=torch.cat(mask),
        sample_T=torch.cat(owner),
        engine_logprobs_T=None
        if any(lp is None for lp in engine)
        else torch.tensor([lp for row in engine for lp in row], dtype=torch.float32),
        advantage_T=None
        if advantages is None
        else torch.tensor([float(advantages[s]) for s in sample_ids for _ in rollouts[s].response_ids]),
    )


def plan_microbatches(
    rollouts: Sequence[PairedRollout], *, max_tokens: int, pad_multiple: int = 1, student_only: bool = False
) -> list[list[int]]:
    """Cut rollouts (in order) into groups whose padded size ``B * (Ls + Lt)`` fits ``max_tokens``.

    A single rollout larger than the budget still gets a microbatch of its own. The loss is
    normalised over the global token count, so the cut changes cost, never the result.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    longest_s = longest_t = 0
    for index, rollout in enumerate(rollouts):
        if not rollout.response_ids:
            raise ValueError(f"rollout {index} has an empty response; drop it before building microbatches")
        s_len, t_len = _sequence_lengths(rollout, student_only)
        new_s = _round_up(max(longest_s, s_len), pad_multiple)
        new_t = _round_up(max(longest_t, t_len), pad_multiple)
        if current and (len(current) + 1) * (new_s + new_t) > max_tokens:
            groups.append(current)
            current, new_s, new_t = [], _round_up(s_len, pad_multiple), _round_up(t_len, pad_multiple)
        current.append(index)
        longest_s, longest_t = new_s, new_t
    if current:
        groups.append(current)
    return groups


def regroup_to_multiple(groups: list[list[int]], multiple: int) -> list[list[int]]:
    """Split (or, if there are too few rollouts, merge) groups until their count is a multiple.

    The interleaved pipeline schedule runs microbatches in groups of PP and refuses any other
    count. Splitting halves the largest group; merging joins the smallest adjacent pair (which
    may exceed the token budget, the lesser evil). Rollout order is kept.
    """
    total = sum(len(g) for g in groups)
    if total < multiple:
        raise ValueError(f"{total} rollouts cannot fill a multiple of {multiple} microbatches")
    up = -(-len(groups) // multiple) * multiple
    target = up if up <= total else up - multiple
    groups = [list(g) for g in groups]
    while len(groups) < target:
        i = max(range(len(groups)), key=lambda k: len(groups[k]))
        half = len(groups[i]) // 2
        groups[i : i + 1] = [groups[i][:half], groups[i][half:]]
    while len(groups) > target:
        i = min(range(len(groups) - 1), key=lambda k: len(groups[k]) + len(groups[k + 1]))
        groups[i : i + 2] = [groups[i] + groups[i + 1]]
    return groups


def build_microbatches(
    rollouts: Sequence[PairedRollout],
    *,
    max_tokens: int,
    pad_id: int,
    pad_multiple: int = 1,
    skip_first_tokens: int = 0,
    count_multiple: int = 1,
    student_only: bool = False,
    advantages: Sequence[float] | None = None,
    in_loss: Sequence[bool] | None = None,
) -> list[PairedMicrobatch]:
    """All microbatches of a step: ``plan_microbatches`` then ``build_microbatch`` per group.

    ``count_multiple``: the number of microbatches must be a multiple of this (PP with an
    interleaved pipeline). ``student_only``, ``advantages``, ``in_loss``: see ``build_microbatch``.
    """
    if not rollouts:
        raise ValueError(
            "no rollouts for this data-parallel replica; prompts per step must cover every replica"
        )
    groups = plan_microbatches(
        rollouts, max_tokens=max_tokens, pad_multiple=pad_multiple, student_only=student_only
    )
    if count_multiple > 1:
        groups = regroup_to_multiple(groups, count_multiple)
    return [
        build_microbatch(
            rollouts,
            group,
            pad_id=pad_id,
            pad_multiple=pad_multiple,
            skip_first_tokens=skip_first_tokens,
            student_only=student_only,
            advantages=advantages,
            in_loss=in_loss,
        )
        for group in groups
    ]
