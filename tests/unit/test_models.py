"""HF config parsing, vocabulary padding, rope frequencies and layer-spec selection (no processes)."""

from __future__ import annotations

import json

import pytest
import torch

from megaopsd.config.hf_spec import Llama3RopeScaling
from megaopsd.models import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedModelError,
    check_tensor_parallel,
    layer_spec,
    load_hf_config,
    padded_vocab_size,
)
from megaopsd.models.rope import default_inv_freq, llama3_inv_freq, megatron_handles_scaling


def test_tiny_models_parse(tiny_models):
    qwen3 = load_hf_config(tiny_models["qwen3"])
    assert (qwen3.family, qwen3.tie_word_embeddings, qwen3.qk_norm, qwen3.qkv_bias) == (
        "qwen3",
        True,
        True,
        False,
    )
    assert (qwen3.num_attention_heads, qwen3.num_query_groups, qwen3.head_dim) == (4, 2, 32)
    assert qwen3.rope_theta == 1e6 and qwen3.rope_scaling is None and qwen3.vocab_size == 549
    qwen2 = load_hf_config(tiny_models["qwen2"] / "config.json")
    assert (qwen2.family, qwen2.tie_word_embeddings, qwen2.qkv_bias, qwen2.head_dim) == (
        "qwen2",
        False,
        True,
        32,
    )
    llama = load_hf_config(tiny_models["llama"])
    assert llama.rope_theta == 5e5
    assert llama.rope_scaling == Llama3RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )


def test_transformers4_rope_spelling_is_read(tiny_models):
    raw = json.loads((tiny_models["llama"] / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = params
    legacy = load_hf_config(raw)
    assert legacy == load_hf_config(tiny_models["llama"])


def _config(tiny_models, family: str, **changes) -> dict:
    raw = json.loads((tiny_models[family] / "config.json").read_text())
    raw.update(changes)
    return raw


def test_unknown_architecture_lists_the_supported_ones(tiny_models):
    with pytest.raises(UnsupportedModelError) as err:
        load_hf_config(_config(tiny_models, "llama", architectures=["GPT2LMHeadModel"]))
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(err.value)


@pytest.mark.parametrize(
    ("family", "changes", "message"),
    [
        ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act"),
        ("llama", {"attention_bias": True}, "attention_bias"),
        ("llama", {"mlp_bias": True}, "mlp_bias"),
        ("qwen3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "yarn"),
    ],
)
def test_unsupported_options_are_rejected(tiny_models, family, changes, message):
    with pytest.raises(UnsupportedModelError, match=message):
        load_hf_config(_config(tiny_models, family, **changes))


def test_tensor_parallel_must_divide_heads_and_groups(tiny_models):
    spec = load_hf_config(tiny_models["qwen3"])
    check_tensor_parallel(spec, 2)
    with pytest.raises(UnsupportedModelError, match="does not divide num_attention_heads=4"):
        check_tensor_parallel(spec, 3)
    with pytest.raises(UnsupportedModelError, match="does not divide num_key_value_heads=2"):
        check_tensor_parallel(spec, 4)


@pytest.mark.parametrize(
    ("vocab", "tp", "divisible_by", "expected"),
    [
        (549, 1, 128, 640),
        (549, 2, 128, 768),
        (32000, 1, 128, 32000),
        (32000, 4, 128, 32256),
        (151936, 8, 128, 151552 + 1024),
    ],
)
def test_padded_vocab_size(vocab, tp, divisible_by, expected):
    assert padded_vocab_size(vocab, tp, divisible_by) == expected
    assert expected % (divisible_by * tp) == 0 and 0 <= expected - vocab < divisible_by * tp


LLAMA3_CASES = [
    Llama3RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    ),
    Llama3RopeScaling(
        factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    ),
    Llama3RopeScaling(
        factor=16.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_position_embeddings=64
    ),
]


@pytest.mark.parametrize("scaling", LLAMA3_CASES)
def test_llama3_frequencies_match_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, **vars(scaling)}
    config = LlamaConfig(hidden_size=128, num_attention_heads=4, head_dim=32, rope_parameters=rope)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, device="cpu")
    ours = llama3_inv_freq(default_inv_freq(32, 500000.0), scaling)
    assert torch.allclose(ours, expected.float(), rtol=1e-7, atol=0)


def test_megatron_builtin_scaling_used_only_when_it_is_exact():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    for scaling in LLAMA3_CASES:
        builtin = megatron_handles_scaling(scaling)
        assert builtin == (scaling.original_max_position_embeddings == 8192)
        if builtin:
            theirs = RotaryEmbedding._apply_scaling(
                None, default_inv_freq(32, 500000.0), factor=scaling.factor
            )
            assert torch.allclose(theirs, llama3_inv_freq(default_inv_freq(32, 500000.0), scaling), rtol=1e-7)


def test_layer_spec_choices(tiny_models):
    spec = load_hf_config(tiny_models["qwen3"])
    local = layer_spec(spec, "local")
    assert "q_layernorm" in repr(local.submodules.self_attention.submodules)
    with pytest.raises(ValueError, match="transformer_impl"):
        layer_spec(spec, "flash")
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="needs Transformer Engine"):
            layer_spec(spec, "transformer_engine")


def test_qwen3_moe_parses_both_spellings_of_the_expert_count(tiny_qwen3_moe):
    from megaopsd.config.hf_spec import MoESpec
    from tools.make_tiny_model import qwen3_config

    spec = load_hf_config(tiny_qwen3_moe)  # transformers 5 writes num_local_experts
    assert (spec.family, spec.qk_norm, spec.tie_word_embeddings) == ("qwen3_moe", True, False)
    assert spec.moe == MoESpec(
        num_experts=8,
        experts_per_token=2,
        expert_ffn_hidden_size=64,
        norm_topk_prob=True,
        router_aux_loss_coef=0.001,
    )
    released = load_hf_config(qwen3_config("qwen3_30b_a3b"))  # the released config writes num_experts
    assert (
        released.moe.num_experts,
        released.moe.experts_per_token,
        released.moe.expert_ffn_hidden_size,
    ) == (
        128,
        8,
        768,
    )
    assert load_hf_config(qwen3_config("qwen3_1p7b")).moe is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"decoder_sparse_step": 2}, "decoder_sparse_step=2 is not supported"),
        ({"mlp_only_layers": [0]}, r"mlp_only_layers=\[0\] is not supported .*dense MLP layers"),
        ({"shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size=64"),
        ({"num_experts_per_tok": 9}, "num_experts=8 with num_experts_per_tok=9 is not a mixture"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_qwen3_moe_options_megaopsd_does_not_build_are_rejected_by_name(tiny_qwen3_moe, changes, message):
    raw = json.loads((tiny_qwen3_moe / "config.json").read_text())
    with pytest.raises(UnsupportedModelError, match=message):
        load_hf_config({**raw, **changes})


def test_moe_layer_spec_uses_sequential_experts(tiny_qwen3_moe):
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    spec = layer_spec(load_hf_config(tiny_qwen3_moe), "local")
    assert spec.submodules.mlp.module is MoELayer
    assert spec.submodules.mlp.submodules.experts.module is SequentialMLP
