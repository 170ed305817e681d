"""GRPO math against hand-computed values; the differentiable token log-prob against float64."""

from __future__ import annotations

import math

import pytest
import torch

from megaopsd.algorithm.baselines import grpo_batch, reference_responses
from megaopsd.algorithm.batch import build_microbatch
from megaopsd.algorithm.grpo import group_advantages, groups_to_keep, grpo_token_loss
from megaopsd.config import AlgorithmConfig
from megaopsd.loss.token_logprob import vocab_parallel_token_logprobs


def test_group_advantages_by_hand():
    # group 7: rewards 1, 0, 0, 1 -> mean 0.5, std 0.5; group 9: 1, 0 -> mean 0.5, std 0.5
    rewards, groups = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0], [7, 7, 7, 7, 9, 9]
    plain = group_advantages(rewards, groups, normalize_std=False)
    assert plain == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.5, -0.5])
    scaled = group_advantages(rewards, groups, normalize_std=True, eps=0.0)
    assert scaled == pytest.approx([1.0, -1.0, -1.0, 1.0, 1.0, -1.0])
    # 1, 0, 0: mean 1/3, population std sqrt(2)/3
    three = group_advantages([1.0, 0.0, 0.0], [0, 0, 0], normalize_std=True, eps=0.0)
    assert three == pytest.approx(
        [(2 / 3) / (math.sqrt(2) / 3), -(1 / 3) / (math.sqrt(2) / 3), -0.5 * math.sqrt(2)]
    )
    uniform = group_advantages([1.0, 1.0], [0, 0], normalize_std=True)
    assert uniform == [0.0, 0.0]


def test_dynamic_sampling_keeps_mixed_groups():
    rewards, groups = [1, 1, 0, 0, 1, 0], [0, 0, 1, 1, 2, 2]
    assert groups_to_keep(rewards, groups) == {2}


def _loss(logp, old, adv, **kw):
    logp_t = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    loss, terms = grpo_token_loss(
        logp_t, torch.tensor(old, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64), **kw
    )
    loss.sum().backward()
    return loss.detach(), logp_t.grad, terms


def test_clip_bounds_by_hand():
    # ratios exp(0.5)=1.6487 (above 1.28), exp(-0.5)=0.6065 (below 0.8), exp(0.1)=1.1052 (inside)
    logp, old = [0.0, 0.0, 0.0, 0.0], [-0.5, 0.5, -0.1, 0.5]
    adv = [2.0, -1.0, 1.0, 1.0]
    loss, grad, terms = _loss(logp, old, adv, clip_low=0.2, clip_high=0.28)
    r = [math.exp(0.5), math.exp(-0.5), math.exp(0.1), math.exp(-0.5)]
    # token 0: A>0, ratio above 1+0.28 -> -1.28 * 2, no gradient
    # token 1: A<0, ratio below 1-0.2 -> -(0.8 * -1) = 0.8, no gradient
    # token 2: inside -> -r * 1, gradient -r
    # token 3: A>0, ratio below 0.8: min(r*A, 0.8*A) = r*A (unclipped side), gradient -r
    assert loss.tolist() == pytest.approx([-2.56, 0.8, -r[2], -r[3]])
    assert grad.tolist() == pytest.approx([0.0, 0.0, -r[2], -r[3]])
    assert terms.clipped_high_T.tolist() == [True, False, False, False]
    assert terms.clipped_low_T.tolist() == [False, True, False, False]
    # symmetric bounds would clip token 0 at 1.2 instead
    loss_sym, _, _ = _loss(logp, old, adv, clip_low=0.2, clip_high=0.2)
    assert float(loss_sym[0]) == pytest.approx(-2.4)


