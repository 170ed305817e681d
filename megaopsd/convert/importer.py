"""Import: Hugging Face safetensors -> this rank's Megatron parameters, at any TP/PP/VPP.

Each rank reads only what it keeps: its pipeline stage's layers, its own experts (expert
parallelism), and of each tensor only its TP (expert-TP) slice (``safe_open(...).get_slice``),
so no rank ever materialises the whole model.

    load_hf_weights(chunks, spec, hf_dir, runtime.parallel)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from megaopsd.config.hf_spec import HFModelSpec
from megaopsd.convert.export import geometry
from megaopsd.convert.families import mapping_for
from megaopsd.convert.params import local_params
from megaopsd.convert.safetensors_io import HFCheckpointReader
from megaopsd.progress import progress as show_progress
from megaopsd.runtime.parallel import ParallelState


def load_hf_weights(
    chunks: Sequence[torch.nn.Module],
    spec: HFModelSpec,
    hf_dir: str | Path,
    parallel: ParallelState,
    *,
    progress: bool = False,
) -> int:
    """Fill this rank's model chunks from a Hugging Face safetensors checkpoint.

    Not collective: ranks read independently. Padded vocabulary rows are set to zero. With
    tied embeddings and PP > 1 the last stage's output-layer copy is read from the embedding.

    Args:
        chunks: this rank's GPTModel chunks (from ``build_model_chunks``).
        spec: the model's HF config.
        hf_dir: directory with ``model.safetensors`` or ``model.safetensors.index.json``.
        parallel: this rank's layout (TP rank and size pick the slices).
        progress: show progress in bytes of this rank's shards (callers enable it on one rank;
            a terminal gets a bar, a log a line every ``$MEGAOPSD_PROGRESS_INTERVAL`` seconds).

    Returns:
        Number of parameters filled on this rank.

    Raises:
        FileNotFoundError: no safetensors checkpoint in ``hf_dir``.
        KeyError: a tensor the mapping needs is missing from the checkpoint.
        ValueError: a tensor's shape does not fit the model built from the config.
    """
    geo = geometry(spec, parallel.tp_size)
    refs = local_params(chunks, mapping_for(spec), spec, for_import=True)
    total = sum(ref.tensor.numel() * ref.tensor.element_size() for ref in refs)
    with (
        HFCheckpointReader(hf_dir) as reader,
        show_progress(total=total, desc="import", unit="B", unit_scale=True, disable=not progress) as bar,
    ):
        for ref in refs:
            names = ref.hf_names
            if ref.rule.tied_to is not None and spec.tie_word_embeddings:
                names = (ref.rule.tied_to,)
            slices = [reader.get_slice(name) for name in names]
            size, rank, _ = parallel.split(ref.rule.expert)  # an expert splits over expert TP
            shard = ref.rule.layout.read_shard(
                slices, dataclasses.replace(geo, tp_size=size), rank, tuple(ref.tensor.shape)
            )
            if tuple(shard.shape) != tuple(ref.tensor.shape):
                raise ValueError(
                    f"{', '.join(names)}: the slice for TP rank {rank} has shape "
                    f"{tuple(shard.shape)}, the Megatron parameter {tuple(ref.tensor.shape)}; "
                    "does config.json match the weights?"
                )
            with torch.no_grad():
                ref.tensor.copy_(shard)
            bar.update(ref.tensor.numel() * ref.tensor.element_size())
    return len(refs)
