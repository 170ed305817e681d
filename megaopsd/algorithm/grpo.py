"""GRPO math as pure functions: group advantages, dynamic sampling, the clipped token loss.

    advantages = group_advantages(rewards, groups, normalize_std=True)
    keep = groups_to_keep(rewards, groups)            # dynamic sampling
    loss_T, terms = grpo_token_loss(logp_T, old_logp_T, adv_T, clip_low=0.2, clip_high=0.28)

The per-token loss (summed over tokens and divided by the global token count: token-level
aggregation, as DAPO) is

    ratio = exp(logp - old_logp)
    pg    = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
    pg   *= min(exp(old_logp - behaviour_logp), tis_cap)      (truncated IS, optional)
    loss  = pg + kl_coef * (exp(ref - logp) - (ref - logp) - 1)   (k3 KL to a reference, optional)

Legend: T tokens, R rollouts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


def group_advantages(
    rewards: Sequence[float], groups: Sequence[int], *, normalize_std: bool, eps: float = 1e-6
) -> list[float]:
    """``(r - mean_g) / (std_g + eps)`` per rollout, or ``r - mean_g`` without the std term.

    Args:
        rewards: one reward per rollout.
        groups: the group (prompt) of each rollout.
        normalize_std: divide by the group's standard deviation (unbiased=False), as GRPO does;
            False is Dr. GRPO's choice (no difficulty bias towards low-variance groups).
        eps: added to the standard deviation (a uniform group has std 0).
    """
    if len(rewards) != len(groups):
        raise ValueError(f"{len(rewards)} rewards but {len(groups)} group ids")
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    out = [0.0] * len(rewards)
    for indices in members.values():
        values = torch.tensor([rewards[i] for i in indices], dtype=torch.float64)
        centred = values - values.mean()
        if normalize_std:
            centred = centred / (values.std(unbiased=False) + eps)
        for i, value in zip(indices, centred.tolist(), strict=True):
            out[i] = value
    return out


def groups_to_keep(rewards: Sequence[float], groups: Sequence[int]) -> set[int]:
    """Groups whose rewards are not all equal (dynamic sampling keeps only these).

    A group where every sample is right (or every one wrong) has zero advantage everywhere: it
    adds nothing to the policy gradient but dilutes the token-mean loss.
    """
    seen: dict[int, set[float]] = {}
    for reward, group in zip(rewards, groups, strict=True):
        seen.setdefault(group, set()).add(float(reward))
    return {group for group, values in seen.items() if len(values) > 1}


@dataclasses.dataclass(frozen=True)
class GrpoTerms:
    """Per-token parts of the loss, detached, for metrics (each [T])."""

    ratio_T: torch.Tensor
    clipped_low_T: torch.Tensor  # bool: the lower bound was active (A < 0, ratio < 1 - clip_low)
    clipped_high_T: torch.Tensor  # bool: the upper bound was active (A > 0, ratio > 1 + clip_high)
    is_weight_T: torch.Tensor  # the truncated importance weight (1 without the correction)
    kl_T: torch.Tensor  # k3 estimate of KL(policy || reference) (0 without a reference)


def grpo_token_loss(
    logp_T: torch.Tensor,
    old_logp_T: torch.Tensor,
    advantage_T: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    behaviour_logp_T: torch.Tensor | None = None,
    tis_cap: float | None = None,
    ref_logp_T: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, GrpoTerms]:
    """The per-token GRPO loss (differentiable in ``logp_T``) and its detached parts.

    Args:
        logp_T: the trained policy's log-probabilities of the sampled tokens (with grad).
        old_logp_T: the log-probabilities the ratio is taken against (no grad).
        advantage_T: each token's advantage (its rollout's).
        clip_low, clip_high: the ratio stays in ``[1 - clip_low, 1 + clip_high]`` (clip-higher:
            ``clip_high > clip_low`` leaves room for unlikely tokens to grow).
        behaviour_logp_T: the sampling engine's log-probabilities (for the IS correction).
        tis_cap: truncate the importance weight ``exp(old_logp - behaviour_logp)`` at this;
            None turns the correction off.
        ref_logp_T: a reference model's log-probabilities (no grad) for the k3 KL penalty.
        kl_coef: weight of the KL penalty (ignored without ``ref_logp_T``).
    """
    old = old_logp_T.detach().to(logp_T.dtype)
    adv = advantage_T.to(logp_T.dtype)
    ratio = (logp_T - old).exp()
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = -torch.minimum(ratio * adv, clipped * adv)
    weight = torch.ones_like(old)
    if tis_cap is not None:
        if behaviour_logp_T is None:
            raise ValueError("tis_cap needs behaviour_logp_T (the engine's logprobs)")
        weight = (old - behaviour_logp_T.to(old.dtype)).exp().clamp(max=tis_cap)
        loss = loss * weight
    kl = torch.zeros_like(old)
    if ref_logp_T is not None and kl_coef:
        log_r = ref_logp_T.detach().to(logp_T.dtype) - logp_T
        kl_grad = log_r.exp() - log_r - 1.0
        loss = loss + kl_coef * kl_grad
        kl = kl_grad.detach()
    ratio_d = ratio.detach()
    terms = GrpoTerms(
        ratio_T=ratio_d,
        clipped_low_T=(adv < 0) & (ratio_d < 1.0 - clip_low),
        clipped_high_T=(adv > 0) & (ratio_d > 1.0 + clip_high),
        is_weight_T=weight,
        kl_T=kl,
    )
    return loss, terms
