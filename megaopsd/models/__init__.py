"""Megatron-core GPTModel chunks built from Hugging Face configs (Qwen3, Qwen2/2.5, Llama 3.x)."""

from megaopsd.config.hf_spec import (
    SUPPORTED_ARCHITECTURES,
    HFModelSpec,
    Llama3RopeScaling,
    UnsupportedModelError,
    check_tensor_parallel,
    load_hf_config,
)
from megaopsd.models.builder import (
    build_model_chunks,
    layer_spec,
    padded_vocab_size,
    params_dtype,
    transformer_config,
    unwrap_chunk,
    vocab_sizes,
)
from megaopsd.models.forward import forward_logits

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "HFModelSpec",
    "Llama3RopeScaling",
    "UnsupportedModelError",
    "build_model_chunks",
    "check_tensor_parallel",
    "forward_logits",
    "layer_spec",
    "load_hf_config",
    "padded_vocab_size",
    "params_dtype",
    "transformer_config",
    "unwrap_chunk",
    "vocab_sizes",
]
