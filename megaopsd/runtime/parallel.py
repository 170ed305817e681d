"""Megatron parallel state, created in one place and handed out as an object.

megatron-core keeps its process groups in module globals (``parallel_state``); megaopsd
creates them exactly once, here, and passes a frozen ``ParallelState`` down to the code that
needs a group, so nothing below the trainer calls megatron's global getters for layout.

Usage::

    runtime = Runtime.start(parallel_cfg, runtime_cfg)   # process group, emulation, groups, seeds
    ...
    runtime.shutdown()
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from megaopsd.config import ParallelConfig, RuntimeConfig
from megaopsd.runtime import cpu_emulation
from megaopsd.runtime.distributed import LaunchEnv, init_process_group, read_launch_env, select_device


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelState:
    """Sizes, ranks and process groups of one rank's place in the TP x PP x DP grid."""

    tp_size: int
    pp_size: int
    dp_size: int
    vpp_size: int | None
    sequence_parallel: bool
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    mp_group: dist.ProcessGroup | None = None  # the TP x PP ranks of this data-parallel replica
    # Uneven pipeline stages (ParallelConfig); None: the layers split evenly.
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None
    # Mixture-of-experts layers: the experts are dealt over the EP group (this rank holds experts
    # ep_rank x E / ep_size onwards) and each expert's linears split over the expert-TP group.
    ep_size: int = 1
    ep_rank: int = 0
    etp_size: int = 1
    etp_rank: int = 0
    edp_rank: int = 0  # the expert-data-parallel replica: ranks holding the same experts share none
    ep_group: dist.ProcessGroup | None = None
    etp_group: dist.ProcessGroup | None = None

    def split(self, expert: bool) -> tuple[int, int, dist.ProcessGroup | None]:
        """(size, rank, group) of the tensor-parallel split of a dense or an expert parameter."""
        if expert:
            return self.etp_size, self.etp_rank, self.etp_group
        return self.tp_size, self.tp_rank, self.tp_group

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def initialize_parallel_state(cfg: ParallelConfig, *, seed: int, gloo_side_groups: bool) -> ParallelState:
    """Create megatron-core's TP/PP/DP groups and RNG tracker; return them as one object.

    ``gloo_side_groups``: also create megatron's gloo copies of the DP groups (used by the
    distributed optimizer's checkpointing on GPU); on CPU every group is gloo already.
    """
    from megatron.core import parallel_state as mps
    from megatron.core import tensor_parallel

    mps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=cfg.expert_model_parallel_size,
        expert_tensor_parallel_size=cfg.expert_tensor_parallel_size,
        create_gloo_process_groups=gloo_side_groups,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelState(
        tp_size=mps.get_tensor_model_parallel_world_size(),
        pp_size=mps.get_pipeline_model_parallel_world_size(),
        dp_size=mps.get_data_parallel_world_size(),
        vpp_size=cfg.virtual_pipeline_model_parallel_size,
        sequence_parallel=cfg.sequence_parallel,
        tp_rank=mps.get_tensor_model_parallel_rank(),
        pp_rank=mps.get_pipeline_model_parallel_rank(),
        dp_rank=mps.get_data_parallel_rank(),
        tp_group=mps.get_tensor_model_parallel_group(),
        pp_group=mps.get_pipeline_model_parallel_group(),
        dp_group=mps.get_data_parallel_group(),
        mp_group=mps.get_model_parallel_group(),
        num_layers_in_first_pipeline_stage=cfg.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=cfg.num_layers_in_last_pipeline_stage,
        ep_size=mps.get_expert_model_parallel_world_size(),
        ep_rank=mps.get_expert_model_parallel_rank(),
        etp_size=mps.get_expert_tensor_parallel_world_size(),
        etp_rank=mps.get_expert_tensor_parallel_rank(),
        edp_rank=mps.get_expert_data_parallel_rank(),
        ep_group=mps.get_expert_model_parallel_group(),
        etp_group=mps.get_expert_tensor_parallel_group(),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Runtime:
    """Everything a rank knows about where and how it runs."""

    launch: LaunchEnv
    device: torch.device
    parallel: ParallelState
    cpu_emulation: bool

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def is_main(self) -> bool:
        return self.launch.rank == 0

    @classmethod
    def start(cls, parallel: ParallelConfig, runtime: RuntimeConfig) -> Runtime:
        """Start the process group, CPU emulation (CPU only) and Megatron parallel state."""
        launch = read_launch_env()
        device = select_device(runtime.device, launch)
        emulate = device.type == "cpu" and runtime.cpu_emulation
        if emulate:
            cpu_emulation.enable(force=runtime.device == "cpu")
        if device.type == "cpu" and runtime.cpu_threads > 0:
            # torch._C.set_num_threads: vLLM's in-process engine replaces torch.set_num_threads.
            torch._C.set_num_threads(runtime.cpu_threads)
        init_process_group(launch, device, timeout_minutes=runtime.distributed_timeout_minutes)
        state = initialize_parallel_state(parallel, seed=runtime.seed, gloo_side_groups=device.type == "cuda")
        return cls(launch=launch, device=device, parallel=state, cpu_emulation=emulate)

    def shutdown(self) -> None:
        """Destroy Megatron's groups and the default process group; remove the emulation."""
        from megatron.core import parallel_state as mps

        # An in-process vLLM engine destroys the default group when it shuts down; megatron's
        # groups are gone with it then, and destroying them again raises.
        if dist.is_initialized():
            mps.destroy_model_parallel()
            dist.destroy_process_group()
        if self.cpu_emulation:
            cpu_emulation.disable()
