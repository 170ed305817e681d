"""Runtime: launch-environment detection and the CPU emulation of megatron-core's CUDA calls."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megaopsd.runtime import cpu_emulation
from megaopsd.runtime.cpu_emulation import CudaToCpuMode, _reorder_same_peer_sends
from megaopsd.runtime.distributed import first_host, read_launch_env


def test_torchrun_env():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"}
    launch = read_launch_env(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("torchrun", 3, 4, 1)
    assert (launch.master_addr, launch.master_port) == ("n0", 1234)


def test_slurm_srun_task_env_derives_rendezvous():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_ID": "0",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-10]",
        "SLURM_JOB_ID": "123456",
    }
    launch = read_launch_env(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("slurm", 5, 8, 1)
    assert launch.master_addr == "gpu07"
    assert launch.master_port == 20000 + 123456 % 20000


def test_slurm_batch_step_is_one_process():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "7"}
    launch = read_launch_env(env)
    assert (launch.launcher, launch.rank, launch.world_size) == ("slurm", 0, 1)


def test_torchrun_inside_slurm_wins():
    env = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}
    assert read_launch_env(env).launcher == "torchrun"


def test_single_process():
    launch = read_launch_env({})
    assert (launch.launcher, launch.rank, launch.world_size) == ("single", 0, 1)


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("localhost", "localhost"),
        ("node[03-05,9]", "node03"),
        ("a1,b2", "a1"),
        ("gpu[12]", "gpu12"),
        ("rack1-n[001-004],rack2-n7", "rack1-n001"),
    ],
)
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_emulation_installs_and_restores_everything():
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer import torch_norm

    originals = (
        torch.cuda.current_device,
        torch.cuda.manual_seed,
        mcore_random._get_cuda_rng_state,
        dist.batch_isend_irecv,
        torch_norm.WrappedTorchNorm.__new__,
    )
    handle = cpu_emulation.enable()
    try:
        assert cpu_emulation.enable() is handle  # idempotent
        assert torch.cuda.current_device() == "cpu"
        x = torch.zeros(3, device="cuda")  # S6: a cuda keyword lands on the CPU
        assert x.device.type == "cpu"
        assert x.cuda() is x and x.to("cuda").device.type == "cpu"
        assert x.type() == "torch.cuda.FloatTensor"  # S7
        assert x.type(torch.float64).dtype == torch.float64  # .type(dtype) is untouched
        torch.cuda.manual_seed(7)  # S4 seeds the CPU generator
        a = torch.rand(2)
        torch.manual_seed(7)
        assert torch.equal(a, torch.rand(2))
    finally:
        cpu_emulation.disable()
    assert not cpu_emulation.is_enabled()
    assert (
        torch.cuda.current_device,
        torch.cuda.manual_seed,
        mcore_random._get_cuda_rng_state,
        dist.batch_isend_irecv,
        torch_norm.WrappedTorchNorm.__new__,
    ) == originals
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")  # no CUDA here: the real error is back


def test_sequence_parallel_norm_is_tagged():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    config = TransformerConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        normalization="RMSNorm",
        sequence_parallel=True,
        tensor_model_parallel_size=2,
    )
    with pytest.raises(AssertionError, match="sequence parallel"):
        WrappedTorchNorm(config, 8)
    cpu_emulation.enable()
    try:
        norm = WrappedTorchNorm(config, 8, eps=1e-6)
        assert isinstance(norm, torch.nn.RMSNorm) and norm.eps == 1e-6
        assert all(p.sequence_parallel for p in norm.parameters())
    finally:
        cpu_emulation.disable()


class _Op:
    def __init__(self, op, peer):
        self.op, self.peer = op, peer


def test_p2p_sends_to_one_peer_are_reordered():
    send_prev, recv_prev, send_next, recv_next = (
        _Op(dist.isend, 1),
        _Op(dist.irecv, 1),
        _Op(dist.isend, 1),
        _Op(dist.irecv, 1),
    )
    assert _reorder_same_peer_sends([send_prev, recv_prev, send_next, recv_next]) == [
        send_next,
        recv_prev,
        send_prev,
        recv_next,
    ]
    # Different peers (PP > 2) or a single send: unchanged.
    other = [_Op(dist.isend, 0), _Op(dist.irecv, 0), _Op(dist.isend, 2), _Op(dist.irecv, 2)]
    assert _reorder_same_peer_sends(other) == other
    single = [_Op(dist.isend, 1), _Op(dist.irecv, 1)]
    assert _reorder_same_peer_sends(single) == single


def test_mode_leaves_cpu_code_alone():
    with CudaToCpuMode():
        y = torch.ones(2, device="cpu") + 1
        assert y.device.type == "cpu" and y.type() == "torch.cuda.FloatTensor"
    assert y.type() == "torch.FloatTensor"


def test_recompute_in_backward_runs_under_the_emulation():
    """S12: megatron's CheckpointFunction re-runs the forward inside backward, where the global
    function mode is suspended; a ``device="cuda"`` allocation there must still land on the CPU."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mcore_random

    original = mcore_random.CheckpointFunction.backward
    cpu_emulation.enable()
    try:
        x = torch.full((3,), 2.0, requires_grad=True)

        def scaled(t: torch.Tensor) -> torch.Tensor:
            return t * torch.full((3,), 3.0, device="cuda")

        tensor_parallel.checkpoint(scaled, False, x).sum().backward()
        assert torch.equal(x.grad, torch.full((3,), 3.0))
    finally:
        cpu_emulation.disable()
    assert mcore_random.CheckpointFunction.backward is original


def test_compiled_kernels_only_on_cuda_with_triton_and_one_warning_without(monkeypatch):
    """The compiled loss and the fused SwiGLU ask ``compiles_kernels_for`` first. No CUDA here:
    the CUDA answers come from a stand-in for the Triton probe (``has_triton``)."""
    import warnings

    from megaopsd.runtime import kernels

    assert kernels.compiles_kernels_for(torch.device("cpu")) is False
    monkeypatch.setattr(kernels, "_triton_usable", lambda: True)
    assert kernels.compiles_kernels_for(torch.device("cuda", 0)) is True
    monkeypatch.setattr(kernels, "_triton_usable", lambda: False)
    kernels._warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [kernels.compiles_kernels_for(torch.device("cuda")) for _ in range(3)] == [False] * 3
    assert len(caught) == 1 and "Triton is not usable" in str(caught[0].message)
    assert "install the triton that matches your torch" in str(caught[0].message)
