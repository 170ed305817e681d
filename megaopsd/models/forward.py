"""Forward-only logits through megatron's pipeline schedule, for checks and evaluation.

``forward_logits`` runs a token batch through this rank's model chunks with
``get_forward_backward_func`` (forward_only), one sequence per microbatch, and returns the
vocab-parallel logits on the last pipeline stage. Training does not use it (its forward step
carries the paired teacher/student stream); conversion checks and tests do.

Training's last stage needs logits only where the loss scores a token: ``decoder_hidden``
runs a chunk without its output layer and ``rows_logits`` applies the output layer to the
selected rows only (sequence-parallel layout handled).

    logits_BSV = forward_logits(chunks, input_ids_BS, runtime.parallel)  # [b, s, padded_vocab/TP] or None
    hidden_LBH = decoder_hidden(chunk, ids_BL, positions_BL)             # last stage
    logits_TV = rows_logits(chunk, hidden_LBH, rows_T)                   # [T, padded_vocab/TP]

Legend: B batch, S / L sequence, H hidden, T selected rows, V vocabulary shard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from megaopsd.models.builder import unwrap_chunk
from megaopsd.runtime.parallel import ParallelState


def forward_logits(
    chunks: Sequence[torch.nn.Module], input_ids_BS: torch.Tensor, parallel: ParallelState
) -> torch.Tensor | None:
    """Collective over the model-parallel group: logits for ``input_ids_BS``.

    Every rank of a pipeline passes the same ``input_ids_BS``. With virtual pipeline stages the
    batch size must be a multiple of the pipeline size (one microbatch per sequence).

    Args:
        chunks: this rank's GPTModel chunks.
        input_ids_BS: ``[b, s]`` int64 token ids.
        parallel: this rank's layout.

    Returns:
        ``[b, s, padded_vocab / TP]`` vocab-parallel logits on the last pipeline stage, else None.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = input_ids_BS.shape
    device = next(iter(chunks[0].parameters())).device
    position_ids_S = torch.arange(seq, device=device)

    def forward_step(data_iterator, model):
        ids_1S = next(data_iterator).to(device)
        output = model(ids_1S, position_ids_S.unsqueeze(0), None)
        return output, None  # no loss function: the schedule collects the raw logits

    rows = list(input_ids_BS.split(1, dim=0))
    iterators = [iter(rows) for _ in chunks] if len(chunks) > 1 else iter(rows)
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators,
            model=list(chunks),
            num_microbatches=batch,
            seq_length=seq,
            micro_batch_size=1,
            forward_only=True,
        )
    if not parallel.is_last_stage:
        return None
    return torch.cat(list(outputs), dim=0)


@contextlib.contextmanager
def _without_output_layer(model: torch.nn.Module) -> Iterator[None]:
    """GPTModel.forward returns the decoder's hidden states (final norm applied) inside.

    megatron's ``_postprocess`` returns the hidden states when ``post_process`` is False; the
    decoder block keeps its own flag, so the final norm still runs. The flag is restored even
    when the forward raises.
    """
    saved = model.post_process
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = saved


def decoder_hidden(
    model: torch.nn.Module, input_ids_BL: torch.Tensor, position_ids_BL: torch.Tensor
) -> torch.Tensor:
    """The last stage's hidden states ``[L (/TP with sequence parallel), B, H]``, no output layer.

    Args:
        model: a last-stage chunk, wrapped or not (wrappers forward to the GPTModel).
        input_ids_BL: token ids (ignored by megatron except on the first stage).
        position_ids_BL: positions.
    """
    inner = unwrap_chunk(model)
    with _without_output_layer(inner):
        return model(input_ids_BL, position_ids_BL, None)


def rows_logits(model: torch.nn.Module, hidden_LBH: torch.Tensor, rows_T: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits ``[T, V/TP]`` of the rows ``rows_T`` of the flattened ``[B * L]`` batch.

    Only those rows go through the output layer, so its cost and what it keeps for backward
    scale with T instead of B * L. With sequence parallelism each rank holds ``L / TP``
    positions of every sequence: the sequence is gathered first (backward: each rank keeps
    its slice of the gradient), then every TP rank selects the same rows and the output layer
    runs without its own sequence-parallel gather (backward: the partial input gradients of
    the vocab shards are all-reduced, as without sequence parallelism).

    Args:
        model: the last-stage chunk that produced ``hidden_LBH`` (wrapped or not).
        hidden_LBH: ``decoder_hidden`` output.
        rows_T: int64 rows of the batch-first flattened ``[B * L]`` positions.
    """
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    inner = unwrap_chunk(model)
    layer = inner.output_layer
    sequence_parallel = layer.sequence_parallel
    if sequence_parallel:
        hidden_LBH = gather_from_sequence_parallel_region(
            hidden_LBH, tensor_parallel_output_grad=False, group=layer.tp_group
        )
    length, batch, hidden = hidden_LBH.shape
    # Batch-first row b * L + l is row l * B + b of the sequence-first [L * B] view (no copy).
    seq_first_T = (rows_T % length) * batch + rows_T // length
    selected_T1H = hidden_LBH.reshape(length * batch, hidden).index_select(0, seq_first_T).unsqueeze(1)
    weight = inner.shared_embedding_or_output_weight() if inner.share_embeddings_and_output_weights else None
    layer.sequence_parallel = False  # rows are already gathered; megatron does the same for inference
    try:
        logits_T1V, _ = layer(selected_T1H, weight=weight)
    finally:
        layer.sequence_parallel = sequence_parallel
    return logits_T1V.squeeze(1)
