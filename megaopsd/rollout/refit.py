"""Refit: the trainer's Megatron shards -> every engine, in memory, bucket by bucket.

    export_hf_weights (TP all-gather inside the owning stage, broadcast to the other ranks)
        -> EngineFleet.update_weights (wake weights, buckets, engine reload, wake KV cache)

Collective: every rank calls ``refit`` with its own chunks. Peak extra memory per rank: on
CUDA the allocator's peak over the sync; on CPU (no allocator statistics) the accounted peak,
the largest bucket plus the largest TP gather this rank made. Reported as the maximum over ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from megaopsd.convert import export_hf_weights
from megaopsd.convert.export import ExportMeter, ExportPlan
from megaopsd.models.hf_config import HFModelSpec
from megaopsd.rollout.fleet import EngineFleet
from megaopsd.runtime.distributed import collective_device
from megaopsd.runtime.parallel import ParallelState

MIB = 1 << 20


def refit(
    fleet: EngineFleet,
    modules: Sequence[torch.nn.Module],
    spec: HFModelSpec,
    parallel: ParallelState,
    plan: ExportPlan,
) -> dict[str, float]:
    """Push the current weights into every engine; ``perf/weight_sync_gb`` and ``..._peak_mb``.

    Args:
        fleet: the job's engines.
        modules: this rank's unwrapped GPTModel chunks.
        spec: the model's HF config.
        parallel: this rank's layout.
        plan: ``export_plan(modules, spec, parallel, include_tied_lm_head=tied)``, agreed once.
    """
    meter = ExportMeter()
    cuda = torch.cuda.is_available() and next(iter(modules[0].parameters())).is_cuda
    base = 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    weights = export_hf_weights(
        modules, spec, parallel, dst_ranks=fleet.weight_destinations, plan=plan, meter=meter
    )
    stats = fleet.update_weights(weights)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = (stats.max_bucket_bytes if stats else 0) + meter.gather_peak_bytes
    sent = float(stats.bytes) if stats else 0.0
    reduced = torch.tensor([float(peak), sent], dtype=torch.float64, device=collective_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return {
        "perf/weight_sync_gb": float(reduced[1]) / 1e9,
        "perf/weight_sync_peak_mb": float(reduced[0]) / MIB,
    }
