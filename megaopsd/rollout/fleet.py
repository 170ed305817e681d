"""The job's rollout engines seen from one rank: placement, prompt dispatch, sleep/wake, sync.

Placements (``rollout.placement``):

- ``single``: one trainer process, one in-process engine.
- ``colocated``: a vLLM worker in EVERY trainer process (``external_launcher``); ranks
  ``e*k .. e*k+k-1`` form engine ``e`` (``k = rollout.tensor_parallel_size``), so there are
  ``world / k`` engines. All ranks of one engine submit the same requests (vLLM runs SPMD).
- ``rank0``: one engine on global rank 0, in its own process (weights through files).

Dispatch: a step's prompts are split into contiguous blocks, one per engine. When every engine
lies inside one data-parallel replica and the replicas have equal numbers of engines, each
engine gets a block of the prompts its own replica trains on, and rollouts are exchanged only
inside the replica (its TP x PP ranks). Otherwise the blocks are exchanged over the world and
each rank keeps its replica's slice. Request seeds come from (seed, step, global prompt index),
so a rollout does not depend on which engine made it.

Every method is collective: every rank of the job calls it, in the same order.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megaopsd.config.engines import EngineLayout, engine_layout
from megaopsd.rollout.engine import RolloutEngine, generate_rollouts
from megaopsd.rollout.types import Completion, EngineSettings, Rollout, SamplingSettings
from megaopsd.runtime.signals import stop_signals_blocked

if TYPE_CHECKING:
    from megaopsd.config import Config
    from megaopsd.data.prompts import PromptPair
    from megaopsd.rollout.types import EngineSettings
    from megaopsd.rollout.weight_sync import WeightSyncStats
    from megaopsd.runtime.parallel import Runtime

MIB = 1 << 20


def split_evenly(count: int, parts: int) -> list[range]:
    """``parts`` contiguous ranges covering ``range(count)``; sizes differ by at most one."""
    base, extra = divmod(count, parts)
    bounds = [0]
    for part in range(parts):
        bounds.append(bounds[-1] + base + (1 if part < extra else 0))
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DispatchPlan:
    """Which prompts each engine generates and where the rollouts travel.

    Attributes:
        blocks: global prompt indices per engine (engine id order).
        within_replica: rollouts are exchanged inside each replica only (each engine generates
            for its own replica); otherwise over the world.
    """

    blocks: tuple[range, ...]
    within_replica: bool


def plan_dispatch(
    num_prompts: int, layout: EngineLayout, replica_of_rank: Sequence[int], dp_size: int
) -> DispatchPlan:
    """Give each engine a contiguous block of prompts, from its own replica when possible.

    Args:
        num_prompts: prompts this step (each yields ``n`` rollouts).
        layout: engines and their ranks.
        replica_of_rank: the data-parallel rank of every global rank.
        dp_size: data-parallel replicas; replica ``d`` trains on prompts
            ``[d * P / dp, (d + 1) * P / dp)`` when ``dp`` divides ``P``.
    """
    engines = layout.num_engines
    replicas_of_engine: list[set[int]] = [set() for _ in range(engines)]
    for rank, replica in enumerate(replica_of_rank):
        engine = layout.engine_of(rank)
        if engine is not None:
            replicas_of_engine[engine].add(replica)
    local = (
        layout.placement == "colocated"
        and num_prompts % dp_size == 0
        and all(len(r) == 1 for r in replicas_of_engine)
    )
    if local:
        per_replica: list[list[int]] = [[] for _ in range(dp_size)]
        for engine, replicas in enumerate(replicas_of_engine):
            per_replica[next(iter(replicas))].append(engine)
        local = len({len(e) for e in per_replica}) == 1
    if not local:
        return DispatchPlan(blocks=tuple(split_evenly(num_prompts, engines)), within_replica=False)
    blocks: list[range] = [range(0)] * engines
    for replica, slice_ in enumerate(split_evenly(num_prompts, dp_size)):
        for engine, part in zip(per_replica[replica], split_evenly(len(slice_), len(per_replica[replica]))):
            blocks[engine] = range(slice_.start + part.start, slice_.start + part.stop)
    return DispatchPlan(blocks=tuple(blocks), within_replica=True)


class EngineFleet:
    """All rollout engines of the job behind one object; the trainer's only view of them.

    Phases on a GPU (no-ops where the engine cannot sleep): generation, then ``sleep(level)``
    so the trainer gets the memory back; ``wake_up(["weights"])`` before a weight sync, the sync,
    then ``wake_up(["kv_cache"])``. Generating while asleep wakes everything first.

    Args:
        engine: this rank's engine (a worker of a colocated engine), or None.
        layout: engines and their ranks.
        rank: this process's global rank.
        replica_of_rank: data-parallel rank of every global rank.
        dp_rank: this rank's data-parallel rank.
        dp_size: data-parallel replicas.
        replica_group: the TP x PP ranks of this replica (None in a single process).
        sleep_level: 0 never sleeps; 1 frees the KV cache; 2 the weights as well.
    """

    def __init__(
        self,
        engine: RolloutEngine | None,
        layout: EngineLayout,
        *,
        rank: int,
        replica_of_rank: Sequence[int],
        dp_rank: int,
        dp_size: int,
        replica_group: dist.ProcessGroup | None = None,
        sleep_level: int = 1,
    ) -> None:
        self.engine, self.layout, self.rank = engine, layout, rank
        self.replica_of_rank = list(replica_of_rank)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.replica_group = replica_group
        self.sleep_level = sleep_level
        self.engine_id = layout.engine_of(rank)
        self.is_leader = self.engine_id is not None and layout.leader(self.engine_id) == rank
        self.asleep = False
        self.weights_dropped = False  # slept at level 2: a sync must come before generating

    # ------------------------------------------------------------------ placement facts

    @property
    def weight_destinations(self) -> tuple[int, ...] | None:
        """Ranks the export sends to: None = every rank (colocated), else rank 0."""
        return None if self.layout.placement == "colocated" else (0,)

    @property
    def needs_weights(self) -> bool:
        """The engines dropped their weights (sleep level 2): sync before the next generation."""
        return self.weights_dropped

    # ------------------------------------------------------------------ generation

    def rollouts(
        self, prompts: Sequence[PromptPair], sampling: SamplingSettings, *, step: int
    ) -> list[Rollout]:
        """This replica's rollouts for a step's prompts, prompt-major, global ``prompt_index``."""
        plan = plan_dispatch(len(prompts), self.layout, self.replica_of_rank, self.dp_size)
        mine: list[Rollout] = []
        if self.engine is not None:
            block = plan.blocks[self.engine_id]
            self._awake()
            mine = generate_rollouts(
                self.engine,
                prompts[block.start : block.stop],
                sampling,
                step=step,
                first_prompt_index=block.start,
            )
            self._sleep()
        if plan.within_replica:
            return self._gather(mine, group=self.replica_group)
        everything = self._gather(mine, group=None)
        per_replica = len(everything) // self.dp_size
        return everything[self.dp_rank * per_replica : (self.dp_rank + 1) * per_replica]

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: SamplingSettings,
        *,
        step: int = 0,
        first_prompt_index: int = 0,
        progress: Callable[..., Any] | None = None,
    ) -> list[list[Completion]]:
        """Completions for every prompt on every rank, the prompts split over all engines.

        ``progress`` (a tqdm-like constructor) is shown by the first engine's leader only, for
        its own block: one bar per job, not one per rank.
        """
        blocks = split_evenly(len(prompt_ids), self.layout.num_engines)
        mine: list[list[Completion]] = []
        if self.engine is not None:
            block = blocks[self.engine_id]
            self._awake()
            mine = self.engine.generate(
                prompt_ids[block.start : block.stop],
                sampling,
                step=step,
                first_prompt_index=first_prompt_index + block.start,
                progress=progress if self.is_leader and self.engine_id == 0 else None,
            )
            self._sleep()
        return self._gather(mine, group=None)

    def _gather(self, mine: list, *, group: dist.ProcessGroup | None) -> list:
        """Concatenate the leaders' lists in engine order over ``group`` (None: the world)."""
        size = self.layout.world_size if group is None else dist.get_world_size(group)
        if size == 1 or not dist.is_initialized():
            return mine
        if group is not None and self._group_is_one_engine(group):
            return mine
        parts: list = [None] * size
        entry = (self.engine_id, mine) if self.is_leader else None
        dist.all_gather_object(parts, entry, group=group)
        ordered = sorted((p for p in parts if p is not None), key=lambda p: p[0])
        return [item for _, items in ordered for item in items]

    def _group_is_one_engine(self, group: dist.ProcessGroup) -> bool:
        ranks = dist.get_process_group_ranks(group)
        return len({self.layout.engine_of(r) for r in ranks}) == 1 and self.engine_id is not None

    # ------------------------------------------------------------------ weights and memory

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> WeightSyncStats | None:
        """Wake the weights, load ``weights`` (every rank drains the export), wake the KV cache.

        Returns this rank's sync statistics (None on a rank without an engine).
        """
        if self.engine is None:
            for _ in weights:  # take part in the export's gathers and sends
                pass
            return None
        if self.asleep:
            self.engine.wake_up(["weights"])
        stats = self.engine.update_weights(weights)
        if self.asleep:
            self.engine.wake_up(["kv_cache"])
        self.asleep = self.weights_dropped = False
        return stats

    def _sleep(self) -> None:
        if self.sleep_level > 0:
            self.engine.sleep(self.sleep_level)
            self.asleep = True
            self.weights_dropped = self.sleep_level == 2

    def _awake(self) -> None:
        if not self.asleep:
            return
        if self.weights_dropped:
            raise RuntimeError(
                "the engine slept at level 2 (weights dropped) and no weight sync followed; "
                "sync before generating or use rollout.sleep_level=1"
            )
        self.engine.wake_up(None)
        self.asleep = False

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