def test_truncated_importance_weight_by_hand():
    # on-policy ratio 1 (old = logp), behaviour = engine: weights exp(0.3)=1.35, exp(1.0)=2.718 -> capped 2
    logp, behaviour = [-1.0, -2.0, -0.5], [-1.3, -3.0, -0.5]
    adv = [1.0, -1.0, 0.5]
    loss, grad, terms = _loss(
        logp, logp, adv, clip_low=0.2, clip_high=0.2, behaviour_logp_T=torch.tensor(behaviour), tis_cap=2.0
    )
    w = [math.exp(0.3), 2.0, 1.0]
    assert terms.is_weight_T.tolist() == pytest.approx(w, rel=1e-6)
    assert loss.tolist() == pytest.approx([-w[0] * 1.0, w[1] * 1.0, -0.5], rel=1e-6)
    assert grad.tolist() == pytest.approx([-w[0], w[1], -0.5], rel=1e-6)
    with pytest.raises(ValueError, match="behaviour_logp_T"):
        grpo_token_loss(
            torch.zeros(1), torch.zeros(1), torch.zeros(1), clip_low=0.2, clip_high=0.2, tis_cap=2.0
        )


def test_k3_kl_by_hand():
    # k3 = exp(ref - logp) - (ref - logp) - 1; d/dlogp = -exp(ref - logp) + 1
    logp, ref = [-1.0, -2.0], [-1.5, -1.0]
    loss, grad, terms = _loss(
        logp, logp, [0.0, 0.0], clip_low=0.2, clip_high=0.2, ref_logp_T=torch.tensor(ref), kl_coef=0.1
    )
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert terms.kl_T.tolist() == pytest.approx(k3, rel=1e-6)
    assert loss.tolist() == pytest.approx([0.1 * k for k in k3], rel=1e-6)
    assert grad.tolist() == pytest.approx([0.1 * (1 - math.exp(-0.5)), 0.1 * (1 - math.exp(1.0))], rel=1e-6)


@pytest.mark.parametrize("shard_width,vocab", [(11, 11), (16, 11)])
def test_token_logprob_matches_float64(shard_width, vocab):
    torch.manual_seed(0)
    logits = torch.randn(7, shard_width, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, vocab, (7,))
    logp, entropy = vocab_parallel_token_logprobs(
        logits, ids, vocab_size=vocab, tp_group=None, chunk_tokens=3
    )
    weights = torch.linspace(-1, 2, 7, dtype=torch.float64)
    (logp * weights).sum().backward()
    ref_logits = logits.detach()[:, :vocab].clone().requires_grad_(True)
    ref_logp_all = torch.log_softmax(ref_logits, -1)
    ref = ref_logp_all.gather(1, ids[:, None]).squeeze(1)
    (ref * weights).sum().backward()
    assert torch.allclose(logp, ref, rtol=1e-12, atol=1e-12)
    ref_entropy = -(ref_logp_all.exp() * ref_logp_all).sum(-1)
    assert torch.allclose(entropy, ref_entropy.detach(), rtol=1e-12, atol=1e-12)
    assert torch.allclose(logits.grad[:, :vocab], ref_logits.grad, rtol=1e-12, atol=1e-12)
    assert float(logits.grad[:, vocab:].abs().sum()) == 0.0  # padded columns get no gradient


class _Rollout:
    def __init__(self, prompt_index, response):
        self.prompt_index = prompt_index
        self.student_prompt_ids = [1, 2]
        self.teacher_prompt_ids = [1, 2, 3, 4, 5]
        self.response_ids = response
        self.engine_logprobs = [-0.5] * len(response)
        self.finish_reason = "stop"


