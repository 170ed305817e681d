"""The FLOP count against a hand count, and the device peak lookup."""

from __future__ import annotations

from megaopsd.flops import ModelShape, forward_flops, layer_forward_flops, paired_step_flops, peak_tflops

# hidden 4, 2 query heads and 1 KV group of width 2, MLP 8, vocabulary 10
SHAPE = ModelShape(
    num_layers=1,
    hidden_size=4,
    ffn_hidden_size=8,
    num_attention_heads=2,
    num_query_groups=1,
    head_dim=2,
    vocab_size=10,
)


def test_one_layer_matches_a_hand_count():
    # 3 tokens. Each multiply-add is 2 FLOPs.
    qkv = 3 * 4 * (4 + 2 + 2) * 2  # [3,4] x [4, q 4 + k 2 + v 2]          = 192
    scores = (1 + 2 + 3) * 2 * 2 * 2  # causal pairs x heads x head_dim x 2  = 48
    values = (1 + 2 + 3) * 2 * 2 * 2  # same shape as the scores             = 48
    out_proj = 3 * 4 * 4 * 2  # [3,4] x [4,4]                                = 96
    mlp = 3 * 4 * 8 * 2 * 2 + 3 * 8 * 4 * 2  # gate and up [4,8], down [8,4] = 576
    assert layer_forward_flops(SHAPE, 3) == qkv + scores + values + out_proj + mlp == 960
    logits = 2 * 4 * 10 * 2  # 2 scored rows x [4,10]                         = 160
    assert forward_flops(SHAPE, 3, 2) == 960 + logits


def test_paired_step_is_three_student_forwards_and_one_teacher_forward():
    # student prompt 2 + response 2 -> 3 fed tokens; teacher prompt 4 -> 5 fed tokens
    teacher = forward_flops(SHAPE, 5, 2)
    assert paired_step_flops(SHAPE, [(2, 4, 2)]) == 3 * 1120 + teacher


def test_peaks():
    assert peak_tflops("NVIDIA H200", "bfloat16") == 989.4
    assert peak_tflops("NVIDIA H100 80GB HBM3", "float32") == 494.7
    assert peak_tflops("NVIDIA A10", "bfloat16") is None
    assert peak_tflops("NVIDIA A10", "bfloat16", configured=125.0) == 125.0


def test_utilisation_scalars_on_cpu_are_gflops_only():
    import dataclasses

    import torch

    from megaopsd.flops import utilisation_scalars

    @dataclasses.dataclass
    class Rollout:
        student_prompt_ids: list[int]
        teacher_prompt_ids: list[int]
        response_ids: list[int]

    values = utilisation_scalars(
        SHAPE,
        [Rollout([0, 0], [0] * 4, [1, 1])],
        2.0,
        device=torch.device("cpu"),
        dtype="float32",
        peak_tflops_configured=None,
        world_size=1,
    )
    assert values == {"perf/train_gflops": (3 * 1120 + forward_flops(SHAPE, 5, 2)) / 2.0 / 1e9}


def test_a_student_only_step_counts_no_teacher_forward():
    """GRPO without its KL reference and SFT run no teacher stream: perf/mfu must not count one."""
    assert paired_step_flops(SHAPE, [(2, 4, 2)], teacher_stream=False) == 3 * 1120
