"""Rollout-vs-trainer mismatch: mean |engine logprob - trainer student logprob| of sampled tokens.

Both sides are raw log-probabilities at temperature 1 of the same tokens under the same weights,
so the value measures numerical disagreement between the engine and the trainer (logged as
``rollout/logprob_abs_diff``; about 5e-6 for the tiny models in float32 on CPU).

Shapes: ``B`` sequences x ``T`` response positions (padded; ``mask_BT`` marks real tokens).
"""

from __future__ import annotations

import torch


def logprob_abs_diff(
    engine_logprobs_BT: torch.Tensor, student_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor
) -> torch.Tensor:
    """Mean absolute difference over the masked tokens (0 when the mask is empty).

    Args:
        engine_logprobs_BT: the engine's raw logprobs of the sampled tokens.
        student_logprobs_BT: the trainer's student logprobs (temperature 1) of the same tokens.
        mask_BT: 1/True where a position holds a response token.

    Returns:
        A float64 scalar tensor (no gradient).
    """
    if engine_logprobs_BT.shape != student_logprobs_BT.shape or engine_logprobs_BT.shape != mask_BT.shape:
        raise ValueError(
            f"shapes differ: engine {tuple(engine_logprobs_BT.shape)}, student "
            f"{tuple(student_logprobs_BT.shape)}, mask {tuple(mask_BT.shape)}"
        )
    mask = mask_BT.detach().to(torch.float64)
    diff = (
        engine_logprobs_BT.detach().to(torch.float64) - student_logprobs_BT.detach().to(torch.float64)
    ).abs()
    count = mask.sum()
    if count == 0:
        return torch.zeros((), dtype=torch.float64)
    return (diff * mask).sum() / count
