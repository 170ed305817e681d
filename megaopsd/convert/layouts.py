"""How Hugging Face tensors become one Megatron parameter, and how it is split over TP.

A ``Layout`` knows three things about one Megatron parameter:

- ``tp_dim``: the dimension along which TP ranks hold equal slices (``None``: replicated);
  concatenating the ranks' shards along it gives the "full" Megatron tensor;
- ``to_hf(full, geo)``: the full Megatron tensor -> the Hugging Face tensors (export);
- ``shard_to_hf(shard, geo, tp_rank, outputs)``: copy one TP rank's shard into its places in
  the Hugging Face tensors (export without first concatenating the shards);
- ``read_shard(slices, geo, tp_rank, shard_shape)``: read only the rows/columns that one TP
  rank needs from the Hugging Face tensors (import; ``slices`` are safetensors slice objects
  or anything indexable the same way).

Layouts used by the model families:

- ``REPLICATED``  norms (same tensor on every TP rank);
- ``ROW``         row-parallel linears (``linear_proj``, ``linear_fc2``): input dim split;
- ``VOCAB``       embedding / output layer: rows split, padded to Megatron's vocabulary size
                  (padding rows are zero on import and dropped on export);
- ``QKV``         fused ``linear_qkv``: per query group g, ``[q heads of g; k_g; v_g]``,
                  groups split over TP (weights ``[out, in]`` and biases ``[out]`` alike);
- ``GATE_UP``     fused ``linear_fc1``: each TP rank holds ``[gate_r; up_r]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import torch


@dataclasses.dataclass(frozen=True, kw_only=True)
class Geometry:
    """The model numbers the layouts need."""

    num_heads: int
    num_groups: int
    head_dim: int
    vocab_size: int  # true (unpadded) vocabulary size
    tp_size: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups


def _tp_range(total: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    if total % tp_size != 0:
        raise ValueError(f"dimension {total} is not divisible by TP={tp_size}")
    size = total // tp_size
    return tp_rank * size, (tp_rank + 1) * size


Shape = Sequence[int]


class Layout(Protocol):
    """How one Megatron parameter relates to its Hugging Face tensors (see the module docstring)."""

    tp_dim: int | None

    def hf_shapes(self, full_shape: Shape, geo: Geometry) -> list[tuple[int, ...]]:
        """Shapes of the HF tensors made from a full Megatron tensor of ``full_shape``."""
        ...

    def to_hf(self, full: torch.Tensor, geo: Geometry) -> list[torch.Tensor]:
        """The HF tensors (contiguous, in ``Rule.hf`` order) of a TP-gathered Megatron tensor."""
        ...

    def shard_to_hf(
        self, shard: torch.Tensor, geo: Geometry, tp_rank: int, outputs: Sequence[torch.Tensor]
    ) -> None:
        """Copy TP rank ``tp_rank``'s shard into the full HF tensors ``outputs`` (``hf_shapes``).

        Every rank's shard placed this way gives exactly ``to_hf`` of their concatenation; a
        replicated parameter is placed from TP rank 0 only.
        """
        ...

    def read_shard(
        self, slices: Sequence[Any], geo: Geometry, tp_rank: int, shard_shape: Shape
    ) -> torch.Tensor:
        """TP rank ``tp_rank``'s shard, read from the HF tensors' slices (only the rows/columns it keeps)."""
        ...


class _OneHfTensor:
    """A parameter that is one HF tensor of the same full shape (only the TP split differs)."""

    def hf_shapes(self, full_shape: Shape, geo: Geometry) -> list[tuple[int, ...]]:
        return [tuple(full_shape)]

    def to_hf(self, full: torch.Tensor, geo: Geometry) -> list[torch.Tensor]:
        return [full.contiguous()]


class Replicated(_OneHfTensor):
    """Same tensor on every TP rank, identical in both formats."""

    tp_dim = None

    def shard_to_hf(
        self, shard: torch.Tensor, geo: Geometry, tp_rank: int, outputs: Sequence[torch.Tensor]
    ) -> None:
        outputs[0].copy_(shard)

    def read_shard(
        self, slices: Sequence[Any], geo: Geometry, tp_rank: int, shard_shape: Shape
    ) -> torch.Tensor:
        return slices[0][:]


class RowParallel(_OneHfTensor):
    """``[out, in]`` weight whose input dimension is split over TP."""

    tp_dim = 1

    def shard_to_hf(
        self, shard: torch.Tensor, geo: Geometry, tp_rank: int, outputs: Sequence[torch.Tensor]
    ) -> None:
        width = shard.shape[1]
        outputs[0][:, tp_rank * width : (tp_rank + 1) * width].copy_(shard)

    def read_shard(
        self, slices: Sequence[Any], geo: Geometry, tp_rank: int, shard_shape: Shape
    ) -> torch.Tensor:
        start, end = _tp_range(slices[0].get_shape()[1], tp_rank, geo.tp_size)
        return slices[0][:, start:end]


class VocabParallel:
    """``[padded_vocab, hidden]`` rows split over TP; rows >= vocab_size are padding."""

    tp_dim = 0

    def hf_shapes(self, full_shape: Shape, geo: Geometry) -> list[tuple[int, ...]]:
        return [(geo.vocab_size, *full_shape[1:])]

    def to_hf(self, full: torch.Tensor, geo: Geometry) -> list[torch.Tensor]:
        return [full[: geo.vocab_size].contiguous()]

    def shard_to_hf(
        self, shard: torch.Tensor, geo: Geometry, tp_rank: int, outputs: Sequence[torch.Tensor]
    ) -> None:
        start = tp_rank * shard.shape[0]
        end = min(start + shard.shape[0], geo.vocab_size)
        if end > start:  # a shard of padding rows only has no place in the HF tensor
            outputs[0][start:end].copy_(shard[: end - start])

    def read_shard(
        self, slices: Sequence[Any], geo: Geometry, tp_rank: int, shard_shape: Shape
    ) -> torch.Tensor:
        rows = shard_shape[0]
        start = tp_rank * rows
        end = min(start + rows, geo.vocab_size)
        real = slices[0][start:end] if end > start else None
        shard = torch.zeros(shard_shape, dtype=real.dtype if real is not None else torch.float32)
        if real is not None:
            shard[: end - start] = real
        return shard


class FusedQKV:
    """Megatron's ``linear_qkv``: query groups interleaved as ``[q_g (hpg heads); k_g; v_g]``."""

    tp_dim = 0

    def hf_shapes(self, full_shape: Shape, geo: Geometry) -> list[tuple[int, ...]]:
        rest = tuple(full_shape[1:])
        return [
            (geo.num_heads * geo.head_dim, *rest),
            (geo.num_groups * geo.head_dim, *rest),
            (geo.num_groups * geo.head_dim, *rest),
        ]

    def to_hf(self, full: torch.Tensor, geo: Geometry) -> list[torch.Tensor]:
        rest = full.shape[1:]
        q_rows = geo.heads_per_group * geo.head_dim
        grouped = full.reshape(geo.num_groups, q_rows + 2 * geo.head_dim, *rest)
        q, k, v = torch.split(grouped, [q_rows, geo.head_dim, geo.head_dim], dim=1)
        return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]

    def shard_to_hf(
        self, shard: torch.Tensor, geo: Geometry, tp_rank: int, outputs: Sequence[torch.Tensor]
    ) -> None:
        rest = shard.shape[1:]
        q_rows = geo.heads_per_group * geo.head_dim
        first, last = _tp_range(geo.num_groups, tp_rank, geo.tp_size)
        grouped = shard.reshape(last - first, q_rows + 2 * geo.head_dim, *rest)
        parts = torch.split(grouped, [q_rows, geo.head_dim, geo.head_dim], dim=1)
        for out, part in zip(outputs, parts):
            out.view(geo.num_groups, part.shape[1], *rest)[first:last].copy_(part)

    def read_shard(
        self, slices: Sequence[Any], geo: Geometry, tp_rank: int, shard_shape: Shape
    ) -> torch.Tensor:
        first, last = _tp_range(geo.num_groups, tp_rank, geo.tp_size)
        groups = last - first
        q_rows = geo.heads_per_group * geo.head_dim
        q = slices[0][first * q_rows : last * q_rows]
        k = slices[1][first * geo.head_dim : last * geo.head_dim]
        v = slices[2][first * geo.head_dim : last * geo.head_dim]
        rest = q.shape[1:]
        parts = [
            q.reshape(groups, q_rows, *rest),
            k.reshape(groups, geo.head_dim, *rest),
            v.reshape(groups, geo.head_dim, *rest),
        ]
        return torch.cat(parts, dim=1).reshape(-1, *rest)


