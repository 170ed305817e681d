"""Forward-only logits through megatron's pipeline schedule, for checks and evaluation.

``forward_logits`` runs a token batch through this rank's model chunks with
``get_forward_backward_func`` (forward_only), one sequence per microbatch, and returns the
vocab-parallel logits on the last pipeline stage. Training does not use it (its forward step
carries the paired teacher/student stream); conversion checks and tests do.

    logits_BSV = forward_logits(chunks, input_ids_BS, runtime.parallel)  # [b, s, padded_vocab/TP] or None

Legend: B batch, S sequence, V vocabulary shard.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
