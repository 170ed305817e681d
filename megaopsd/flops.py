"""Model FLOPs of a paired OPSD step, and the device peak they are compared with.

Counted: the matrix multiplications of a decoder layer (QKV, causal attention scores and
values, attention output, SwiGLU MLP) and the output layer on the rows the loss scores. Norms,
rope, softmax and the loss are left out (a few percent). A backward pass costs twice its
forward. One paired step is the student's forward and backward plus the teacher's forward,
over the unpadded sequences: padding, and logits at prompt positions, are work the model
does not need, so they lower the utilisation instead of raising the count.

    flops = paired_step_flops(shape, [(s_prompt, t_prompt, response), ...])
    mfu = flops / (step_seconds * world_size * peak_tflops(device_name, dtype) * 1e12)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from megaopsd.runtime.distributed import dp_sum

# Dense (no sparsity) peaks in TFLOP/s from the vendors' data sheets: bf16 tensor cores, and
# TF32 for float32 models (torch runs float32 matmuls on TF32 when allowed).
_PEAKS_TFLOPS = {
    "H100": {"bfloat16": 989.4, "float32": 494.7},
    "H200": {"bfloat16": 989.4, "float32": 494.7},
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the FLOP count needs of a decoder (``HFModelSpec`` has all of it)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int

    @classmethod
    def of(cls, spec: object) -> ModelShape:
        return cls(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(cls)})


def layer_forward_flops(shape: ModelShape, seq_len: int) -> int:
    """Forward FLOPs of one decoder layer on one causal sequence of ``seq_len`` tokens."""
    h, d = shape.hidden_size, shape.head_dim
    q_width, kv_width = shape.num_attention_heads * d, shape.num_query_groups * d
    projections = 2 * seq_len * h * (q_width + 2 * kv_width) + 2 * seq_len * q_width * h
    # Position i attends to i + 1 keys: scores and weighted values, 2 FLOPs per multiply-add.
    attended = seq_len * (seq_len + 1) // 2
    attention = 2 * 2 * attended * q_width
    mlp = 2 * seq_len * h * shape.ffn_hidden_size * 3  # gate, up, down
    return projections + attention + mlp


def forward_flops(shape: ModelShape, seq_len: int, logit_rows: int) -> int:
    """Forward FLOPs of the model on one sequence, with the output layer on ``logit_rows`` rows."""
    return shape.num_layers * layer_forward_flops(shape, seq_len) + 2 * logit_rows * shape.hidden_size * (
        shape.vocab_size
    )


def paired_step_flops(
    shape: ModelShape, rollouts: Iterable[tuple[int, int, int]], *, teacher_stream: bool = True
) -> int:
    """Student forward + backward (3x) and teacher forward (1x) over ``(s_prompt, t_prompt, response)``.

    Each stream feeds ``prompt + response - 1`` tokens and scores ``response`` rows. Without a
    teacher stream (GRPO without its KL reference, SFT) only the student's work is counted.
    """
    total = 0
    for s_prompt, t_prompt, response in rollouts:
        total += 3 * forward_flops(shape, s_prompt + response - 1, response)
        if teacher_stream:
            total += forward_flops(shape, t_prompt + response - 1, response)
    return total


def peak_tflops(device_name: str, dtype: str, configured: float | None = None) -> float | None:
    """The device's dense peak: ``configured`` when set, else a known default, else None."""
    if configured is not None:
        return configured
    for key, peaks in _PEAKS_TFLOPS.items():
        if key in device_name:
            return peaks.get(dtype)
    return None


def utilisation_scalars(
    spec: object,
    rollouts: Sequence[Any],
    train_seconds: float,
    *,
    device: Any,
    dtype: str,
    peak_tflops_configured: float | None,
    world_size: int,
    dp_group: Any = None,
    teacher_stream: bool = True,
) -> dict[str, float]:
    """``perf/train_gflops`` (model FLOPs of the streams that ran, per second, all ranks together)
    and, on a GPU whose peak is known or configured, ``perf/mfu`` (per GPU).

    ``rollouts`` are the ones this data-parallel replica trained on; with ``dp_group`` the
    FLOPs are summed over the replicas. ``teacher_stream``: whether a teacher or reference
    forward ran (False for GRPO without KL and for SFT).
    """
    lengths = [(len(r.student_prompt_ids), len(r.teacher_prompt_ids), len(r.response_ids)) for r in rollouts]
    flops = float(paired_step_flops(ModelShape.of(spec), lengths, teacher_stream=teacher_stream))
    if dp_group is not None:
        (flops,) = dp_sum([flops], dp_group)
    flops_per_s = flops / max(train_seconds, 1e-9)
    values = {"perf/train_gflops": flops_per_s / 1e9}
    if device.type == "cuda":
        import torch

        peak = peak_tflops(torch.cuda.get_device_name(device), dtype, peak_tflops_configured)
        if peak is not None:
            values["perf/mfu"] = flops_per_s / (world_size * peak * 1e12)
    return values
