"""Where a rank runs: launch environment, device, process groups, CPU emulation of CUDA calls."""

from megaopsd.runtime.distributed import LaunchEnv, read_launch_env, select_device
from megaopsd.runtime.parallel import ParallelState, Runtime

__all__ = ["LaunchEnv", "ParallelState", "Runtime", "read_launch_env", "select_device"]
