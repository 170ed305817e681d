"""Rollouts: the engine interface, the vLLM engine, weight sync and the mismatch metric.

Importing this package does not import vLLM; ``VllmEngine(...)`` does, when it is created.
"""

from megaopsd.rollout.engine import RolloutEngine, generate_rollouts
from megaopsd.rollout.metrics import logprob_abs_diff
from megaopsd.rollout.types import Completion, EngineSettings, Rollout, SamplingSettings, request_seed
from megaopsd.rollout.vllm_engine import VllmEngine
from megaopsd.rollout.weight_sync import (
    DirectoryTransport,
    InMemoryTransport,
    WeightSyncStats,
    WeightTransport,
    iter_buckets,
    order_by_module,
    sync_weights,
)

__all__ = [
    "Completion",
    "DirectoryTransport",
    "EngineSettings",
    "InMemoryTransport",
    "Rollout",
    "RolloutEngine",
    "SamplingSettings",
    "VllmEngine",
    "WeightSyncStats",
    "WeightTransport",
    "generate_rollouts",
    "iter_buckets",
    "logprob_abs_diff",
    "order_by_module",
    "request_seed",
    "sync_weights",
]
