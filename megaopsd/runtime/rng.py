"""Every random number generator a rank uses, captured and restored as one state.

Python, numpy, torch (CPU and CUDA) and megatron's tensor-parallel RNG tracker. Checkpoints save
it per rank (``save_rng_file``: safetensors, nothing pickled); building a teacher copy restores
it so that adding a teacher changes nothing else.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """All RNG states of this process (megatron's parallel state must exist)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back a state from ``capture_rng_state``."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


# A checkpoint stores the state as tensors plus a JSON header: reading it back runs no code
# (a pickled state, as torch.save writes it, can run anything when loaded).
def save_rng_file(state: dict[str, Any], path: str | Path) -> None:
    """Write a ``capture_rng_state`` result as a safetensors file."""
    from safetensors.torch import save_file

    version, python_keys, gauss = state["python"]
    kind, numpy_keys, pos, has_gauss, cached_gaussian = state["numpy"]
    tensors = {
        "python": torch.tensor(python_keys, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(numpy_keys, dtype=np.int64)),
        "torch": state["torch"].contiguous(),
    }
    tensors.update({f"tracker.{name}": value.contiguous() for name, value in state["tracker"].items()})
    for index, value in enumerate(state["cuda"] or []):
        tensors[f"cuda.{index}"] = value.contiguous()
    plain = {
        "python": [version, gauss],
        "numpy": [kind, int(pos), int(has_gauss), float(cached_gaussian)],
        "cuda_devices": len(state["cuda"] or []),
    }
    save_file(tensors, str(path), metadata={"plain": json.dumps(plain)})


def load_rng_file(path: str | Path) -> dict[str, Any]:
    """Read what ``save_rng_file`` wrote.

    Raises:
        ValueError: the file is not a megaopsd RNG safetensors file (never unpickled).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            plain = json.loads((handle.metadata() or {})["plain"])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not iterable)
        version, gauss = plain["python"]
        kind, pos, has_gauss, cached_gaussian = plain["numpy"]
        cuda = [tensors[f"cuda.{i}"] for i in range(plain["cuda_devices"])]
        return {
            "python": (version, tuple(int(v) for v in tensors["python"].tolist()), gauss),
            "numpy": (kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached_gaussian),
            "torch": tensors["torch"],
            "cuda": cuda or None,
            "tracker": {k[len("tracker.") :]: v for k, v in tensors.items() if k.startswith("tracker.")},
        }
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not an RNG state file ({type(err).__name__}: {err})") from err
