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

from megaopsd.config import LoraConfig, ModelConfig
from megaopsd.config.hf_spec import HFModelSpec, load_hf_config
from megaopsd.convert.dist_ckpt import (
    load_model_checkpoint,
    model_sharded_state_dict,
    model_state_key,
    save_model_checkpoint,
)
from megaopsd.convert.export import ExportPlan, export_hf_weights, export_plan
from megaopsd.convert.importer import load_hf_weights
from megaopsd.convert.peft import gather_adapters, write_peft_adapter
from megaopsd.convert.safetensors_io import StreamingSafetensorsWriter, copy_side_files
from megaopsd.models.builder import build_model_chunks, params_dtype
from megaopsd.models.lora import add_lora, base_fingerprint
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
    if parallel.ep_size > 1:
        layout["ep"] = parallel.ep_size
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
    base_dir: str | Path | None = None,
    peft_out: str | Path | None = None,
) -> ExportPlan:
    """Collective: convert a distributed checkpoint (from ``import_hf_checkpoint`` or the trainer's
    model state) into an HF model directory, loading it at the running layout.

    A LoRA trainer checkpoint (adapters only) is rebuilt on its base model and exported merged
    (``W + (alpha/r) B A``); ``peft_out`` also writes the adapters as a PEFT adapter there.

    Args:
        ckpt_dir: checkpoint directory holding the dist checkpoint and the HF side files.
        out_dir: HF directory to write (emptied first when ``force``).
        runtime: the started runtime (any TP/PP layout).
        force: clear a non-empty ``out_dir``.
        max_shard_bytes: safetensors shard size limit.
        progress: show a progress bar on rank 0.
        base_dir: (LoRA) the base model directory; default the one the checkpoint records.
        peft_out: (LoRA) write ``adapter_config.json`` + ``adapter_model.safetensors`` here.
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
    lora = lora_settings(ckpt)
    if lora is None:
        load_model_checkpoint(chunks, ckpt)
    else:
        _load_lora_checkpoint(chunks, spec, ckpt, runtime, lora, base_dir or lora["base_model"], progress)
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
    if peft_out is not None:
        if lora is None:
            raise ValueError(f"--peft-out: {ckpt} holds no LoRA adapters (a full-parameter checkpoint)")

        tensors = gather_adapters(chunks, runtime.parallel)
        if runtime.is_main:
            write_peft_adapter(peft_out, tensors, _lora_config(lora), spec, lora["base_model"])
    dist.barrier()
    return plan


def lora_settings(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """A LoRA trainer checkpoint's ``lora.*`` settings plus ``base_model``; None for other checkpoints."""
    state_file = Path(ckpt_dir) / "trainer_state.json"
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text())
    if "lora" not in state:
        return None
    return {**state["lora"], "base_model": state["base_model"], "base_fingerprint": state["base_fingerprint"]}


def _lora_config(lora: dict[str, Any]):
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in lora.items() if not k.startswith("base_")}
    return LoraConfig(**fields)


def _load_lora_checkpoint(chunks, spec, ckpt: Path, runtime: Runtime, lora: dict, base: str, progress: bool):
    """Base weights from ``base`` (checked against the checkpoint's fingerprint), adapters from ``ckpt``."""
    from megatron.core import dist_checkpointing

    if base_fingerprint(base) != lora["base_fingerprint"]:
        raise ValueError(f"{base} is not the base model the adapters in {ckpt} were trained on (fingerprint)")
    load_hf_weights(chunks, spec, base, runtime.parallel, progress=progress)
    add_lora(chunks, _lora_config(lora))
    request = {
        key: {k: v for k, v in state.items() if ".lora." in k}
        for key, state in model_sharded_state_dict(chunks).items()
    }
    loaded = dist_checkpointing.load(request, str(ckpt))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[model_state_key(i, len(chunks))], strict=False)
