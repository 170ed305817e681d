"""Rollout API without an engine: lazy vLLM import, seeds, settings, the mismatch metric, pairing."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch

from megaopsd.config import RolloutConfig
from megaopsd.data.prompts import PromptPair
from megaopsd.rollout import (
    Completion,
    EngineSettings,
    SamplingSettings,
    generate_rollouts,
    logprob_abs_diff,
    request_seed,
)


def test_importing_rollout_does_not_import_vllm():
    code = "import sys, megaopsd.rollout, megaopsd.data; print('vllm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_request_seeds_are_deterministic_distinct_and_in_range():
    seeds = {(s, i): request_seed(7, s, i) for s in range(4) for i in range(256)}
    assert request_seed(7, 2, 5) == seeds[(2, 5)]
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= v < 2**62 for v in seeds.values())
    # vLLM seeds the j-th of n samples with seed + j: neighbours must not overlap
    ordered = sorted(seeds.values())
    assert min(b - a for a, b in itertools.pairwise(ordered)) > 1000
    assert request_seed(8, 2, 5) != seeds[(2, 5)]


def test_settings_from_config():
    cfg = RolloutConfig(
        temperature=1.1, top_p=0.95, top_k=20, n=4, max_new_tokens=64, kv_cache_gib=0.5, seed=9
    )
    sampling = SamplingSettings.from_config(cfg)
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.n) == (1.1, 0.95, 20, 4)
    assert (sampling.max_new_tokens, sampling.seed, sampling.stop_token_ids) == (64, 9, None)
    assert SamplingSettings.from_config(cfg, temperature=0.0, n=1).temperature == 0.0
    engine = EngineSettings.from_config("/m", cfg, in_process=False)
    assert (engine.kv_cache_bytes, engine.max_model_len, engine.seed) == (1 << 29, 4096, 9)
    assert (engine.in_process, engine.weight_transport) == (False, "auto")
    with pytest.raises(ValueError, match="needs in_process=True"):
        EngineSettings(model_path="/m", in_process=False, weight_transport="memory")
    with pytest.raises(ValueError, match="use one of auto, memory, directory"):
        EngineSettings(model_path="/m", weight_transport="nccl")


def test_logprob_abs_diff():
    engine = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    student = torch.tensor([[-1.1, -2.0, -2.0], [-0.25, 9.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    value = logprob_abs_diff(engine, student, mask)
    assert value.dtype == torch.float64 and not value.requires_grad
    assert value.item() == pytest.approx((0.1 + 0.0 + 0.25) / 3, abs=1e-7)
    assert logprob_abs_diff(engine, student, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        logprob_abs_diff(engine, student[:, :2], mask)


class FakeEngine:
    """Returns n completions per prompt whose ids encode (prompt, sample) and records the call."""

    def generate(self, prompt_ids, sampling, *, step=0, first_prompt_index=0, progress=None):
        self.call = (prompt_ids, sampling, step, first_prompt_index)
        return [
            [
                Completion(response_ids=[p, j], engine_logprobs=[-0.5, -0.25], finish_reason="length")
                for j in range(sampling.n)
            ]
            for p in range(len(prompt_ids))
        ]


def test_generate_rollouts_pairs_completions_with_prompts():
    pairs = [
        PromptPair(
            example_id=f"f:{i}",
            problem="p",
            solution="s",
            student_prompt_text="",
            teacher_prompt_text="",
            student_prompt_ids=[i, 1],
            teacher_prompt_ids=[i, 2, 3],
        )
        for i in range(3)
    ]
    engine = FakeEngine()
    rollouts = generate_rollouts(engine, pairs, SamplingSettings(n=2), step=5, first_prompt_index=6)
    assert engine.call[0] == [[0, 1], [1, 1], [2, 1]] and engine.call[2:] == (5, 6)
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [
        (6 + p, j) for p in range(3) for j in range(2)
    ]  # global prompt indices
    last = rollouts[-1]
    assert (last.example_id, last.student_prompt_ids, last.teacher_prompt_ids) == ("f:2", [2, 1], [2, 2, 3])
    assert (last.response_ids, last.engine_logprobs, last.finish_reason) == ([2, 1], [-0.5, -0.25], "length")
