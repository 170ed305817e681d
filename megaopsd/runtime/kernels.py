"""Whether ``torch.compile`` can build GPU kernels here (Triton), for the paths that use it.

On CUDA, megaopsd compiles the loss's chunk bodies (``loss.implementation=auto``) and turns on
megatron's fused SwiGLU (``ModelConfig.swiglu_fusion``); both go through inductor, which emits
Triton. A CUDA machine without a usable Triton (the package missing, a GPU older than sm70)
would fail at the first compiled call, in the middle of a step. ``compiles_kernels_for`` says
so up front, and those paths fall back to their plain torch operations with one warning.
"""

from __future__ import annotations

import functools
import warnings

import torch


@functools.cache
def _triton_usable() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # a torch without the helper: assume a standard CUDA wheel (it ships Triton)
        return True
    return bool(has_triton())


def compiles_kernels_for(device: torch.device) -> bool:
    """True for a CUDA device whose kernels inductor can build (Triton usable); False on CPU,
    where the compiled paths stay off by default (each new shape costs seconds of C++)."""
    if device.type != "cuda":
        return False
    if _triton_usable():
        return True
    _warn_once()
    return False


@functools.cache
def _warn_once() -> None:
    warnings.warn(
        "Triton is not usable on this CUDA machine (not installed, or a GPU older than sm70): "
        "the compiled loss and megatron's fused SwiGLU are off and their torch operations run "
        "instead (slower, same results); install the triton that matches your torch to get them",
        stacklevel=3,
    )