# ----------------------------------------------------------------------------- construction


def engine_settings(cfg: Config, placement: str, *, cuda: bool) -> EngineSettings:
    """How this rank's engine (or engine worker) is built, from the config and placement."""

    ro = cfg.rollout
    colocated = placement == "colocated"
    in_process = colocated or (ro.in_process if ro.in_process is not None else placement == "single")
    return EngineSettings.from_config(
        cfg.model.hf_path,
        ro,
        dtype=ro.dtype or cfg.model.dtype,
        in_process=in_process,
        enforce_eager=ro.enforce_eager if ro.enforce_eager is not None else not cuda,
        weight_transport=ro.weight_transport,
        weight_bucket_bytes=ro.weight_bucket_mb * MIB,
        weight_sync_dir=ro.weight_sync_dir,
        tensor_parallel_size=ro.tensor_parallel_size if colocated else 1,
        external_launcher=colocated,
        enable_sleep_mode=cuda and ro.sleep_level > 0,
        gpu_memory_utilization=ro.gpu_memory_utilization if cuda else None,
    )


def _launcher_env(runtime: Runtime) -> None:
    """vLLM's external_launcher reads the torchrun variables; srun (Slurm) does not set them."""
    launch = runtime.launch
    os.environ.update(
        RANK=str(launch.rank),
        LOCAL_RANK=str(launch.local_rank),
        WORLD_SIZE=str(launch.world_size),
    )
    os.environ.setdefault("MASTER_ADDR", launch.master_addr)
    os.environ.setdefault("MASTER_PORT", str(launch.master_port))