def test_grpo_batch_drops_uniform_groups_and_builds_student_only_microbatch():
    rollouts = [_Rollout(0, [7, 8]), _Rollout(0, [7]), _Rollout(1, [9, 9, 9]), _Rollout(1, [6])]
    batch = grpo_batch(rollouts, [1.0, 1.0, 1.0, 0.0], AlgorithmConfig(name="grpo"), with_reference=False)
    assert [r.prompt_index for r in batch.rollouts] == [1, 1]
    assert batch.counts == (3.0, 3.0, 4.0, 2.0, 1.0)
    assert batch.advantages == pytest.approx([1.0, -1.0], rel=1e-5)
    mb = build_microbatch(batch.rollouts, [0, 1], pad_id=0, student_only=True, advantages=batch.advantages)
    assert mb.teacher_len == 0 and mb.teacher_index_T.numel() == 0
    assert mb.advantage_T.tolist() == pytest.approx([1.0, 1.0, 1.0, -1.0], rel=1e-5)
    # all groups uniform: one masked-out placeholder keeps the replica in the schedule
    none = grpo_batch(rollouts[:2], [1.0, 1.0], AlgorithmConfig(name="grpo"), with_reference=False)
    assert none.in_loss == [False] and none.counts[-1] == 0.0
    mb = build_microbatch(none.rollouts, [0], pad_id=0, student_only=True, in_loss=none.in_loss)
    assert mb.num_loss_tokens == 0


class _Tok:
    eos_token_id = 99

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


class _Prompt:
    def __init__(self, solution):
        self.solution, self.student_prompt_ids, self.teacher_prompt_ids = solution, [1, 2], [1, 5, 2]


def test_reference_responses_end_with_eos_and_truncate():
    refs = reference_responses([_Prompt("ab"), _Prompt("abcdef")], 4, _Tok(), max_tokens=4)
    assert refs[0].response_ids == [97, 98, 99] and refs[0].finish_reason == "stop"
    assert refs[1].response_ids == [97, 98, 99, 100] and refs[1].finish_reason == "length"
    assert [r.prompt_index for r in refs] == [4, 5]
    both = reference_responses([_Prompt("ab")], 0, _Tok(), max_tokens=4, with_teacher_prompt=True)
    assert [r.student_prompt_ids for r in both] == [[1, 2], [1, 5, 2]]
    assert both[1].response_ids == [97, 98, 99]


def test_prefill_blocks_keep_each_call_within_the_budget():
    from megaopsd.rollout.vllm_engine import prefill_blocks

    assert prefill_blocks([10, 10, 10], 2, None) == [range(3)]
    assert prefill_blocks([10, 10, 10, 10], 2, 40) == [range(0, 2), range(2, 4)]
    assert prefill_blocks([50, 10], 1, 40) == [range(0, 1), range(1, 2)]  # too big: alone
    assert prefill_blocks([], 4, 40) == [range(0)]


def test_refill_shares_the_wanted_groups_round_the_replicas():
    from megaopsd.algorithm.methods.grpo import share_groups

    assert share_groups([5, 1, 3], 6) == [3, 1, 2]  # dealt one at a time; a short replica keeps its own
    assert share_groups([2, 2], 8) == [2, 2]  # short of the target: everything found
    assert share_groups([4, 4], 4) == [2, 2]
    assert sum(share_groups([7, 0, 2, 9], 10)) == 10


def test_refill_keeps_the_first_mixed_groups_and_every_uniform_one():
    import dataclasses as dc

    from megaopsd.algorithm.methods.grpo import _first_mixed_groups

    @dc.dataclass(frozen=True)
    class R:
        prompt_index: int

    rollouts = [R(g) for g in (0, 0, 1, 1, 2, 2, 3, 3)]
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]  # groups 0, 2, 3 mixed; 1 uniform
    kept, kept_rewards = _first_mixed_groups(rollouts, rewards, quota=2)
    assert [r.prompt_index for r in kept] == [0, 0, 1, 1, 2, 2] and kept_rewards == rewards[:6]


def test_dynamic_sampling_is_true_false_or_refill():
    from megaopsd.config import ConfigError, load_config

    base = {"model": {"hf_path": "x"}}
    for value in (True, False, "refill"):
        assert (
            load_config({**base, "algorithm": {"dynamic_sampling": value}}).algorithm.dynamic_sampling
            == value
        )
    with pytest.raises(ConfigError, match="expected true or false or one of refill"):
        load_config({**base, "algorithm": {"dynamic_sampling": "sometimes"}})
