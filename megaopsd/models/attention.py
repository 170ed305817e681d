"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for the local spec.

megatron-core's local ``DotProductAttention`` materialises the [b, heads, s, s] score matrix,
fills the causal mask into it, takes a float32 softmax, copies it back to the activation dtype
and keeps the probabilities for backward; it also repeats every key and value head for
grouped-query attention. ``SdpaAttention`` hands the same query, key and value to torch's
fused kernels instead (flash / memory-efficient / cuDNN on CUDA, the flash kernel on CPU):
causal, grouped-query without repeated heads, nothing of size s x s kept for backward.

Exact for megaopsd's microbatches: they are right-padded and causal, so a real token never
attends to padding; the padded rows' outputs are never scored. ``model.attention_backend=unfused``
keeps megatron's own attention as the reference (tests hold the two within 1e-5 in float32).
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SdpaAttention(DotProductAttention):
    """megatron's core-attention interface ([s, b, heads, head_dim] in, [s, b, heads x head_dim]
    out) computed by ``scaled_dot_product_attention``; the scale is megatron's own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.config
        unsupported = {
            "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
            "window_size": config.window_size is not None,
            "softmax_type": config.softmax_type != "vanilla",
        }
        named = [name for name, on in unsupported.items() if on]
        if named:
            raise ValueError(
                f"model.attention_backend=sdpa does not implement {', '.join(named)}; "
                "use model.attention_backend=unfused"
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError(
                "model.attention_backend=sdpa takes neither packed sequences nor an attention bias"
            )
        # [s, b, heads, d] -> [b, heads, s, d] (views; the kernels take the strides)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        # megatron's masks are True where attention is NOT allowed; SDPA's the opposite
        mask = None if attention_mask is None else ~attention_mask
        dropout = self.attention_dropout.p if self.training else 0.0
        # dropout draws from the model-parallel RNG stream unless sequence parallel, as megatron's own
        forked = dropout and not self.config.sequence_parallel
        with tensor_parallel.get_cuda_rng_tracker().fork() if forked else contextlib.nullcontext():
            context = torch.nn.functional.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=mask is None,
                scale=self.softmax_scale,
                enable_gqa=k.shape[1] != q.shape[1],
            )
        # [b, heads, s, d] -> [s, b, heads x d]
        s, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)
