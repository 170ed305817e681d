"""Streaming export: Megatron shards (any TP/PP/VPP) -> ``(hf_name, full_tensor)`` on chosen ranks.

Every rank of the job calls the same function and must run the iterator to the end; tensors
are yielded only on the destination rank(s). The model never exists in full anywhere: one
Megatron parameter at a time is gathered over TP to TP rank 0 of the stage that owns it
(data-parallel replica 0), converted to its Hugging Face tensors (fused QKV and gate/up split, vocabulary
padding dropped) and sent from that stage's TP rank 0 to each destination.

    plan = export_plan(chunks, spec, runtime.parallel)            # collective; names, shapes, bytes
    for name, tensor in export_hf_weights(chunks, spec, runtime.parallel, plan=plan):
        ...                                                          # only on rank 0 by default

Order: embedding, then layer by layer (q, k, v of a layer together, gate and up together),
final norm, output layer. Weight-sync buckets rely on fused members arriving together.

To every rank (colocated engines) each data-parallel replica exports its own shards (replicas
hold bit-identical weights after a step), over one of two paths with the same tensors: the
collectives (TP all-gather in the owning stage, broadcast from its TP rank 0 to the replica's
other stages), or, for CPU ranks on one host, a ``HostExchange``: every rank reads the shards
from shared memory and places them straight into the HF tensors (``Layout.shard_to_hf``). That
path yields round by round (each round carries items of every stage, in plan order within the
round).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from megaopsd.config.hf_spec import HFModelSpec
from megaopsd.convert.families import Rule, mapping_for
from megaopsd.convert.layouts import Geometry, Layout
from megaopsd.convert.params import ParamRef, local_params
from megaopsd.models.lora import merged_shard
from megaopsd.runtime.host_exchange import HostExchange, aligned
from megaopsd.runtime.parallel import ParallelState


@dataclasses.dataclass(frozen=True)
class ExportItem:
    """One Megatron parameter's worth of HF tensors, and who produces it."""

    key: tuple[int, int, int, int]
    hf_names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    owner: int  # global rank that sends (TP rank 0 of the owning stage, DP replica 0)
    producers: tuple[int, ...]  # global ranks that gather it to the owner (the owner's TP group), by TP rank
    shard_shape: tuple[int, ...]  # each producer's Megatron shard
    shard_dtype: torch.dtype
    replicas: tuple[
        tuple[int, ...], ...
    ] = ()  # the producers in each data-parallel replica (``producers`` first)
    expert: bool = False  # one expert's parameter: split over expert TP, replicated over expert DP

    @property
    def shard_bytes(self) -> int:
        return _numel(self.shard_shape) * torch.empty((), dtype=self.shard_dtype).element_size()

    @property
    def nbytes(self) -> int:
        size = torch.empty((), dtype=self.dtype).element_size()
        return sum(size * _numel(shape) for shape in self.shapes)


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """Everything an export will yield, known before any tensor moves (same on every rank)."""

    items: tuple[ExportItem, ...]
    replica_of: tuple[int, ...] = ()  # data-parallel replica of every global rank
    expert_replica_of: tuple[int, ...] = ()  # expert-data-parallel replica of every global rank

    def _replicas(self, expert: bool) -> tuple[int, ...]:
        return self.expert_replica_of if expert else self.replica_of

    def producers(self, item: ExportItem, rank: int) -> tuple[int, ...]:
        """The ranks of ``rank``'s data-parallel replica that hold ``item``, by TP rank.

        Replicas hold bit-identical weights after every step, so a colocated export reads each
        replica's own shards and moves nothing between replicas. An expert's replica is its
        expert-data-parallel one: with expert parallelism the ranks of one data-parallel replica
        hold different experts, and each rank gets the others' from their owners in its
        expert-data-parallel replica.
        """
        return item.replicas[self._replicas(item.expert)[rank]]

    def replica_ranks(self, rank: int, expert: bool = False) -> list[int]:
        """Every rank of ``rank``'s data-parallel (``expert``: expert-data-parallel) replica."""
        of = self._replicas(expert)
        return [r for r, replica in enumerate(of) if replica == of[rank]]

    @property
    def names(self) -> list[str]:
        return [name for item in self.items for name in item.hf_names]

    @property
    def entries(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """``(name, shape, dtype)`` per HF tensor, in yield order."""
        return [(n, s, item.dtype) for item in self.items for n, s in zip(item.hf_names, item.shapes)]

    @property
    def total_bytes(self) -> int:
        return sum(item.nbytes for item in self.items)

    @property
    def max_shard_bytes(self) -> int:
        """The largest Megatron shard one rank holds: the slot a ``HostExchange`` for this plan needs."""
        return max((item.shard_bytes for item in self.items), default=0)


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def geometry(spec: HFModelSpec, tp_size: int) -> Geometry:
    """The numbers the layouts need, for ``spec`` at tensor-parallel size ``tp_size``."""
    return Geometry(
        num_heads=spec.num_attention_heads,
        num_groups=spec.num_query_groups,
        head_dim=spec.head_dim,
        vocab_size=spec.vocab_size,
        tp_size=tp_size,
    )


def _full_shape(ref: ParamRef, tp_size: int) -> list[int]:
    shape = list(ref.tensor.shape)
    if ref.rule.layout.tp_dim is not None:
        shape[ref.rule.layout.tp_dim] *= tp_size
    return shape


def _geometries(spec: HFModelSpec, parallel: ParallelState) -> dict[bool, Geometry]:
    """The layouts' numbers for dense parameters (TP) and for experts (expert TP)."""
    return {False: geometry(spec, parallel.tp_size), True: geometry(spec, parallel.etp_size)}


def export_plan(
    chunks: Sequence[torch.nn.Module],
    spec: HFModelSpec,
    parallel: ParallelState,
    *,
    include_tied_lm_head: bool = False,
    dtype: torch.dtype | None = None,
) -> ExportPlan:
    """Collective: agree on every HF tensor of the export, its shape, dtype and sending rank.

    Args:
        chunks: this rank's GPTModel chunks.
        spec: the model's HF config.
        parallel: this rank's layout.
        include_tied_lm_head: with tied embeddings, also export ``lm_head.weight`` (HF
            checkpoints of tied models do not store it; a weight sync does not need it either:
            ``rollout/weight_sync.py`` sends the embedding under that name).
        dtype: cast every tensor to this dtype; None keeps each parameter's own dtype.
    """
    geos = _geometries(spec, parallel)
    refs = local_params(chunks, mapping_for(spec), spec, include_tied_lm_head=include_tied_lm_head)
    mine = []
    for ref in refs:
        expert = ref.rule.expert
        size, tp_rank, _ = parallel.split(expert)
        shapes = tuple(ref.rule.layout.hf_shapes(_full_shape(ref, size), geos[expert]))
        replica = parallel.edp_rank if expert else parallel.dp_rank
        mine.append(
            (
                ref.key,
                replica,
                tp_rank,
                ref.hf_names,
                shapes,
                dtype or ref.tensor.dtype,
                tuple(ref.tensor.shape),
                ref.tensor.dtype,
                expert,
            )
        )
    report = (dist.get_rank(), parallel.dp_rank, parallel.edp_rank, mine)
    reports: list = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    by_key: dict[tuple[int, int, int, int], list] = {}
    for rank, _, _, entries in reports:
        for key, replica, tp_rank, *entry in entries:
            by_key.setdefault(key, []).append((replica, tp_rank, rank, *entry))
    items = []
    for key in sorted(by_key):
        holders = sorted(by_key[key], key=lambda holder: holder[:3])
        _, _, owner, names, shapes, item_dtype, shard_shape, shard_dtype, expert = holders[0]
        replicas: dict[int, list[int]] = {}
        for replica, _, rank, *_ in holders:
            replicas.setdefault(replica, []).append(rank)
        in_order = tuple(tuple(replicas[d]) for d in sorted(replicas))
        items.append(
            ExportItem(
                key, names, shapes, item_dtype, owner, in_order[0], shard_shape, shard_dtype, in_order, expert
            )
        )
    replica_of = tuple(dp_rank for _, dp_rank, _, _ in reports)
    expert_replica_of = tuple(edp_rank for _, _, edp_rank, _ in reports)
    return ExportPlan(tuple(items), replica_of, expert_replica_of)


@dataclasses.dataclass
class ExportMeter:
    """Bytes an export allocates on this rank for one parameter at a time (TP gathers), at peak."""

    gather_peak_bytes: int = 0


def _gather_full(ref: ParamRef, parallel: ParallelState, is_owner: bool) -> torch.Tensor | None:
    """The TP-gathered Megatron tensor of ``ref`` on the owner (TP rank 0); None elsewhere.

    All ranks of the owner's TP group call this. A gather to one rank moves half the bytes of
    an all_gather at TP2 (measured 0.54 s vs 0.91 s for 2 x 200 MB over gloo).
    """
    local = merged_shard(ref.tensor)  # LoRA: W + (alpha/r) B A on this shard; else the weight
    dim = ref.rule.layout.tp_dim
    size, _, group = parallel.split(ref.rule.expert)
    if dim is None or size == 1:
        return local if is_owner else None
    parts = [torch.empty_like(local) for _ in range(size)] if is_owner else None
    dist.gather(local.contiguous(), parts, group=group, group_dst=0)
    return torch.cat(parts, dim=dim) if is_owner else None


def _all_gather_full(ref: ParamRef, parallel: ParallelState, meter: ExportMeter | None) -> torch.Tensor:
    """The full Megatron tensor of ``ref`` on every rank of its TP group (they all need it)."""
    local = merged_shard(ref.tensor)  # LoRA: W + (alpha/r) B A on this shard; else the weight
    dim = ref.rule.layout.tp_dim
    size, _, group = parallel.split(ref.rule.expert)
    if dim is None or size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    full = torch.cat(parts, dim=dim)
    if meter is not None:  # the shards and their concatenation
        meter.gather_peak_bytes = max(meter.gather_peak_bytes, 2 * full.numel() * full.element_size())
    return full


# Broadcast groups of the export to every rank, by member ranks; created collectively, in plan order.
_RECEIVER_GROUPS: dict[tuple[int, tuple[int, ...]], dist.ProcessGroup | None] = {}


def _receivers(item: ExportItem, plan: ExportPlan, me: int) -> dist.ProcessGroup | None:
    """In ``me``'s replica: the item's owner plus every rank outside the owner's TP group (None:
    nobody else needs it).

    The TP peers of the owner got the full tensor from the all-gather already. Every rank calls
    this for every item and creates every replica's group, so a new group is created by all
    ranks at the same point.
    """
    mine = None
    for producers in item.replicas:
        replica = plan.replica_ranks(producers[0], item.expert)
        members = tuple(sorted({producers[0]} | (set(replica) - set(producers))))
        key = (id(dist.group.WORLD), members)
        if key not in _RECEIVER_GROUPS:
            _RECEIVER_GROUPS[key] = dist.new_group(list(members)) if len(members) > 1 else None
        if me in replica:
            mine = _RECEIVER_GROUPS[key]
    return mine


def _to_every_rank(
    item: ExportItem,
    plan: ExportPlan,
    ref: ParamRef | None,
    parallel: ParallelState,
    geos: dict[bool, Geometry],
    meter: ExportMeter | None,
    device: torch.device,
) -> list[torch.Tensor]:
    """One item's HF tensors on every rank: in each data-parallel replica, all-gather inside
    the owning TP group, then a broadcast from its TP rank 0 to the replica's other stages."""
    me = dist.get_rank()
    group = _receivers(item, plan, me)
    producers = plan.producers(item, me)
    owner = producers[0]
    tensors: list[torch.Tensor] = []
    if me in producers:
        full = _all_gather_full(ref, parallel, meter)
        tensors = [t.to(item.dtype).contiguous() for t in ref.rule.layout.to_hf(full, geos[item.expert])]
        del full
        if me == owner and group is not None:
            for tensor in tensors:
                dist.broadcast(tensor, owner, group=group)
        return tensors
    for shape in item.shapes:
        buffer = torch.empty(shape, dtype=item.dtype, device=device)
        dist.broadcast(buffer, owner, group=group)
        tensors.append(buffer)
    return tensors


def _sources(producers: tuple[int, ...], layout: Layout) -> tuple[int, ...]:
    """The ranks whose shards make an item in one replica: its TP group, or the TP rank 0 of a
    whole tensor (replicated over TP, or TP1)."""
    return producers if layout.tp_dim is not None and len(producers) > 1 else producers[:1]


Round = list[tuple[ExportItem, Layout, int]]  # items with their layout and byte offset in the slots


def _shared_rounds(items: Sequence[ExportItem], rules: Sequence[Rule], slot_bytes: int) -> Iterator[Round]:
    """Pack the items into exchange rounds: as many as the ranks' slots hold, every stage's in each.

    Each rank's slot holds the shards that rank publishes in a round; an item's shards sit at
    one offset in the slots of its sources (in every replica). Items are taken in plan order from
    one queue per set of sources (a pipeline stage's TP groups, or one rank per replica for whole
    tensors), in turn, so a round carries every stage's items and each rank publishes and copies
    out about as much per round: no rank idles while another copies. Every rank computes the
    same rounds.
    """
    queues: dict[tuple[int, ...], collections.deque] = {}
    for item in items:
        layout = rules[item.key[2]].layout
        sources = tuple(rank for producers in item.replicas for rank in _sources(producers, layout))
        queues.setdefault(sources, collections.deque()).append((item, layout))
    while any(queues.values()):
        used: dict[int, int] = collections.defaultdict(int)
        batch: Round = []
        progress = True
        while progress:
            progress = False
            for sources, queue in queues.items():
                if not queue:
                    continue
                item, layout = queue[0]
                offset = max(used[rank] for rank in sources)
                end = offset + aligned(item.shard_bytes)
                if end > slot_bytes:
                    continue  # the next round (a slot holds the largest shard, so it fits an empty one)
                queue.popleft()
                batch.append((item, layout, offset))
                for rank in sources:
                    used[rank] = end
                progress = True
        yield sorted(batch, key=lambda entry: entry[0].key)


def _every_rank_shared(
    plan: ExportPlan,
    refs: dict[tuple[int, int, int], ParamRef],
    rules: Sequence[Rule],
    exchange: HostExchange,
    geos: dict[bool, Geometry],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every item's HF tensors on every rank of one host, through shared memory.

    Per round (``_shared_rounds``): in each data-parallel replica, the sources publish their
    shards (unless the replica is one rank), then every rank places all shards of each item
    straight into that item's HF tensors: no gather buffers, no concatenation, no broadcast,
    nothing read across replicas. A rank holding a whole parameter yields it as the collective
    path does (no copy where possible). Every placement of a round happens before the next
    ``publish`` (the generator only gets there after them), as views require.
    """
    me = dist.get_rank()
    # nobody reads this rank's shards
    alone = len(plan.replica_ranks(me)) == 1 and len(plan.replica_ranks(me, expert=True)) == 1
    for batch in _shared_rounds(plan.items, rules, exchange.slot_bytes):
        sources = {item.key: _sources(plan.producers(item, me), layout) for item, layout, _ in batch}
        local = {
            item.key: merged_shard(refs[item.key].tensor)  # LoRA: W + (alpha/r) B A; else the weight
            for item, _, _ in batch
            if me in sources[item.key]
        }
        exchange.publish(
            [] if alone else [(offset, local[item.key]) for item, _, offset in batch if item.key in local]
        )
        for item, layout, offset in batch:
            geo = geos[item.expert]
            if sources[item.key] == (me,):
                tensors = [t.to(item.dtype).contiguous() for t in layout.to_hf(local[item.key], geo)]
            else:
                tensors = [torch.empty(shape, dtype=item.dtype) for shape in item.shapes]
                for tp_rank, rank in enumerate(sources[item.key]):
                    shard = local.get(item.key) if rank == me else None
                    if shard is None:
                        shard = exchange.view(rank, offset, item.shard_shape, item.shard_dtype)
                    layout.shard_to_hf(shard, geo, tp_rank, tensors)
            yield from zip(item.hf_names, tensors)


def export_hf_weights(
    chunks: Sequence[torch.nn.Module],
    spec: HFModelSpec,
    parallel: ParallelState,
    *,
    dst_ranks: Sequence[int] | None = (0,),
    include_tied_lm_head: bool = False,
    dtype: torch.dtype | None = None,
    plan: ExportPlan | None = None,
    meter: ExportMeter | None = None,
    exchange: HostExchange | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the model's Hugging Face tensors to ``dst_ranks``.

    Collective: every rank of the world must call this and exhaust the iterator (ranks that are
    not destinations get nothing from it but take part in the gathers and sends).

    Args:
        chunks: this rank's GPTModel chunks (any TP/PP/VPP layout).
        spec: the model's HF config.
        parallel: this rank's layout.
        dst_ranks: global ranks that receive the tensors; None: every rank (colocated engines):
            the owning stage's TP group all-gathers, and its TP rank 0 broadcasts to the ranks
            outside that group.
        include_tied_lm_head: see ``export_plan``.
        dtype: see ``export_plan``.
        plan: a plan from ``export_plan`` with the same options (computed here when None).
        meter: records the largest TP gather this rank made (bytes).
        exchange: with ``dst_ranks=None`` on CPU, every rank of the world on one host: shards
            travel through this shared memory (slots of ``plan.max_shard_bytes``) instead of
            the all-gather and broadcast; the tensors are the same.

    Yields:
        ``(hf_name, tensor)`` on destination ranks, in ``plan`` order (with ``exchange``: round
        by round, plan order within a round; an item's tensors always together); tensors are
        full (unsharded, unpadded). On an owning rank a tensor may share memory with a parameter
        (TP1, no cast): copy it if it must outlive the next optimizer step.
    """
    if plan is None:
        plan = export_plan(chunks, spec, parallel, include_tied_lm_head=include_tied_lm_head, dtype=dtype)
    geos = _geometries(spec, parallel)
    me = dist.get_rank()
    # Look parameters up in the superset (tied lm_head included); the plan decides what is sent.
    refs = {ref.key: ref for ref in local_params(chunks, mapping_for(spec), spec, include_tied_lm_head=True)}
    device = next(iter(chunks[0].parameters())).device
    if dst_ranks is None and exchange is not None:
        yield from _every_rank_shared(plan, refs, mapping_for(spec).rules, exchange, geos)
        return
    for item in plan.items:
        if dst_ranks is None:
            yield from zip(
                item.hf_names, _to_every_rank(item, plan, refs.get(item.key), parallel, geos, meter, device)
            )
            continue
        tensors: list[torch.Tensor] | None = None
        if me in item.producers:
            full = _gather_full(refs[item.key], parallel, is_owner=me == item.owner)
            if me == item.owner:
                if meter is not None and parallel.split(item.expert)[0] > 1:
                    meter.gather_peak_bytes = max(
                        meter.gather_peak_bytes, 2 * full.numel() * full.element_size()
                    )
                layout = refs[item.key].rule.layout
                tensors = [t.to(item.dtype).contiguous() for t in layout.to_hf(full, geos[item.expert])]
                for dst in dst_ranks:
                    if dst != me:
                        for tensor in tensors:
                            dist.send(tensor, dst)
        if me not in dst_ranks:
            continue
        if me != item.owner:
            tensors = []
            for shape in item.shapes:
                buffer = torch.empty(shape, dtype=item.dtype, device=device)
                dist.recv(buffer, item.owner)
                tensors.append(buffer)
        yield from zip(item.hf_names, tensors)
