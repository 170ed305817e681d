"""Offline conversions behind ``tools/convert_checkpoint.py`` (collective; run on every rank).

- ``import_hf_checkpoint``: HF safetensors -> megatron distributed checkpoint at the running
  layout, plus the HF config, generation config and tokenizer files and a ``megaopsd.json``
  (dtype, source, saved layout), so the checkpoint directory is self-describing.
- ``export_hf_checkpoint``: a distributed checkpoint (saved at any layout, loaded at the
  running one) -> HF safetensors + config + tokenizer that transformers and vLLM load as is.
- ``write_hf_checkpoint``: the streaming writer both use, for model chunks already in memory.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megaopsd.config import ModelConfig
from megaopsd.convert.dist_ckpt import load_model_checkpoint, save_model_checkpoint
from megaopsd.convert.export import ExportPlan, export_hf_weights, export_plan
from megaopsd.convert.importer import load_hf_weights
from megaopsd.convert.safetensors_io import StreamingSafetensorsWriter, copy_side_files
from megaopsd.models.builder import build_model_chunks, params_dtype
from megaopsd.models.hf_config import HFModelSpec, load_hf_config
from megaopsd.progress import progress as show_progress
from megaopsd.runtime.parallel import ParallelState, Runtime

MANIFEST = "megaopsd.json"  # what megaopsd adds to a converted checkpoint directory
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def default_dtype(config: dict[str, Any]) -> str:
    """The ``ModelConfig.dtype`` for a model's stored dtype (float16 widens losslessly to float32)."""
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    return "bfloat16" if stored == "bfloat16" else "float32"


def saved_layout(parallel: ParallelState) -> dict[str, int]:
    """The layout a checkpoint was written at (informational: it loads at any layout)."""
    layout = {"tp": parallel.tp_size, "pp": parallel.pp_size}
    if parallel.num_layers_in_first_pipeline_stage is not None:
        layout["first_stage_layers"] = parallel.num_layers_in_first_pipeline_stage
    if parallel.num_layers_in_last_pipeline_stage is not None:
        layout["last_stage_layers"] = parallel.num_layers_in_last_pipeline_stage
    return layout


def read_manifest(ckpt_dir: str | Path) -> dict[str, Any]:
    """The ``megaopsd.json`` of a converted checkpoint ({} when absent)."""
    path = Path(ckpt_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def write_hf_checkpoint(
    chunks: Sequence[torch.nn.Module],
    spec: HFModelSpec,
    runtime: Runtime,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 2**30,
    progress: bool = False,
    writer_rank: int = 0,
) -> ExportPlan:
    """Collective: stream the model's HF tensors to ``writer_rank`` and write safetensors there.

    Only the weights are written (``model.safetensors`` or shards + index); memory on the
    writer stays at one tensor. Returns the export plan (names, shapes, bytes).
    """
    plan = export_plan(chunks, spec, runtime.parallel, dtype=dtype)
    writing = runtime.rank == writer_rank
    writer = StreamingSafetensorsWriter(out_dir, plan.entries, max_shard_bytes) if writing else None
    bar = show_progress(
        total=plan.total_bytes, desc="export", unit="B", unit_scale=True, disable=not (writing and progress)
    )
    with bar:
        for name, tensor in export_hf_weights(
            chunks, spec, runtime.parallel, dst_ranks=(writer_rank,), plan=plan
        ):
            writer.write(name, tensor)
            bar.update(tensor.numel() * tensor.element_size())
    if writer is not None:
        writer.close()
    return plan


def _clear_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def import_hf_checkpoint(
    hf_dir: str | Path,
    out_dir: str | Path,
    runtime: Runtime,
    *,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = False,
) -> None:
    """Collective: convert an HF model directory into a megatron distributed checkpoint.

    Args:
        hf_dir: HF model directory (config.json, safetensors, tokenizer files).
        out_dir: checkpoint directory to write (emptied first when ``force``).
        runtime: the started runtime; its TP/PP layout is the layout saved.
        dtype: ``float32`` | ``bfloat16``; None takes the model's stored dtype.
        force: clear a non-empty ``out_dir`` (callers check emptiness before starting ranks).
        progress: show progress bars on rank 0.
    """
    hf_dir, out = Path(hf_dir), Path(out_dir)
    spec = load_hf_config(hf_dir)
    model_cfg = ModelConfig(hf_path=str(hf_dir), dtype=dtype or default_dtype(dict(spec.raw)))
    chunks = build_model_chunks(spec, model_cfg, runtime.parallel)
    load_hf_weights(chunks, spec, hf_dir, runtime.parallel, progress=progress and runtime.is_main)
    if runtime.is_main and force:
        _clear_dir(out)
    dist.barrier()
    save_model_checkpoint(chunks, out)
    if runtime.is_main:
        copy_side_files(hf_dir, out)
        manifest = {
            "format": "megaopsd-model-checkpoint",
            "version": 1,
            "dtype": model_cfg.dtype,
            "make_vocab_size_divisible_by": model_cfg.make_vocab_size_divisible_by,
            "source": str(hf_dir.resolve()),
            "saved_layout": saved_layout(runtime.parallel),
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    dist.barrier()


def export_hf_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    runtime: Runtime,
    *,
    force: bool = False,
    max_shard_bytes: int = 2 * 2**30,
    progress: bool = False,
) -> ExportPlan:
    """Collective: convert a distributed checkpoint (from ``import_hf_checkpoint`` or the trainer's
    model state) into an HF model directory, loading it at the running layout.

    Args:
        ckpt_dir: checkpoint directory holding the dist checkpoint and the HF side files.
        out_dir: HF directory to write (emptied first when ``force``).
        runtime: the started runtime (any TP/PP layout).
        force: clear a non-empty ``out_dir``.
        max_shard_bytes: safetensors shard size limit.
        progress: show a progress bar on rank 0.
    """
    ckpt, out = Path(ckpt_dir), Path(out_dir)
    spec = load_hf_config(ckpt)
    manifest = read_manifest(ckpt)
    model_cfg = ModelConfig(
        hf_path=str(ckpt),
        dtype=manifest.get("dtype") or default_dtype(dict(spec.raw)),
        make_vocab_size_divisible_by=manifest.get("make_vocab_size_divisible_by", 128),
    )
    chunks = build_model_chunks(spec, model_cfg, runtime.parallel)
    load_model_checkpoint(chunks, ckpt)
    if runtime.is_main and force:
        _clear_dir(out)
    dist.barrier()
    dtype = params_dtype(model_cfg)
    plan = write_hf_checkpoint(
        chunks, spec, runtime, out, dtype=dtype, max_shard_bytes=max_shard_bytes, progress=progress
    )
    if runtime.is_main:
        copy_side_files(ckpt, out)
        config = json.loads((out / "config.json").read_text())
        if (config.get("dtype") or config.get("torch_dtype")) != _DTYPE_NAMES[dtype]:
            config["dtype"] = _DTYPE_NAMES[dtype]  # the weights' dtype, so loaders default to it
            config.pop("torch_dtype", None)
            (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    dist.barrier()
    return plan
