"""Paired microbatches: padding, index maps that line up both streams, token-budget cuts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megaopsd.algorithm.batch import build_microbatch, build_microbatches, plan_microbatches


@dataclasses.dataclass
class R:
    student_prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    response_ids: list[int]


ROLLOUTS = [
    R([1, 2, 3], [1, 9, 9, 9, 2, 3], [40, 41, 42]),
    R([5, 6], [5, 8, 6], [50]),
    R([7, 7, 7, 7], [7, 7], [60, 61, 62, 63, 64]),
]


def test_index_maps_point_at_the_predicting_position():
    mb = build_microbatch(ROLLOUTS, [0, 1, 2], pad_id=0)
    # sequences are prompt + response[:-1]; lengths 5, 2, 8 (student) and 8, 3, 6 (teacher)
    assert mb.student_tokens_BL.shape == (3, 8) and mb.teacher_tokens_BL.shape == (3, 8)
    assert mb.student_tokens_BL[0].tolist() == [1, 2, 3, 40, 41, 0, 0, 0]
    assert mb.teacher_tokens_BL[2].tolist() == [7, 7, 60, 61, 62, 63, 0, 0]
    assert mb.target_ids_T.tolist() == [40, 41, 42, 50, 60, 61, 62, 63, 64]
    assert mb.sample_T.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2]
    s_flat, t_flat = mb.student_tokens_BL.flatten(), mb.teacher_tokens_BL.flatten()
    # The predicting position holds the token just before the target, in both streams.
    previous = [3, 40, 41, 6, 7, 60, 61, 62, 63]
    assert s_flat[mb.student_index_T].tolist() == previous
    prev_teacher = [3, 40, 41, 6, 7, 60, 61, 62, 63]
    assert t_flat[mb.teacher_index_T].tolist() == prev_teacher
    assert mb.loss_mask_T.all() and mb.num_loss_tokens == 9


def test_skip_first_tokens_and_pad_multiple():
    mb = build_microbatch(ROLLOUTS, [0, 2], pad_id=-1, pad_multiple=4, skip_first_tokens=2)
    assert mb.student_len % 4 == 0 and mb.teacher_len % 4 == 0
    assert mb.loss_mask_T.tolist() == [False, False, True, False, False, True, True, True]
    assert mb.num_loss_tokens == 4


def test_positions_restart_per_sequence():
    mb = build_microbatch(ROLLOUTS, [1, 2], pad_id=0)
    pos = mb.position_ids(mb.student_tokens_BL)
    assert pos.shape == mb.student_tokens_BL.shape and pos[1].tolist() == list(range(mb.student_len))


def test_token_budget_cuts_in_order_and_covers_everything():
    many = ROLLOUTS * 5
    groups = plan_microbatches(many, max_tokens=40)
    assert [i for g in groups for i in g] == list(range(len(many)))
    for group in groups:
        mb = build_microbatch(many, group, pad_id=0)
        assert len(group) == 1 or mb.batch_size * (mb.student_len + mb.teacher_len) <= 40
    assert len(plan_microbatches(many, max_tokens=10**6)) == 1
    assert len(plan_microbatches(many, max_tokens=1)) == len(many)  # oversize samples still run
    mbs = build_microbatches(many, max_tokens=40, pad_id=0)
    assert sum(mb.num_loss_tokens for mb in mbs) == sum(len(r.response_ids) for r in many)
    assert torch.equal(
        torch.cat([mb.target_ids_T for mb in mbs]), torch.tensor([t for r in many for t in r.response_ids])
    )


def test_empty_response_is_rejected():
    with pytest.raises(ValueError, match="rollout 1 has an empty response"):
        plan_microbatches([ROLLOUTS[0], R([1], [1], [])], max_tokens=100)


def test_regroup_reaches_a_multiple_of_the_pipeline_size():
    from megaopsd.algorithm.batch import regroup_to_multiple

    assert regroup_to_multiple([[0, 1, 2, 3], [4]], 4) == [[0], [1], [2, 3], [4]]
    assert regroup_to_multiple([[0], [1], [2], [3], [4]], 2) == [[0, 1], [2], [3], [4]]
    assert regroup_to_multiple([[0, 1], [2, 3]], 2) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="cannot fill a multiple of 4"):
        regroup_to_multiple([[0, 1, 2]], 4)
    mbs = build_microbatches(ROLLOUTS * 2, max_tokens=10**6, pad_id=0, count_multiple=4)
    assert len(mbs) == 4 and sum(mb.batch_size for mb in mbs) == 6
    with pytest.raises(ValueError, match="no rollouts for this data-parallel replica"):
        build_microbatches([], max_tokens=100, pad_id=0)
