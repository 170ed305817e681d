"""Paired teacher/student microbatches built from rollouts.

For each rollout the student sequence is ``student prompt + response[:-1]`` and the teacher
sequence is ``teacher prompt + response[:-1]``: the logits at position ``P + j - 1`` predict
response token ``j``, where ``P`` is that stream's prompt length, so the last response token
never needs to be fed. Both streams keep the same sample order, and the flat index maps
below pick, in the same order, the rows of each stream's logits that predict every response
token: after indexing, row ``t`` of the student logits and row ``t`` of the teacher logits score
the same token.

Microbatches are right-padded to their longest member, so the plan sorts the rollouts by
total length (student + teacher sequence) before cutting them at the token budget: similar
lengths share a microbatch and little is padding. ``split_over_data_parallel`` deals the
sorted rollouts to the DP replicas in a snake order, so every replica gets the same count and
about the same number of tokens. Both are deterministic (ties keep rollout order), and the
loss is normalised over the global token count, so neither changes the result.

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

from megaopsd.stages import interleaved_min_microbatches


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
    lengths_B2: torch.Tensor | None = None  # [B, 2] unpadded (student, teacher) sequence lengths
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

    @property
    def padded_tokens(self) -> int:
        """Tokens the two streams feed through the model, padding included."""
        return self.batch_size * (self.student_len + self.teacher_len)

    @property
    def real_tokens(self) -> int:
        """Tokens of the two streams without padding (all padded when lengths are unknown)."""
        return self.padded_tokens if self.lengths_B2 is None else int(self.lengths_B2.sum())

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


def _by_length(rollouts: Sequence[PairedRollout]) -> list[int]:
    """Indices, longest total (student + teacher) sequence first; ties keep their order."""
    return sorted(range(len(rollouts)), key=lambda i: (-sum(_sequence_lengths(rollouts[i])), i))


def split_over_data_parallel(rollouts: Sequence[PairedRollout], dp_size: int, dp_rank: int) -> list:
    """This replica's share: the rollouts sorted by length, dealt in snake order 0..D-1, D-1..0.

    Every replica gets the same count (one more for the first replicas when it does not
    divide) and, pair by pair, one longer and one shorter rollout, so tokens balance too.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside a data-parallel group of {dp_size}")
    mine = []
    for position, index in enumerate(_by_length(rollouts)):
        lap, offset = divmod(position, dp_size)
        if (offset if lap % 2 == 0 else dp_size - 1 - offset) == dp_rank:
            mine.append(rollouts[index])
    return mine


def response_loss_mask(length: int, *, skip_first_tokens: int, in_loss: bool) -> torch.Tensor:
    """Which of a rollout's ``length`` response tokens the loss scores ([length] bool): all but
    its first ``skip_first_tokens``, none when the rollout is out of the loss."""
    return (torch.arange(length) >= skip_first_tokens) & in_loss


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
    lengths_B2 = torch.tensor(lengths, dtype=torch.long).reshape(batch, 2)
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
        mask.append(response_loss_mask(len(response), skip_first_tokens=skip_first_tokens, in_loss=keep))
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
        lengths_B2=lengths_B2,
        advantage_T=None
        if advantages is None
        else torch.tensor([float(advantages[s]) for s in sample_ids for _ in rollouts[s].response_ids]),
    )


def _greedy_cut(lengths: list[tuple[int, int]], max_tokens: int) -> list[int]:
    """Group sizes of the greedy cut (fill each group while it fits) of lengths in order."""
    sizes: list[int] = []
    count = longest_s = longest_t = 0
    for s_len, t_len in lengths:
        new_s, new_t = max(longest_s, s_len), max(longest_t, t_len)
        if count and (count + 1) * (new_s + new_t) > max_tokens:
            sizes.append(count)
            count, new_s, new_t = 0, s_len, t_len
        count, longest_s, longest_t = count + 1, new_s, new_t
    return [*sizes, count] if count else sizes


def _least_padding_cut(lengths: list[tuple[int, int]], max_tokens: int, groups: int) -> list[int]:
    """Group sizes of the contiguous cut into ``groups`` groups with the fewest padded tokens.

    Dynamic programme over cut points: best[g][j] is the least padded size of the first j
    rollouts in g groups. A group may exceed the budget only as a single rollout.
    """
    n, inf = len(lengths), float("inf")
    best = [[inf] * (n + 1) for _ in range(groups + 1)]
    start = [[0] * (n + 1) for _ in range(groups + 1)]
    best[0][0] = 0
    for j in range(1, n + 1):
        longest_s = longest_t = 0
        for i in range(j - 1, -1, -1):  # the group is lengths[i:j]
            longest_s, longest_t = max(longest_s, lengths[i][0]), max(longest_t, lengths[i][1])
            size = (j - i) * (longest_s + longest_t)
            if size > max_tokens and j - i > 1:
                break  # longer groups only grow
            for g in range(1, groups + 1):
                if best[g - 1][i] + size < best[g][j]:
                    best[g][j], start[g][j] = best[g - 1][i] + size, i
    sizes, j = [], n
    for g in range(groups, 0, -1):
        sizes.append(j - start[g][j])
        j = start[g][j]
    return sizes[::-1]


