"""Model weights in megatron-core distributed checkpoints (``dist_checkpointing``, torch_dist).

A checkpoint written at one TP/PP/VPP layout loads at any other: every parameter is saved as
a global tensor with its shard offsets, and megatron pads the vocabulary rows per layout
(``allow_shape_mismatch``; rows beyond the saved ones load as zeros).

    save_model_checkpoint(chunks, "ckpt/")      # collective; the directory should be empty
    load_model_checkpoint(chunks, "ckpt/")      # collective

The trainer puts the same ``model_sharded_state_dict`` next to its optimizer state.

Every save here is synchronous, so the write results never leave the saving process:
``in_process_write_results`` gives megatron's writer a plain in-process queue instead of the
``multiprocessing`` "spawn" Manager it would otherwise start on first use (a second Python that
re-imports ``__main__`` and everything it imports: ~2 s of CPU per saving process, and a helper
to stop at exit).
"""

from __future__ import annotations

import queue
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from megaopsd.convert.safe_load import load_dist_checkpoint
from megaopsd.models.builder import unwrap_chunk

CHECKPOINT_BACKEND = "torch_dist"


def model_state_key(index: int, num_chunks: int) -> str:
    """Top-level key of chunk ``index``: ``model``, or ``model0``, ``model1``... with VPP."""
    return "model" if num_chunks == 1 else f"model{index}"


def model_sharded_state_dict(chunks: Sequence[torch.nn.Module]) -> dict[str, Any]:
    """``{"model": sharded_state_dict}`` (one entry per chunk with VPP), ready for dist_checkpointing.

    Chunks may be wrapped (DDP, Float16Module); keys are those of the bare GPTModel, so a
    checkpoint loads whether or not the loading model is wrapped.
    """

    return {
        model_state_key(i, len(chunks)): unwrap_chunk(chunk).sharded_state_dict()
        for i, chunk in enumerate(chunks)
    }


def save_model_checkpoint(
    chunks: Sequence[torch.nn.Module],
    ckpt_dir: str | Path,
    *,
    content_metadata: Mapping[str, Any] | None = None,
) -> None:
    """Collective: save the model chunks of every rank as one distributed checkpoint.

    Args:
        chunks: this rank's GPTModel chunks.
        ckpt_dir: target directory (created; it should be empty).
        content_metadata: small dict stored with the checkpoint (``dist_checkpointing.load_content_metadata``).
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    path = Path(ckpt_dir)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    in_process_write_results()
    dist_checkpointing.save(
        model_sharded_state_dict(chunks),
        str(path),
        sharded_strategy=get_default_save_sharded_strategy(CHECKPOINT_BACKEND),
        content_metadata=dict(content_metadata) if content_metadata else None,
    )


def load_model_checkpoint(chunks: Sequence[torch.nn.Module], ckpt_dir: str | Path) -> None:
    """Collective: load a distributed checkpoint (saved at any layout) into this rank's chunks.

    Its pickled parts are read through allow-lists (``megaopsd.convert.safe_load``).

    Raises:
        FileNotFoundError: ``ckpt_dir`` is not a distributed checkpoint.
    """

    path = Path(ckpt_dir)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path} is not a megatron distributed checkpoint (no metadata.json)")
    loaded = load_dist_checkpoint(model_sharded_state_dict(chunks), str(path))  # never unpickles code
    load_model_state(chunks, loaded)


def load_model_state(chunks: Sequence[torch.nn.Module], loaded: Mapping[str, Any]) -> None:
    """Copy the model entries of a loaded ``model_sharded_state_dict`` request into the chunks.

    ``loaded`` is what ``dist_checkpointing.load`` returned; other keys (optimizer, teacher)
    are left to the caller.
    """

    for i, chunk in enumerate(chunks):
        unwrap_chunk(chunk).load_state_dict(loaded[model_state_key(i, len(chunks))], strict=True)


def in_process_write_results() -> None:
    """Collect torch_dist's write results in this process (call before a synchronous save).

    megatron's ``filesystem_async`` keeps the queue its writer reports to in a module global and
    fills it on first use with a ``multiprocessing`` spawn Manager's queue, which only an
    asynchronous save (a separate writer process) needs. A synchronous save writes and reads the
    results in the saving process, so a thread-safe in-process queue is enough.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
