"""RMSNorm that computes in the activations' dtype while its weight stays float32.

megatron's local spec builds every norm (input, pre-MLP, query, key, final) as torch's
``RMSNorm`` in float32, whatever ``params_dtype`` says. In a bf16 model the activations are bf16
and the weight float32: torch's fused RMSNorm (CUDA) needs both in one dtype, so it warns
"Mismatch dtype between input and weight" and runs its composite norm instead, forward and
backward, with its upcast copies: several kernels over the activations where one does.

``ActivationDtypeRMSNorm`` hands the norm the weight cast to the input's dtype (a [hidden]
copy; its gradient flows back to the float32 weight through the cast). The parameters do not
change, so a checkpoint (weights, EMA shadows, optimizer state) reads and writes as before; the
forward uses the weight rounded to bf16, which is what the exported Hugging Face checkpoint and
the vLLM engine hold (Qwen3 and Llama store their norms in bf16). In a float32 model nothing
changes. ``fuse_norms`` swaps the class of a built chunk's torch RMSNorms in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ActivationDtypeRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` whose weight meets the input in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


def fuse_norms(model: torch.nn.Module) -> None:
    """Make every plain ``torch.nn.RMSNorm`` of ``model`` an ``ActivationDtypeRMSNorm`` (same
    parameters, same state dict)."""
    for module in model.modules():
        if type(module) is torch.nn.RMSNorm:
            module.__class__ = ActivationDtypeRMSNorm
