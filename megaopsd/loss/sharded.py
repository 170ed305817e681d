"""Softmax statistics over a vocabulary split across a tensor-parallel (TP) group.

Rank r of the TP group holds the global vocab ids [r * W, (r + 1) * W) of every token, W being
the shard width. Everything here works on one chunk of tokens and touches the group only through
all-reduces of per-token rows (max, sum) and one all-gather of top-k candidates, so nothing of
size [tokens, full vocab] ever exists. ``group=None`` (or a group of size 1) means no TP.

Legend: C = tokens in a chunk, N = valid (unpadded) vocab columns on this rank (N <= W),
K = top-k width, P = TP group size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp
_NO_ID = 2**52  # id of a filler top-k candidate: owned by no rank, exact in float64, loses ties


def group_size(group: dist.ProcessGroup | None) -> int:
    """TP size of ``group``; ``None`` means no TP (size 1), not the default world group."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This process's rank inside ``group`` (0 without TP)."""
    return 0 if group is None else dist.get_rank(group)


def valid_columns(shard_width: int, vocab_size: int, rank: int) -> tuple[int, int]:
    """First global id of this rank's shard and how many of its columns are real vocab entries.

    Columns past ``vocab_size`` are Megatron's padding; they may hold any value and are dropped
    before any softmax, so they carry no probability mass and receive no gradient.
    """
    first_id = rank * shard_width
    return first_id, max(0, min(shard_width, vocab_size - first_id))


def all_reduce_rows(
    rows: Sequence[torch.Tensor], op: dist.ReduceOp.RedOpType, group: dist.ProcessGroup | None
) -> list[torch.Tensor]:
    """All-reduce several per-token rows (each [C]) with one collective."""
    if group_size(group) == 1:
        return list(rows)
    stacked = torch.stack(list(rows))
    dist.all_reduce(stacked, op=op, group=group)
    return list(stacked.unbind(0))


