"""Engine placement, prompt dispatch and the sleep/wake phase order, without vLLM.

vLLM's sleep mode runs on CUDA only, so the phase order is checked against a recording double
(``RecordingEngine``, named as such): it records the calls the fleet makes and returns fixed
completions. The real engines run in tests/e2e (colocated trainer runs, tests/e2e/test_fleet.py).
"""

from __future__ import annotations

import pytest

from megaopsd.data.prompts import PromptPair
from megaopsd.rollout.fleet import EngineFleet, EngineLayout, plan_dispatch, split_evenly
from megaopsd.rollout.types import Completion, SamplingSettings
from megaopsd.rollout.weight_sync import WeightSyncStats


def test_split_evenly_is_contiguous_and_balanced():
    assert split_evenly(8, 2) == [range(0, 4), range(4, 8)]
    assert split_evenly(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    assert split_evenly(1, 2) == [range(0, 1), range(1, 1)]


def test_layout_maps_ranks_to_engines():
    colocated = EngineLayout(placement="colocated", world_size=4, engine_tp=2)
    assert colocated.num_engines == 2
    assert [colocated.engine_of(r) for r in range(4)] == [0, 0, 1, 1]
    assert [colocated.leader(e) for e in range(2)] == [0, 2]
    rank0 = EngineLayout(placement="rank0", world_size=4)
    assert rank0.num_engines == 1 and [rank0.engine_of(r) for r in range(4)] == [0, None, None, None]
    with pytest.raises(ValueError, match="does not divide"):
        EngineLayout(placement="colocated", world_size=4, engine_tp=3)


@pytest.mark.parametrize(
    ("world", "engine_tp", "replica_of_rank", "dp", "blocks", "within"),
    [
        # DP2, engine TP1: each engine generates exactly its own replica's half
        (2, 1, [0, 1], 2, [range(0, 4), range(4, 8)], True),
        # TP2 (or PP2) x DP1, two engines: split the replica's prompts, exchange inside it
        (2, 1, [0, 0], 1, [range(0, 4), range(4, 8)], True),
        # TP2 x DP2 with megatron's rank order (tp fastest), engine TP1: two engines per replica
        (4, 1, [0, 0, 1, 1], 2, [range(0, 2), range(2, 4), range(4, 6), range(6, 8)], True),
        # PP2 x DP2 (rank = dp + 2 * pp): replicas interleave; engine TP1 still local
        (4, 1, [0, 1, 0, 1], 2, [range(0, 2), range(4, 6), range(2, 4), range(6, 8)], True),
        # one engine spanning both replicas: every rank gets all, keeps its slice
        (2, 2, [0, 1], 2, [range(0, 8)], False),
    ],
)
def test_dispatch_prefers_each_replicas_own_engines(world, engine_tp, replica_of_rank, dp, blocks, within):
    layout = EngineLayout(placement="colocated", world_size=world, engine_tp=engine_tp)
    plan = plan_dispatch(8, layout, replica_of_rank, dp)
    assert list(plan.blocks) == blocks and plan.within_replica is within
    for engine, block in enumerate(plan.blocks):
        ranks = [r for r in range(world) if layout.engine_of(r) == engine]
        if within:  # the engine's prompts lie in the slice its replica trains on
            replica = replica_of_rank[ranks[0]]
            assert set(block) <= set(range(replica * 8 // dp, (replica + 1) * 8 // dp))


def test_dispatch_rank0_goes_over_the_world():
    plan = plan_dispatch(8, EngineLayout(placement="rank0", world_size=2), [0, 1], 2)
    assert list(plan.blocks) == [range(0, 8)] and not plan.within_replica


class RecordingEngine:
    """A recording double of a rollout engine (vLLM sleep mode needs CUDA): logs each call."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def generate(self, prompt_ids, sampling, *, step=0, first_prompt_index=0, progress=None):
        self.calls.append(("generate", len(prompt_ids), step, first_prompt_index))
        return [
            [Completion(response_ids=[7], engine_logprobs=[-1.0], finish_reason="stop")] * sampling.n
            for _ in prompt_ids
        ]

    def update_weights(self, weights):
        count = sum(1 for _ in weights)
        self.calls.append(("update_weights", count))
        return WeightSyncStats(transport="recording", seconds=0.0, bytes=0, tensors=count, buckets=1)

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", None if tags is None else tuple(tags)))

    def close(self):
        self.calls.append(("close",))


def _pairs(count: int) -> list[PromptPair]:
    return [
        PromptPair(
            example_id=f"f:{i}",
            problem="p",
            solution="s",
            student_prompt_text="",
            teacher_prompt_text="",
            student_prompt_ids=[i, 1],
            teacher_prompt_ids=[i, 2],
        )
        for i in range(count)
    ]


def _fleet(engine, sleep_level: int) -> EngineFleet:
    layout = EngineLayout(placement="single", world_size=1)
    return EngineFleet(
        engine, layout, rank=0, replica_of_rank=[0], dp_rank=0, dp_size=1, sleep_level=sleep_level
    )


def test_phase_order_sleep_after_generation_wake_weights_then_kv_cache():
    engine = RecordingEngine()
    fleet = _fleet(engine, sleep_level=1)
    rollouts = fleet.rollouts(_pairs(3), SamplingSettings(n=2), step=4)
    assert [r.prompt_index for r in rollouts] == [0, 0, 1, 1, 2, 2]
    fleet.update_weights(iter([("a", None), ("b", None)]))
    fleet.rollouts(_pairs(3), SamplingSettings(), step=5)
    fleet.rollouts(_pairs(3), SamplingSettings(), step=6)  # no sync between: wake everything first
    fleet.close()
    assert engine.calls == [
        ("generate", 3, 4, 0),
        ("sleep", 1),
        ("wake_up", ("weights",)),
        ("update_weights", 2),
        ("wake_up", ("kv_cache",)),
        ("generate", 3, 5, 0),
        ("sleep", 1),
        ("wake_up", None),
        ("generate", 3, 6, 0),
        ("sleep", 1),
        ("close",),
    ]


def test_sleep_level_two_needs_a_sync_and_level_zero_never_sleeps():
    engine = RecordingEngine()
    fleet = _fleet(engine, sleep_level=2)
    fleet.rollouts(_pairs(1), SamplingSettings(), step=1)
    assert fleet.needs_weights
    with pytest.raises(RuntimeError, match="sleep_level=1"):
        fleet.rollouts(_pairs(1), SamplingSettings(), step=2)
    fleet.update_weights(iter([]))
    assert not fleet.needs_weights
    awake = RecordingEngine()
    _fleet(awake, sleep_level=0).generate([[1], [2]], SamplingSettings(), step=0, first_prompt_index=3)
    assert awake.calls == [("generate", 2, 0, 3)]
