"""Hugging Face checkpoint files: sliced reading, streaming writing, tokenizer/config copying.

- ``HFCheckpointReader`` opens ``model.safetensors`` or a sharded checkpoint
  (``model.safetensors.index.json``) and hands out safetensors slice objects, so an importing
  rank reads only the rows or columns it keeps.
- ``StreamingSafetensorsWriter`` writes tensors as they arrive, one at a time: the shapes
  and dtypes are known up front (the export plan), so each file's header is written first and
  no shard is ever held in memory. Files follow the safetensors format (8-byte little-endian
  header length, JSON header with ``data_offsets``, raw little-endian data) and the HF naming
  (``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` + index).
- ``copy_side_files`` copies config, generation config and tokenizer files between directories.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPE_CODES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}

# Files that describe a model but hold no weights (config, generation config, tokenizer).
_SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
# metadata.json: dist_checkpointing's; the last two: a trainer checkpoint's own bookkeeping
_NOT_SIDE_FILES = {INDEX_FILE, "metadata.json", "megaopsd.json", "manifest.json", "trainer_state.json"}


class HFCheckpointReader:
    """Read tensors (or slices of them) from a Hugging Face safetensors checkpoint.

    Use as a context manager; ``get_slice(name)`` returns a safetensors slice (index it like a
    tensor: ``s[a:b]``, ``s[:, a:b]``; ``s.get_shape()``).
    """

    def __init__(self, hf_dir: str | Path) -> None:
        self.hf_dir = Path(hf_dir)
        index = self.hf_dir / INDEX_FILE
        single = self.hf_dir / SINGLE_FILE
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            self.weight_map = {}
        else:
            raise FileNotFoundError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {self.hf_dir}; only safetensors checkpoints are supported"
            )
        self._handles: dict[str, tuple[Any, set[str]]] = {}  # file -> (safe_open handle, its names)

    def _handle(self, file_name: str) -> tuple[Any, set[str]]:
        from safetensors import safe_open

        if file_name not in self._handles:
            handle = safe_open(str(self.hf_dir / file_name), framework="pt")
            self._handles[file_name] = (handle, set(handle.keys()))
        return self._handles[file_name]

    def _file_of(self, name: str) -> str:
        if not self.weight_map:
            return SINGLE_FILE
        try:
            return self.weight_map[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in {self.hf_dir / INDEX_FILE}") from None

    def get_slice(self, name: str) -> Any:
        handle, names = self._handle(self._file_of(name))
        if name not in names:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.hf_dir}")
        return handle.get_slice(name)

    def names(self) -> list[str]:
        if self.weight_map:
            return sorted(self.weight_map)
        return sorted(self._handle(SINGLE_FILE)[1])

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> HFCheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shard_plan(
    entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """Split entries (in arrival order) into files of at most ``max_shard_bytes`` (>= 1 tensor each)."""
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for entry in entries:
        nbytes = _nbytes(entry[1], entry[2])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * torch.empty((), dtype=dtype).element_size()


def _header(entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"{name}: dtype {dtype} cannot be written to safetensors here")
        end = offset + _nbytes(shape, dtype)
        header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors itself writes it
    return struct.pack("<Q", len(raw)) + raw


class StreamingSafetensorsWriter:
    """Write a (possibly sharded) HF safetensors checkpoint one tensor at a time.

    Args:
        out_dir: destination directory (created).
        entries: ``(name, shape, dtype)`` of every tensor, in the order ``write`` will be called.
        max_shard_bytes: start a new file when the next tensor would exceed this size.
    """

    def __init__(
        self,
        out_dir: str | Path,
        entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int = 2 * 2**30,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        shards = _shard_plan(entries, max_shard_bytes)
        n = len(shards)
        self._files = (
            [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        )
        self._expected = [
            (name, tuple(shape), dtype, k) for k, shard in enumerate(shards) for name, shape, dtype in shard
        ]
        self._shards = shards
        self._next = 0
        self._open_shard = -1
        self._fh: Any = None
        self.total_bytes = sum(_nbytes(shape, dtype) for _, shape, dtype in entries)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must match the announced name, shape and dtype."""
        if self._next >= len(self._expected):
            raise ValueError(f"unexpected extra tensor {name!r}")
        exp_name, exp_shape, exp_dtype, shard = self._expected[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (exp_name, exp_shape, exp_dtype):
            raise ValueError(
                f"expected {exp_name} {exp_shape} {exp_dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if shard != self._open_shard:
            self._close_file()
            self._fh = open(self.out_dir / self._files[shard], "wb")  # noqa: SIM115 (closed in _close_file)
            self._fh.write(_header(self._shards[shard]))
            self._open_shard = shard
        data = tensor.detach().contiguous().cpu()
        self._fh.write(data.view(torch.uint8).numpy().data)
        self._next += 1

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> None:
        """Finish the last file and write the index (sharded checkpoints only)."""
        self._close_file()
        if self._next != len(self._expected):
            missing = self._expected[self._next][0]
            raise ValueError(
                f"checkpoint incomplete: {len(self._expected) - self._next} tensors missing, from {missing}"
            )
        if len(self._files) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: self._files[shard] for name, _, _, shard in self._expected},
            }
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def side_files(src_dir: str | Path) -> list[Path]:
    """Config, generation-config and tokenizer files of a model directory (no weights)."""
    src = Path(src_dir)
    return sorted(
        p
        for p in src.iterdir()
        if p.is_file()
        and p.suffix in _SIDE_FILE_SUFFIXES
        and p.name not in _NOT_SIDE_FILES
        and not p.name.startswith(".")
    )


def copy_side_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy ``side_files(src_dir)`` into ``dst_dir``; return the copied names."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in side_files(src_dir):
        shutil.copy2(path, dst / path.name)
        copied.append(path.name)
    return copied
