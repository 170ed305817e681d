"""Rollout-vs-trainer mismatch: |engine logprob - trainer student logprob| of the sampled tokens.

Both sides are raw log-probabilities at temperature 1 of the same tokens under the same weights,
so the value measures numerical disagreement between the engine and the trainer. The paired
forward step sums ``logprob_abs_diff_tokens`` over each microbatch and takes its maximum (the
trainer logs the token mean as ``rollout/logprob_abs_diff``, about 4e-7 for the tiny models in
float32 on CPU, and the worst token as ``rollout/logprob_abs_diff_max``, about 2e-6); tests
and tools take the mean of a batch with ``logprob_abs_diff``. One function computes both.

Shapes: any shape ``S`` shared by the three tensors (``[B, T]`` padded rows, or ``[N]`` tokens).
"""

from __future__ import annotations

import torch


def logprob_abs_diff_tokens(
    engine_logprobs: torch.Tensor, student_logprobs: torch.Tensor, mask: torch.Tensor
):
    """Per-token ``|engine - student|`` in float64, zero where ``mask`` is 0 (no gradient).

    Args:
        engine_logprobs: the engine's raw logprobs of the sampled tokens.
        student_logprobs: the trainer's student logprobs (temperature 1) of the same tokens.
        mask: 1/True where a position holds a response token that counts.
    """
    if engine_logprobs.shape != student_logprobs.shape or engine_logprobs.shape != mask.shape:
        raise ValueError(
            f"shapes differ: engine {tuple(engine_logprobs.shape)}, student "
            f"{tuple(student_logprobs.shape)}, mask {tuple(mask.shape)}"
        )
    diff = (engine_logprobs.detach().to(torch.float64) - student_logprobs.detach().to(torch.float64)).abs()
    return diff * mask.detach().to(torch.float64)


def logprob_abs_diff(
    engine_logprobs_BT: torch.Tensor, student_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor
) -> torch.Tensor:
    """Mean absolute difference over the masked tokens (0 when the mask is empty); float64 scalar."""
    diff = logprob_abs_diff_tokens(engine_logprobs_BT, student_logprobs_BT, mask_BT)
    count = mask_BT.detach().to(torch.float64).sum()
    if count == 0:
        return torch.zeros((), dtype=torch.float64)
    return diff.sum() / count