def plan_microbatches(
    rollouts: Sequence[PairedRollout],
    *,
    max_tokens: int,
    pad_multiple: int = 1,
    length_aware: bool = True,
    student_only: bool = False,
) -> list[list[int]]:
    """Cut rollouts into groups whose padded size ``B * (Ls + Lt)`` fits ``max_tokens``.

    ``length_aware`` (default): the rollouts sorted longest first, cut into as few groups as
    the greedy cut needs, at the cut points that leave the least padding. Otherwise the
    greedy cut of the rollouts in their given order (the older plan, kept for comparisons). A
    single rollout larger than the budget still gets a microbatch of its own. The loss is
    normalised over the global token count, so the cut changes cost, never the result.
    """
    for index, rollout in enumerate(rollouts):
        if not rollout.response_ids:
            raise ValueError(f"rollout {index} has an empty response; drop it before building microbatches")
    order = _by_length(rollouts) if length_aware else list(range(len(rollouts)))
    lengths = [
        tuple(_round_up(n, pad_multiple) for n in _sequence_lengths(rollouts[i], student_only)) for i in order
    ]
    sizes = _greedy_cut(lengths, max_tokens)
    if length_aware and len(sizes) > 1:
        sizes = _least_padding_cut(lengths, max_tokens, len(sizes))
    groups, first = [], 0
    for size in sizes:
        groups.append(order[first : first + size])
        first += size
    return groups


def regroup_to_multiple(groups: list[list[int]], multiple: int, minimum: int = 0) -> list[list[int]]:
    """Split (or, if there are too few rollouts, merge) groups until their count is a multiple
    of ``multiple`` and at least ``minimum`` (a multiple of ``multiple``).

    The interleaved pipeline schedule runs microbatches in groups of PP, refuses any other
    count, and needs ``stages.interleaved_min_microbatches`` of them. Splitting halves the
    largest group; merging joins the smallest adjacent pair (which may exceed the token budget,
    the lesser evil). Rollout order is kept.
    """
    total = sum(len(g) for g in groups)
    if total < multiple:
        raise ValueError(f"{total} rollouts cannot fill a multiple of {multiple} microbatches")
    if total < minimum:
        raise ValueError(f"{total} rollouts cannot fill the interleaved schedule's {minimum} microbatches")
    up = max(-(-len(groups) // multiple) * multiple, minimum)
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


def microbatch_count_rule(pp: int, vpp: int | None) -> tuple[int, int]:
    """``(count_multiple, min_count)`` for a step at this pipeline layout (no rule without VPP)."""
    if not vpp:
        return 1, 0
    return pp, interleaved_min_microbatches(pp, vpp)


def build_microbatches(
    rollouts: Sequence[PairedRollout],
    *,
    max_tokens: int,
    pad_id: int,
    pad_multiple: int = 1,
    skip_first_tokens: int = 0,
    count_multiple: int = 1,
    min_count: int = 0,
    length_aware: bool = True,
    student_only: bool = False,
    advantages: Sequence[float] | None = None,
    in_loss: Sequence[bool] | None = None,
) -> list[PairedMicrobatch]:
    """All microbatches of a step: ``plan_microbatches`` then ``build_microbatch`` per group.

    ``count_multiple``, ``min_count``: the number of microbatches must be a multiple of the one
    and at least the other (PP with an interleaved pipeline: ``microbatch_count_rule``).
    ``length_aware``: see ``plan_microbatches``. ``student_only``, ``advantages``, ``in_loss``:
    see ``build_microbatch``.
    """
    if not rollouts:
        raise ValueError(
            "no rollouts for this data-parallel replica; prompts per step must cover every replica"
        )
    groups = plan_microbatches(
        rollouts,
        max_tokens=max_tokens,
        pad_multiple=pad_multiple,
        length_aware=length_aware,
        student_only=student_only,
    )
    if count_multiple > 1 or min_count > len(groups):
        groups = regroup_to_multiple(groups, count_multiple, min_count)
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


def padding_fraction(microbatches: Sequence[PairedMicrobatch]) -> float:
    """Share of the fed (student + teacher) tokens that are padding."""
    padded = sum(mb.padded_tokens for mb in microbatches)
    return 1.0 - sum(mb.real_tokens for mb in microbatches) / padded if padded else 0.0
