"""Paired microbatches: padding, index maps that line up both streams, token-budget cuts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megaopsd.algorithm.batch import (
    build_microbatch,
    build_microbatches,
    microbatch_count_rule,
    padding_fraction,
    plan_microbatches,
    split_over_data_parallel,
)


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


def test_token_budget_cuts_longest_first_and_covers_everything():
    many = ROLLOUTS * 5
    # total lengths 13 / 5 / 14 per copy: the 14s first, then the 13s, then the 5s (ties in order)
    expected = list(range(2, 15, 3)) + list(range(0, 15, 3)) + list(range(1, 15, 3))
    groups = plan_microbatches(many, max_tokens=40)
    assert [i for g in groups for i in g] == expected
    in_order = plan_microbatches(many, max_tokens=40, length_aware=False)
    assert [i for g in in_order for i in g] == list(range(len(many)))
    for group in groups:
        mb = build_microbatch(many, group, pad_id=0)
        assert len(group) == 1 or mb.batch_size * (mb.student_len + mb.teacher_len) <= 40
    assert len(plan_microbatches(many, max_tokens=10**6)) == 1
    assert len(plan_microbatches(many, max_tokens=1)) == len(many)  # oversize samples still run
    mbs = build_microbatches(many, max_tokens=40, pad_id=0)
    assert sum(mb.num_loss_tokens for mb in mbs) == sum(len(r.response_ids) for r in many)
    assert torch.equal(
        torch.cat([mb.target_ids_T for mb in mbs]),
        torch.tensor([t for i in expected for t in many[i].response_ids]),
    )


def test_padding_fraction_counts_unpadded_tokens():
    mb = build_microbatch(ROLLOUTS, [0, 1, 2], pad_id=0)
    # student 5 + 2 + 8, teacher 8 + 3 + 6 real tokens in 3 x (8 + 8) slots
    assert mb.real_tokens == 32 and mb.padded_tokens == 48
    assert padding_fraction([mb]) == pytest.approx(1 - 32 / 48)


def test_data_parallel_split_is_snake_ordered_and_balanced():
    rollouts = [R([0] * n, [0] * n, [1]) for n in (3, 9, 1, 7, 5, 8, 2, 6)]
    shares = [split_over_data_parallel(rollouts, 2, rank) for rank in range(2)]
    lengths = [[len(r.student_prompt_ids) for r in share] for share in shares]
    # sorted 9 8 7 6 5 3 2 1 dealt 0 1 1 0 0 1 1 0
    assert lengths == [[9, 6, 5, 1], [8, 7, 3, 2]]
    assert sorted(r for share in shares for r in map(id, share)) == sorted(map(id, rollouts))
    with pytest.raises(ValueError, match="outside a data-parallel group"):
        split_over_data_parallel(rollouts, 2, 2)


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
    # PP2 x VPP2: one group would do, the interleaved schedule needs 4 (a steady phase per stage)
    multiple, minimum = microbatch_count_rule(2, 2)
    mbs = build_microbatches(
        ROLLOUTS * 2, max_tokens=10**6, pad_id=0, count_multiple=multiple, min_count=minimum
    )
    assert (multiple, minimum, len(mbs)) == (2, 4, 4) and sum(mb.batch_size for mb in mbs) == 6
    assert microbatch_count_rule(2, None) == (1, 0)
    with pytest.raises(ValueError, match="cannot fill the interleaved schedule's 4 microbatches"):
        regroup_to_multiple([[0, 1, 2]], 2, 4)
    with pytest.raises(ValueError, match="no rollouts for this data-parallel replica"):
        build_microbatches([], max_tokens=100, pad_id=0)


def _recorded_demo_steps() -> list[list[R]]:
    """Rollout lengths of the demo recipe (tools/record_rollout_lengths.py, recipe=tiny_cpu)."""
    import json
    from pathlib import Path

    data = json.loads((Path(__file__).parents[1] / "fixtures" / "demo_rollout_lengths.json").read_text())
    return [[R([0] * s, [0] * t, [1] * r) for s, t, r in step] for step in data["steps"]]


def test_length_aware_plan_halves_padding_on_the_demo_lengths():
    budget = 1024  # trainer.microbatch_tokens of the tiny_cpu recipe
    totals = {True: [0, 0], False: [0, 0]}
    for rollouts in _recorded_demo_steps():
        for aware in (True, False):
            mbs = build_microbatches(rollouts, max_tokens=budget, pad_id=0, length_aware=aware)
            assert sum(mb.batch_size for mb in mbs) == len(rollouts)
            assert all(mb.batch_size == 1 or mb.padded_tokens <= budget for mb in mbs)
            totals[aware][0] += sum(mb.real_tokens for mb in mbs)
            totals[aware][1] += sum(mb.padded_tokens for mb in mbs)
    old = 1 - totals[False][0] / totals[False][1]
    new = 1 - totals[True][0] / totals[True][1]
    assert totals[True][0] == totals[False][0]  # the same real tokens either way
    assert new <= 0.5 * old, (new, old)


def test_least_padding_cut_keeps_the_greedy_count_and_never_pads_more():
    import random

    from megaopsd.algorithm.batch import _by_length, _greedy_cut, _sequence_lengths

    rng = random.Random(7)
    for _ in range(50):
        rollouts = [
            R([0] * rng.randint(1, 40), [0] * rng.randint(1, 120), [1] * rng.randint(1, 60))
            for _ in range(rng.randint(2, 24))
        ]
        budget = rng.choice([150, 300, 600])
        ordered = [_sequence_lengths(rollouts[i]) for i in _by_length(rollouts)]
        greedy_sizes = _greedy_cut(ordered, budget)
        groups = plan_microbatches(rollouts, max_tokens=budget)
        assert len(groups) == len(greedy_sizes)
        assert sorted(i for g in groups for i in g) == list(range(len(rollouts)))
        mbs = [build_microbatch(rollouts, g, pad_id=0) for g in groups]
        assert all(mb.batch_size == 1 or mb.padded_tokens <= budget for mb in mbs)
        greedy_padded, first = 0, 0
        for size in greedy_sizes:
            part = ordered[first : first + size]
            greedy_padded += size * (max(s for s, _ in part) + max(t for _, t in part))
            first += size
        assert sum(mb.padded_tokens for mb in mbs) <= greedy_padded