def start_fleet(cfg: Config, runtime: Runtime) -> EngineFleet:
    """Build this rank's part of the engines (collective: every rank calls it, after the runtime).

    Colocated engines are built on every rank at once (vLLM creates its own groups over the
    trainer's world); the trainer's groups keep working afterwards. Stop signals stay with the
    trainer: SIGUSR1 is blocked while helper processes may start.
    """
    from megaopsd.rollout.vllm_engine import VllmEngine

    par = runtime.parallel
    layout = engine_layout(cfg.rollout, runtime.world_size)
    placement = layout.placement
    replica_of_rank = [par.dp_rank]
    if runtime.world_size > 1:
        replica_of_rank = [0] * runtime.world_size
        dist.all_gather_object(replica_of_rank, par.dp_rank)
    engine = None
    if layout.engine_of(runtime.rank) is not None:
        settings = engine_settings(cfg, placement, cuda=runtime.device.type == "cuda")
        if placement == "colocated":
            _launcher_env(runtime)
        with stop_signals_blocked([signal.SIGUSR1]):
            engine = VllmEngine(settings)
        if runtime.device.type == "cpu" and cfg.runtime.cpu_threads > 0:
            torch._C.set_num_threads(cfg.runtime.cpu_threads)  # vLLM's CPU worker sets its own count
    return EngineFleet(
        engine,
        layout,
        rank=runtime.rank,
        replica_of_rank=replica_of_rank,
        dp_rank=par.dp_rank,
        dp_size=par.dp_size,
        replica_group=par.mp_group,
        sleep_level=cfg.rollout.sleep_level,
    )
