"""Refit: the trainer's Megatron shards -> every engine, in memory, bucket by bucket.

    export_hf_weights (TP all-gather inside the owning stage, broadcast to the other ranks;
                       on CPU with every rank on one host: shards through shared memory)
        -> EngineFleet.update_weights (wake weights, buckets, engine reload, wake KV cache)

``Refitter`` holds what a job's refits share: the export plan, agreed once, and on CPU the
shared memory the export moves shards through (``runtime/host_exchange.py``; gloo would push
them through loopback TCP at a fraction of memory bandwidth). Collective: every rank refits
with its own chunks. Peak extra memory per rank: on CUDA the allocator's peak over the sync; on
CPU (no allocator statistics) the accounted peak: the largest bucket, plus the largest TP gather
this rank made or the shared-memory slots it holds. Reported as the maximum over ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from megaopsd.config.hf_spec import HFModelSpec
from megaopsd.convert import export_hf_weights, export_plan
from megaopsd.convert.export import ExportMeter, ExportPlan
from megaopsd.rollout.fleet import EngineFleet
from megaopsd.rollout.weight_sync import complete_modules
from megaopsd.runtime.distributed import collective_device
from megaopsd.runtime.host_exchange import HostExchange, Unavailable
from megaopsd.runtime.parallel import ParallelState

MIB = 1 << 20


def refit(
    fleet: EngineFleet,
    modules: Sequence[torch.nn.Module],
    spec: HFModelSpec,
    parallel: ParallelState,
    plan: ExportPlan,
    exchange: HostExchange | None = None,
) -> dict[str, float]:
    """Push the current weights into every engine; ``perf/weight_sync_gb`` and ``..._peak_mb``.

    Args:
        fleet: the job's engines.
        modules: this rank's unwrapped GPTModel chunks.
        spec: the model's HF config.
        parallel: this rank's layout.
        plan: ``export_plan(modules, spec, parallel)``, agreed once (a tied ``lm_head`` need not
            be exported: the sync sends the embedding under that name).
        exchange: shared memory for a colocated export (``open_exchange``); None: collectives.
    """
    meter = ExportMeter()
    cuda = torch.cuda.is_available() and next(iter(modules[0].parameters())).is_cuda
    base = 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    weights = export_hf_weights(
        modules,
        spec,
        parallel,
        dst_ranks=fleet.weight_destinations,
        plan=plan,
        meter=meter,
        exchange=exchange,
    )
    stats = fleet.update_weights(complete_modules(weights, plan.names))
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        held = exchange.nbytes if exchange is not None else meter.gather_peak_bytes
        peak = (stats.max_bucket_bytes if stats else 0) + held
    sent = float(stats.bytes) if stats else 0.0
    reduced = torch.tensor([float(peak), sent], dtype=torch.float64, device=collective_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return {
        "perf/weight_sync_gb": float(reduced[1]) / 1e9,
        "perf/weight_sync_peak_mb": float(reduced[0]) / MIB,
    }


def open_exchange(
    plan: ExportPlan, fleet: EngineFleet, modules: Sequence[torch.nn.Module], *, enabled: bool = True
) -> tuple[HostExchange | None, str]:
    """Collective: shared memory for the export, when this job's refit can use it.

    Used on CPU with colocated engines (every rank receives every tensor) and every rank on one
    host. On GPUs NCCL already moves tensors inside a node through shared memory or NVLink.

    Returns:
        The exchange (None: the export uses the collectives) and a line saying which and why.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    on_cpu = next(iter(modules[0].parameters())).device.type == "cpu"
    if world == 1 or fleet.weight_destinations is not None or not on_cpu:
        return None, "weight sync: collectives"
    if not enabled:
        return None, "weight sync: collectives (rollout.shared_memory_export=false)"
    try:
        exchange = HostExchange.open(plan.max_shard_bytes)
    except Unavailable as exc:
        return None, f"weight sync: collectives; shared memory unavailable: {exc}"
    return exchange, f"weight sync: shards through shared memory ({exchange.nbytes / MIB:.1f} MiB per rank)"


class Refitter:
    """A job's refits: the plan agreed once, and the shared memory on CPU (collective to build).

    Args:
        fleet: the job's engines.
        modules: this rank's unwrapped GPTModel chunks.
        spec: the model's HF config.
        parallel: this rank's layout.
        shared_memory: allow the shared-memory export (``rollout.shared_memory_export``).
    """

    def __init__(
        self,
        fleet: EngineFleet,
        modules: Sequence[torch.nn.Module],
        spec: HFModelSpec,
        parallel: ParallelState,
        *,
        shared_memory: bool = True,
    ) -> None:
        self.fleet, self.spec, self.parallel = fleet, spec, parallel
        self.plan = export_plan(modules, spec, parallel)
        self.exchange, self.transport = open_exchange(self.plan, fleet, modules, enabled=shared_memory)

    def __call__(self, modules: Sequence[torch.nn.Module]) -> dict[str, float]:
        """Push ``modules``' current weights into every engine (see ``refit``)."""
        return refit(self.fleet, modules, self.spec, self.parallel, self.plan, self.exchange)

    def close(self) -> None:
        if self.exchange is not None:
            self.exchange.close()
            self.exchange = None