class Scratch:
    """Named chunk-sized work buffers that every chunk of one call reuses.

    Why: on CPU a fresh [chunk, shard] tensor is memory the allocator maps from the OS and
    hands back when it is freed, so every use page-faults; profiled, an out-of-place exp over
    a chunk costs ~10x its in-place twin. (CUDA's caching allocator already reuses memory;
    reusing it here does no harm.) Buffers come back uninitialised. Functions that take a
    ``scratch`` document the names they use; ``scratch=None`` means plain allocation.
    """

    def __init__(self) -> None:
        self._flat: dict[str, torch.Tensor] = {}

    def empty(
        self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` in the buffer called ``name`` (grown on demand)."""
        numel = math.prod(shape)
        buf = self._flat.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self._flat[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


def empty_like(scratch: Scratch | None, name: str, x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)``, from ``scratch``'s buffer ``name`` when there is a scratch."""
    if scratch is None:
        return torch.empty_like(x)
    return scratch.empty(name, x.shape, x.dtype, x.device)


@dataclasses.dataclass(frozen=True)
class LogSoftmax:
    """Log-probabilities, probabilities and log-normaliser of one distribution over a chunk."""

    logp_CN: torch.Tensor
    p_CN: torch.Tensor
    lse_C: torch.Tensor


def _row_max(x_CN: torch.Tensor) -> torch.Tensor:
    # A rank whose shard is all padding has N == 0, and amax refuses an empty dimension.
    if x_CN.shape[1] == 0:
        return x_CN.new_full(x_CN.shape[:1], float("-inf"))
    return x_CN.amax(dim=1)


def sharded_log_softmax(
    xs_CN: Sequence[torch.Tensor], group: dist.ProcessGroup | None, scratch: Scratch | None = None
) -> list[LogSoftmax]:
    """Log-softmax over the full (sharded) vocab of each tensor in ``xs_CN``, IN PLACE.

    Each input is overwritten with its log-probabilities (saves one [C, N] buffer per
    distribution). The global max and the global sum of exp are each found with one all-reduce
    shared by all inputs.

    Args:
        xs_CN: scaled logits (already divided by the temperature), one tensor per distribution.
        group: TP group, or None.
        scratch: buffers "p0", "p1", ... hold the probabilities of input 0, 1, ...

    Returns:
        One ``LogSoftmax`` per input, its ``logp_CN`` being the (overwritten) input tensor.
    """
    maxes_C = all_reduce_rows([_row_max(x) for x in xs_CN], ReduceOp.MAX, group)
    exps_CN = [
        torch.sub(x, m[:, None], out=empty_like(scratch, f"p{i}", x)).exp_()
        for i, (x, m) in enumerate(zip(xs_CN, maxes_C))
    ]
    sums_C = all_reduce_rows([e.sum(dim=1) for e in exps_CN], ReduceOp.SUM, group)
    out = []
    for x, e, m, s in zip(xs_CN, exps_CN, maxes_C, sums_C):
        lse_C = m + s.log()
        out.append(LogSoftmax(logp_CN=x.sub_(lse_C[:, None]), p_CN=e.div_(s[:, None]), lse_C=lse_C))
    return out


def log_softmax_from_lse(
    x_CN: torch.Tensor, lse_C: torch.Tensor, scratch: Scratch | None = None, name: str = "p0"
) -> LogSoftmax:
    """Rebuild a distribution from scaled logits and its known log-normaliser (x_CN IN PLACE).

    Needs no collective: the backward pass uses it with the lse the forward pass saved.
    ``scratch`` buffer ``name`` holds the probabilities.
    """
    logp_CN = x_CN.sub_(lse_C[:, None])
    return LogSoftmax(
        logp_CN=logp_CN, p_CN=torch.exp(logp_CN, out=empty_like(scratch, name, logp_CN)), lse_C=lse_C
    )


def row_dot(a_CN: torch.Tensor, b_CN: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
    """Per-row dot product sum_n a[c, n] * b[c, n] (the product goes to scratch buffer "prod")."""
    return torch.mul(a_CN, b_CN, out=empty_like(scratch, "prod", a_CN)).sum(dim=1)


def _topk_lowest_id_ties(x_CN: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k)`` with ties at the k-th value resolved toward the lowest column index.

    torch.topk leaves the choice among tied values unspecified, so with (say) bfloat16 teacher
    logits the kept tokens, and with them the loss, could depend on the TP layout. Returns
    (values_CK, index_CK) ordered by value descending, then index ascending.
    """
    if k == 0:  # a shard with no real columns
        return x_CN.new_empty(x_CN.shape[0], 0), torch.empty(
            x_CN.shape[0], 0, dtype=torch.long, device=x_CN.device
        )
    kth_C1 = x_CN.topk(k, dim=1).values[:, -1:]
    above_CN, at_CN = x_CN > kth_C1, x_CN == kth_C1
    room_C1 = k - above_CN.sum(dim=1, keepdim=True)
    keep_CN = above_CN | (at_CN & (at_CN.cumsum(dim=1) <= room_C1))
    idx_CK = keep_CN.nonzero()[:, 1].view(x_CN.shape[0], k)  # row-major: each row's k columns, ascending
    return _order_by_value_then_id(x_CN.gather(1, idx_CK), idx_CK)


def _order_by_value_then_id(vals_CK: torch.Tensor, ids_CK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by value descending; a stable sort of id-ascending rows keeps ties by id."""
    by_id_CK = ids_CK.argsort(dim=1, stable=True)
    vals_CK, ids_CK = vals_CK.gather(1, by_id_CK), ids_CK.gather(1, by_id_CK)
    by_val_CK = vals_CK.sort(dim=1, descending=True, stable=True).indices
    return vals_CK.gather(1, by_val_CK), ids_CK.gather(1, by_val_CK)


def global_topk(
    x_CN: torch.Tensor, k: int, first_id: int, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k values and GLOBAL vocab ids of each row across all TP shards.

    Each rank takes its local top-k, the candidates (values and ids) of all ranks are
    all-gathered, and every rank picks the same global top-k from the P * K candidates. Ties
    go to the lowest global id at every step, so the result does not depend on the TP layout.

    Returns:
        (values_CK, ids_CK), by value descending then id ascending, identical on every rank.
    """
    k_local = min(k, x_CN.shape[1])
    vals_CK, ids_CK = _topk_lowest_id_ties(x_CN, k_local)
    ids_CK = ids_CK + first_id
    if k_local < k:  # a shard narrower than k (mostly padding) offers -inf candidates
        pad = (x_CN.shape[0], k - k_local)
        vals_CK = torch.cat([vals_CK, x_CN.new_full(pad, float("-inf"))], dim=1)
        ids_CK = torch.cat([ids_CK, ids_CK.new_full(pad, _NO_ID)], dim=1)
    if group_size(group) == 1:
        return vals_CK, ids_CK
    # Values and ids travel in one float64 tensor: both convert exactly (ids < 2**53).
    packed_2CK = torch.stack([vals_CK.to(torch.float64), ids_CK.to(torch.float64)])
    parts = [torch.empty_like(packed_2CK) for _ in range(group_size(group))]
    dist.all_gather(parts, packed_2CK, group=group)
    cand_2CPK = torch.cat(parts, dim=2)
    top_vals_CK, top_ids_CK = _order_by_value_then_id(cand_2CPK[0], cand_2CPK[1].to(torch.long))
    return top_vals_CK[:, :k].to(x_CN.dtype), top_ids_CK[:, :k]


def in_shard(ids_CK: torch.Tensor, first_id: int, n_cols: int) -> torch.Tensor:
    """Which global ids fall in this rank's valid columns (bool, same shape as ``ids_CK``)."""
    return (ids_CK >= first_id) & (ids_CK < first_id + n_cols)


def gather_global_columns(
    x_CN: torch.Tensor,
    ids_CK: torch.Tensor,
    first_id: int,
    group: dist.ProcessGroup | None,
    rows_C: torch.Tensor | None = None,
) -> torch.Tensor:
    """x[c, ids[c, j]] for global ids that may live on any rank (one all-reduce of [C, K]).

    The owner rank contributes the value, the others contribute 0, so the sum is exact. With
    ``rows_C``, ``x`` is a whole [T, N] shard and row c is read from its row ``rows_C[c]``
    (nothing but the picked entries is read).
    """
    n_cols = x_CN.shape[1]
    inside_CK = in_shard(ids_CK, first_id, n_cols)
    if n_cols == 0:
        picked_CK = x_CN.new_zeros(ids_CK.shape)
    else:
        cols_CK = (ids_CK - first_id).clamp(0, n_cols - 1)
        picked_CK = x_CN.gather(1, cols_CK) if rows_C is None else x_CN[rows_C[:, None], cols_CK]
        picked_CK = torch.where(inside_CK, picked_CK, 0.0)
    if group_size(group) > 1:
        dist.all_reduce(picked_CK, op=ReduceOp.SUM, group=group)
    return picked_CK


def spare_column_index(ids_CK: torch.Tensor, first_id: int, n_cols: int) -> torch.Tensor:
    """Local columns of global ``ids_CK``, ids owned by other ranks routed to a spare column N:
    scattered into [C, N + 1] and cut back to [C, N], they touch this rank's columns only."""
    return torch.where(in_shard(ids_CK, first_id, n_cols), ids_CK - first_id, n_cols)


def named_columns(cols_CK: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Boolean [C, N], True at the columns ``cols_CK`` names (``spare_column_index``'s output;
    pure, so the compiled passes use it too)."""
    mask = torch.zeros(cols_CK.shape[0], n_cols + 1, dtype=torch.bool, device=cols_CK.device)
    return mask.scatter(1, cols_CK, True)[:, :n_cols]


def columns_mask(ids_CK: torch.Tensor, first_id: int, n_cols: int) -> torch.Tensor:
    """Boolean [C, N] mask of the local columns named by global ``ids_CK`` (others ignored)."""
    return named_columns(spare_column_index(ids_CK, first_id, n_cols), n_cols)
