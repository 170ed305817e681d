"""Rotary-embedding frequencies, including the Llama 3 (``rope_type="llama3"``) remapping.

megatron-core 0.16.1 implements the llama3 remapping but fixes three of its four numbers
(``RotaryEmbedding._apply_scaling``: low_freq_factor 1, high_freq_factor 4,
original_max_position_embeddings 8192; only ``factor`` is a constructor argument). Configs
with those values use megatron's own path; any other llama3 config gets its frequencies from
``llama3_inv_freq`` here, written onto the built model (``apply_rope_override``).
"""

from __future__ import annotations

import math

import torch

from megaopsd.config.hf_spec import Llama3RopeScaling

# The llama3 numbers megatron-core's RotaryEmbedding hardcodes (all but the factor).
MEGATRON_LLAMA3_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Plain rope inverse frequencies ``theta ** (-2i / head_dim)``, float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    return 1.0 / (theta**exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: Llama3RopeScaling) -> torch.Tensor:
    """Apply the llama3 remapping: long wavelengths are divided by ``factor``, short ones kept,
    and the band in between is interpolated linearly in ``original_len / wavelength``."""
    old_len = scaling.original_max_position_embeddings
    long_wavelen = old_len / scaling.low_freq_factor  # longer than this: fully scaled
    short_wavelen = old_len / scaling.high_freq_factor  # shorter than this: untouched
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    # Same evaluation order as transformers' reference so float32 results agree to the bit.
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > long_wavelen, inv_freq / scaling.factor, inv_freq)
    in_band = (wavelen >= short_wavelen) & (wavelen <= long_wavelen)
    return torch.where(in_band, interpolated, scaled)


def megatron_handles_scaling(scaling: Llama3RopeScaling) -> bool:
    """Whether megatron-core's built-in llama3 scaling computes exactly this config."""
    return all(getattr(scaling, name) == value for name, value in MEGATRON_LLAMA3_FIXED.items())


def apply_rope_override(
    model: torch.nn.Module, head_dim: int, theta: float, scaling: Llama3RopeScaling
) -> None:
    """Replace a built GPTModel's rope frequencies with the llama3 ones for ``scaling``.

    Must run before the first forward: megatron caches rope tensors per sequence length.
    """
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        raise ValueError("model has no rotary_pos_emb; build it with position_embedding_type='rope'")
    rotary.inv_freq = llama3_inv_freq(default_inv_freq(head_dim, theta), scaling).to(rotary.inv_freq.device)
