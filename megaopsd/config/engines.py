"""Where the rollout engines live: one ``EngineLayout`` per job, derived once from the config.

    layout = engine_layout(cfg.rollout, world_size)
    layout.placement, layout.num_engines, layout.engine_of(rank), layout.leader(engine)

Validation, the fleet, the trainer and the dry run all read this one object.
"""

from __future__ import annotations

import dataclasses

from megaopsd.config.schema import RolloutConfig

PLACEMENT_KINDS = ("single", "colocated", "rank0")  # single: one trainer process, its in-process engine


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineLayout:
    """Which rank belongs to which engine.

    Attributes:
        placement: ``single``, ``colocated`` or ``rank0``.
        world_size: trainer processes.
        engine_tp: ranks per engine (colocated only; 1 otherwise).
    """

    placement: str
    world_size: int
    engine_tp: int = 1

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENT_KINDS:
            raise ValueError(f"placement={self.placement!r}; use {', '.join(PLACEMENT_KINDS)}")
        if self.world_size % self.engine_tp:
            raise ValueError(f"engine_tp={self.engine_tp} does not divide world_size={self.world_size}")

    @property
    def num_engines(self) -> int:
        return self.world_size // self.engine_tp if self.placement == "colocated" else 1

    def engine_of(self, rank: int) -> int | None:
        """The engine rank ``rank`` hosts a worker of, or None."""
        if self.placement == "colocated":
            return rank // self.engine_tp
        return 0 if rank == 0 else None

    def leader(self, engine: int) -> int:
        """The rank that reports an engine's results (its first rank)."""
        return engine * self.engine_tp if self.placement == "colocated" else 0


def rollout_placement(cfg: RolloutConfig, world_size: int) -> str:
    """``single`` (one process, in-process engine), ``colocated`` or ``rank0``."""
    if world_size == 1:
        return "single"
    return cfg.placement or "colocated"


def engine_layout(cfg: RolloutConfig, world_size: int) -> EngineLayout:
    """The job's engines: placement from ``rollout.placement``, engine TP when colocated."""
    placement = rollout_placement(cfg, world_size)
    engine_tp = cfg.tensor_parallel_size if placement == "colocated" else 1
    return EngineLayout(placement=placement, world_size=world_size, engine_tp=engine_tp)
