"""CPU emulation of the CUDA-only calls that megatron-core 0.16.1 makes.

megatron-core assumes a CUDA device in its forward/backward, pipeline, optimizer and
checkpoint paths. On a machine without one (tests, laptops, CI) megaopsd installs the
small set of patches below so that the same library code runs under gloo. Every patch was
seen to be needed (the ids S1..S9 are those of docs/cpu-emulation.md, which says why):

- S1 ``torch.cuda.current_device()`` returns ``"cpu"``, so ``device=current_device()``
  allocations land on the CPU.
- S2 ``torch.cuda.synchronize()`` is a no-op (p2p communication, async checkpoint save).
- S3/S5 CUDA RNG state getters/setters use the CPU generator (megatron's RNG tracker).
- S4 ``torch.cuda.manual_seed`` seeds the CPU generator. A no-op would leave the
  data-parallel and tensor-parallel RNG streams identical and unseeded.
- S6/S7 A global ``TorchFunctionMode`` rewrites ``device="cuda*"`` keywords to the CPU,
  makes ``Tensor.cuda()`` / ``Tensor.to("cuda")`` stay on the CPU, and spoofs the no-argument
  ``Tensor.type()`` as a ``torch.cuda.*Tensor`` name (the optimizer and grad clipping assert it).
- S8 Sequence parallel with torch norms: megatron's ``WrappedTorchNorm`` refuses SP; the
  replacement builds the same torch norm and tags its parameters ``sequence_parallel`` so
  their grads are all-reduced over TP (untagged, SP runs but trains silently wrong).
- The RNG tracker's "CPU RNG state changed within GPU RNG context" warning is filtered: with
  the CUDA generator emulated by the CPU one, every forked random op triggers it (noise only).
- S9 Pipeline p2p order: when a batched p2p call sends twice to the same peer (interleaved
  PP with two stages), gloo matches messages per peer in FIFO order, so the sends are posted
  next-before-prev to meet the peer's receives (otherwise a gradient lands in the activation
  buffer and training silently diverges).
- S10 Mixture of experts: the router's gating tests an optional Transformer Engine symbol
  (``te_general_gemm``) that is never defined without TE, so it is set to None; the all-to-all
  token dispatcher moves its split sizes to the host on a CUDA side stream, so its class-wide
  stream is a placeholder and the host copy is the same numpy conversion without streams
  (gloo's all-to-all takes the splits as lists).
- S12 Activation recompute: the function mode is suspended while it dispatches
  ``torch.autograd.backward``, so the forward that megatron's ``CheckpointFunction`` re-runs
  inside backward would allocate on ``cuda`` (the default causal mask first). Its backward
  runs under the mode again.

The patches are process-wide by nature (they replace library attributes). ``enable()``
returns a handle whose ``disable()`` restores every original; enabling twice is a no-op that
returns the active handle. On a machine with CUDA, ``enable()`` refuses unless ``force=True``
(``runtime.device=cpu`` in the config), so GPU runs never see the emulation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_CUDA_TENSOR_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Keeps tensors that megatron-core places on ``cuda`` on the CPU (S6, S7)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TENSOR_TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def _reorder_same_peer_sends(ops: list[dist.P2POp]) -> list[dist.P2POp]:
    """S9: post two isends to one peer in reverse order (see module docstring)."""
    send_positions = [i for i, op in enumerate(ops) if op.op is dist.isend]
    if len(send_positions) != 2:
        return ops
    first, second = send_positions
    if ops[first].peer != ops[second].peer:
        return ops
    reordered = list(ops)
    reordered[first], reordered[second] = ops[second], ops[first]
    return reordered


_MISSING = object()  # a patched attribute the owner did not have (removed again on disable)


def _cpu_dtoh_and_synchronize(self, point: str, tokens_per_expert: torch.Tensor | None = None):
    """S10: the all-to-all dispatcher's device-to-host step on the CPU: the split sizes become
    numpy arrays at the dispatcher's chosen point, as the CUDA path leaves them; no streams."""
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name, None)
            if torch.is_tensor(value):
                setattr(self, name, value.numpy())
    return tokens_per_expert