class FusedGateUp:
    """Megatron's SwiGLU ``linear_fc1``: TP rank r holds ``[gate rows of r; up rows of r]``."""

    tp_dim = 0

    def hf_shapes(self, full_shape: Shape, geo: Geometry) -> list[tuple[int, ...]]:
        half = (full_shape[0] // 2, *full_shape[1:])
        return [half, half]

    def to_hf(self, full: torch.Tensor, geo: Geometry) -> list[torch.Tensor]:
        rest = full.shape[1:]
        per_rank = full.reshape(geo.tp_size, 2, full.shape[0] // (2 * geo.tp_size), *rest)
        return [per_rank[:, i].reshape(-1, *rest).contiguous() for i in range(2)]

    def shard_to_hf(
        self, shard: torch.Tensor, geo: Geometry, tp_rank: int, outputs: Sequence[torch.Tensor]
    ) -> None:
        rows = shard.shape[0] // 2
        for out, part in zip(outputs, (shard[:rows], shard[rows:])):
            out[tp_rank * rows : (tp_rank + 1) * rows].copy_(part)

    def read_shard(
        self, slices: Sequence[Any], geo: Geometry, tp_rank: int, shard_shape: Shape
    ) -> torch.Tensor:
        start, end = _tp_range(slices[0].get_shape()[0], tp_rank, geo.tp_size)
        return torch.cat([slices[0][start:end], slices[1][start:end]], dim=0)


REPLICATED = Replicated()
ROW = RowParallel()
VOCAB = VocabParallel()
QKV = FusedQKV()
GATE_UP = FusedGateUp()
