"""Load megatron distributed checkpoints without running code from the checkpoint directory.

A torch_dist checkpoint holds three kinds of pickles: ``.metadata`` (torch distributed
checkpoint metadata, read with a bare ``pickle.load``), ``common.pt`` (megatron's non-sharded
state, ``torch.load``) and byte items inside the ``.distcp`` shards (megatron ShardedObjects such
as a layer's ``_extra_state``, which torch's default load planner reads with
``torch.load`` with weights-only off). Any of them can run arbitrary code on every rank of a job
when a checkpoint comes from elsewhere. ``load_dist_checkpoint`` reads all three through
allow-lists instead:

- ``.metadata``: a ``pickle.Unpickler`` whose ``find_class`` admits only the metadata classes
  of ``torch.distributed.checkpoint`` and a few torch constants (dtypes, ``torch.Size``);
- ``common.pt`` and byte items: ``torch.load(weights_only=True)``.

Anything else is refused with ``UnsafeCheckpointError``; nothing is executed. The patches on
torch's reader and planner last only for the call (they are process-wide while it runs).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# Every global a torch distributed checkpoint's .metadata may reference: plain data classes,
# enums and torch constants. Named one by one: whole modules would admit their imports too.
_DCP = "torch.distributed.checkpoint"
_ALLOWED = {
    *(
        (f"{_DCP}.metadata", name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    *(
        (f"{_DCP}.planner", name)
        for name in (
            "SavePlan",
            "WriteItem",
            "WriteItemType",
            "TensorWriteData",
            "BytesIOWriteData",
            "LoadItemType",
        )
    ),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a name -> torch.layout lookup
    ("collections", "OrderedDict"),
    *(("torch", str(v).removeprefix("torch.")) for v in vars(torch).values() if isinstance(v, torch.dtype)),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint pickle asks for an object outside the allow-list (or is garbled); not loaded."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise UnsafeCheckpointError(
                f"refusing to unpickle {module}.{name}: a checkpoint's metadata never needs it"
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("refusing a persistent id in checkpoint metadata")


def read_metadata_safely(stream: io.BufferedIOBase) -> Any:
    """Unpickle a ``.metadata`` stream through the allow-list."""
    return _MetadataUnpickler(stream).load()


def check_metadata(ckpt_dir: str | Path) -> None:
    """Read ``<ckpt_dir>/.metadata`` through the allow-list, before torch does.

    torch logs a traceback for a metadata read that fails inside its loader; this check fails
    first, with one line.

    Raises:
        UnsafeCheckpointError: the file is refused or unreadable (the message names it).
    """
    file = Path(ckpt_dir) / ".metadata"
    try:
        with open(file, "rb") as stream:
            read_metadata_safely(stream)
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{file}: {err}") from None
    # What a truncated or garbled pickle raises, besides the refusals above.
    except (
        OSError,
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
    ) as err:
        raise UnsafeCheckpointError(f"{file}: unreadable ({type(err).__name__}: {err})") from None


def _safe_read_metadata(self, *args: Any, **kwargs: Any) -> Any:
    """``FileSystemReader.read_metadata`` with the allow-listed unpickler (torch 2.13 layout)."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as stream:
        metadata = read_metadata_safely(stream)
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _safe_load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
    """``DefaultLoadPlanner.load_bytes`` with ``weights_only=True``."""
    from torch.distributed.checkpoint._traverse import set_element

    loaded = torch.load(value, weights_only=True)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
    else:
        self.state_dict[read_item.dest_index.fqn] = loaded


@contextlib.contextmanager
def no_pickle_loads() -> Iterator[None]:
    """While active, torch distributed checkpoint reads go through the allow-lists above."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    saved = FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes
    FileSystemReader.read_metadata = _safe_read_metadata
    DefaultLoadPlanner.load_bytes = _safe_load_bytes
    try:
        yield
    finally:
        FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes = saved


def _common_strategy() -> Any:
    """megatron's common-state loader, reading ``common.pt`` and object files weights-only."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class WeightsOnlyCommonLoadStrategy(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            path = os.path.join(checkpoint_dir, "common.pt")
            if not os.path.isfile(path):
                from megatron.core.dist_checkpointing.core import CheckpointingException

                raise CheckpointingException(f"Common file {path} does not exist")
            return torch.load(path, map_location="cpu", weights_only=True)

        def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
            from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace

            def load_one(sh_obj: ShardedObject) -> Any:
                path = os.path.join(checkpoint_dir, f"{sh_obj.unique_key}.pt")
                return torch.load(path, map_location="cpu", weights_only=True)

            return dict_list_map_inplace(load_one, sharded_objects_state_dict)

    return WeightsOnlyCommonLoadStrategy()


def load_dist_checkpoint(sharded_state_dict: dict[str, Any], path: str) -> dict[str, Any]:
    """``dist_checkpointing.load`` with every pickle in the checkpoint read through an allow-list.

    Raises:
        UnsafeCheckpointError: ``.metadata`` is refused (outside the allow-list) or unreadable.
        pickle.UnpicklingError: ``common.pt`` or a byte item is not weights-only.
    """
    from megatron.core import dist_checkpointing

    check_metadata(path)
    with no_pickle_loads():  # the same allow-list again for the read torch does itself
        return dist_checkpointing.load(sharded_state_dict, path, common_strategy=_common_strategy())