def _sequence_parallel_torch_norm(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
    """S8: ``WrappedTorchNorm.__new__`` without the sequence-parallel refusal."""
    assert not config.layernorm_zero_centered_gamma, "zero_centered_gamma not supported by torch norms"
    assert not config.persist_layer_norm, "persist_layer_norm not supported by torch norms"
    if config.normalization == "LayerNorm":
        norm = torch.nn.LayerNorm(normalized_shape=hidden_size, eps=eps)
    elif config.normalization == "RMSNorm":
        norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
    else:
        raise ValueError(f"normalization {config.normalization!r} is not supported on CPU")
    for param in norm.parameters():
        param.sequence_parallel = config.sequence_parallel
    return norm


class _DropEmulatedRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "CPU RNG state changed within GPU RNG context"


_RNG_LOGGER = "megatron.core.tensor_parallel.random"


@dataclasses.dataclass
class CpuEmulation:
    """Handle on the installed patches; ``disable()`` puts every original back."""

    _originals: list[tuple[Any, str, Any]] = dataclasses.field(default_factory=list)
    _mode: CudaToCpuMode | None = None
    _log_filter: logging.Filter | None = None

    @property
    def active(self) -> bool:
        return self._mode is not None

    def _patch(self, owner: Any, name: str, value: Any) -> None:
        self._originals.append((owner, name, getattr(owner, name, _MISSING)))
        setattr(owner, name, value)

    def install(self) -> None:
        from megatron.core.tensor_parallel import random as mcore_random
        from megatron.core.transformer import torch_norm

        def cpu_rng_state(*_args, **_kwargs) -> torch.Tensor:
            return torch.get_rng_state()

        def set_cpu_rng_state(state: torch.Tensor, *_args, **_kwargs) -> None:
            torch.set_rng_state(state)

        def get_cuda_rng_state(*_args, clone: bool = False, **_kwargs) -> torch.Tensor:
            return torch.get_rng_state()  # a fresh tensor already; clone is implied

        original_batch_isend_irecv: Callable = dist.batch_isend_irecv

        def batch_isend_irecv(p2p_op_list):
            return original_batch_isend_irecv(_reorder_same_peer_sends(list(p2p_op_list)))

        self._patch(torch.cuda, "current_device", lambda: "cpu")  # S1
        self._patch(torch.cuda, "synchronize", lambda *a, **k: None)  # S2
        self._patch(torch.cuda, "get_rng_state", cpu_rng_state)  # S3
        self._patch(torch.cuda.random, "get_rng_state", cpu_rng_state)  # S3
        self._patch(torch.cuda, "set_rng_state", set_cpu_rng_state)
        self._patch(torch.cuda, "manual_seed", torch.manual_seed)  # S4
        self._patch(mcore_random, "_get_cuda_rng_state", get_cuda_rng_state)  # S5
        self._patch(mcore_random, "_set_cuda_rng_state", set_cpu_rng_state)  # S5
        self._patch(torch_norm.WrappedTorchNorm, "__new__", _sequence_parallel_torch_norm)  # S8
        self._patch(dist, "batch_isend_irecv", batch_isend_irecv)  # S9
        from megatron.core.transformer.moe import moe_utils, token_dispatcher

        if getattr(moe_utils, "te_general_gemm", None) is None:
            self._patch(moe_utils, "te_general_gemm", None)  # S10
        dispatcher = token_dispatcher.MoEAlltoAllTokenDispatcher
        if dispatcher.cuda_dtoh_stream is None:
            self._patch(dispatcher, "cuda_dtoh_stream", "cpu")  # S10: never used as a stream
        self._patch(dispatcher, "_maybe_dtoh_and_synchronize", _cpu_dtoh_and_synchronize)  # S10
        original_recompute_backward = mcore_random.CheckpointFunction.backward

        def recompute_backward(ctx, *grads):
            with CudaToCpuMode():
                return original_recompute_backward(ctx, *grads)

        self._patch(mcore_random.CheckpointFunction, "backward", staticmethod(recompute_backward))  # S12
        self._log_filter = _DropEmulatedRngWarning()
        logging.getLogger(_RNG_LOGGER).addFilter(self._log_filter)
        self._mode = CudaToCpuMode()  # S6, S7
        self._mode.__enter__()

    def disable(self) -> None:
        """Remove every patch (in reverse order) and leave the torch function mode."""
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        if self._log_filter is not None:
            logging.getLogger(_RNG_LOGGER).removeFilter(self._log_filter)
            self._log_filter = None
        for owner, name, original in reversed(self._originals):
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._originals.clear()


_ACTIVE: list[CpuEmulation] = []  # at most one; a list so the module holds no rebindable global


def enable(*, force: bool = False) -> CpuEmulation:
    """Install the CPU emulation for this process (idempotent).

    Args:
        force: install even though CUDA is available (``runtime.device=cpu`` on a GPU machine).

    Returns:
        The active handle; call ``disable()`` on it to restore megatron-core and torch.
    """
    if _ACTIVE:
        return _ACTIVE[0]
    if torch.cuda.is_available() and not force:
        raise RuntimeError(
            "CPU emulation requested on a machine with CUDA; set runtime.device=cpu to force it, "
            "or run on the GPU without the emulation"
        )
    handle = CpuEmulation()
    handle.install()
    _ACTIVE.append(handle)
    return handle


def disable() -> None:
    """Remove the CPU emulation if it is installed."""
    while _ACTIVE:
        _ACTIVE.pop().disable()


def is_enabled() -> bool:
    return bool(_ACTIVE)
