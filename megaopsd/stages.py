"""Which decoder layers each pipeline stage (and virtual chunk) holds: megatron-core's rule, as data.

megatron-core 0.16.1 splits ``num_layers`` evenly over the pipeline stages unless
``num_layers_in_first_pipeline_stage`` and/or ``num_layers_in_last_pipeline_stage`` are set
(``TransformerConfig``); then the stages in between ("middle" stages, including the last one
when only the first is set, and vice versa) share the remaining layers evenly. With virtual
pipeline stages (VPP) each stage's layers are cut into ``vpp`` equal chunks, and chunk ``v`` of
every stage comes before chunk ``v + 1`` of any stage in layer order:

    PP2, VPP2, 6 layers, first stage 4:  stage 0 holds [0, 1] and [3, 4]; stage 1 holds [2] and [5]

``check_stages`` explains a layout megatron would refuse; ``stage_layer_counts`` and
``chunk_layers`` are what the config validation, the dry run and the conversion tests use.
Nothing here imports torch or megatron (the config is checked before either is loaded);
``tests/unit/test_stages.py`` compares these numbers with megatron's own functions.
"""

from __future__ import annotations

FIRST = "parallel.num_layers_in_first_pipeline_stage"
LAST = "parallel.num_layers_in_last_pipeline_stage"


def _suggest(num_layers: int, pp: int, vpp: int) -> tuple[int | None, int | None] | None:
    """The (first, last) setting that makes ``num_layers`` fit PP x VPP with the smallest largest
    stage (ties: fewer layers on the first stage, which also holds the embedding); None if none fits."""
    best: tuple[int, int, int | None, int | None] | None = None
    choices = [None, *range(1, num_layers + 1)]
    for first in choices:
        for last in choices:
            if first is None and last is None:
                continue
            if check_stages(num_layers, pp, vpp, first, last) is not None:
                continue
            counts = stage_layer_counts(num_layers, pp, first, last)
            key = (max(counts), counts[0], first, last)
            if best is None or key[:2] < best[:2]:
                best = key
    return None if best is None else (best[2], best[3])


def _describe(setting: tuple[int | None, int | None]) -> str:
    parts = [f"{name}={value}" for name, value in zip((FIRST, LAST), setting) if value is not None]
    return " ".join(parts)


def check_stages(
    num_layers: int, pp: int, vpp: int | None, first: int | None, last: int | None
) -> str | None:
    """Why megatron-core would refuse this split (a sentence with the valid choices), or None.

    Args:
        num_layers: decoder layers of the model (HF ``num_hidden_layers``).
        pp: pipeline-parallel size.
        vpp: virtual pipeline stages per stage (None: no interleaving).
        first: layers on the first stage (None: even split).
        last: layers on the last stage (None: even split).
    """
    chunks = vpp or 1
    if first is None and last is None:
        if num_layers % (pp * chunks) == 0:
            return None
        hint = _suggest(num_layers, pp, chunks) if pp > 1 else None
        fix = f"; or set uneven stages, e.g. {_describe(hint)}" if hint else ""
        layout = f"PP {pp} x VPP {chunks}" if vpp else f"PP {pp}"
        return f"{layout} does not divide num_hidden_layers={num_layers}: pick PP (and VPP) dividing it{fix}"
    if pp < 2:
        return "uneven first/last stages need parallel.pipeline_model_parallel_size >= 2; set them to null"
    for name, value in ((FIRST, first), (LAST, last)):
        if value is None:
            continue
        if value < 1:
            return f"{name}={value} must be >= 1 (megatron gives every stage at least one layer)"
        if value % chunks:
            return f"{name}={value} must be a multiple of the virtual stages per stage ({chunks})"
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    if middle_stages == 0 and chunks > 1:
        # megatron-core 0.16.1's layer offset divides by the number of middle stages here.
        return (
            f"{_describe((first, last))}: with VPP, megatron-core cannot place stages when both ends are "
            f"set and no stage is left in between (PP {pp}); set only one of the two"
        )
    given = f"{_describe((first, last))} leaves {middle_layers} layers for {middle_stages} other stages"
    if middle_stages == 0 and middle_layers != 0:
        return f"{given}; with both ends set at PP {pp} they must add up to num_hidden_layers={num_layers}"
    if middle_stages > 0:
        per_stage = middle_layers // middle_stages
        if middle_layers <= 0 or middle_layers % middle_stages or per_stage % chunks:
            return (
                f"{given}; the other stages need an equal share of at least one layer"
                + (f", a multiple of VPP {chunks}" if chunks > 1 else "")
                + f" (num_hidden_layers={num_layers})"
            )
    return None


def stage_layer_counts(
    num_layers: int, pp: int, first: int | None = None, last: int | None = None
) -> list[int]:
    """Decoder layers on each pipeline stage, first to last (the split must be valid)."""
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    per_stage = middle_layers // middle_stages if middle_stages else 0
    counts = [per_stage] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def chunk_layers(
    num_layers: int, pp: int, vpp: int | None, first: int | None = None, last: int | None = None
) -> dict[tuple[int, int], range]:
    """Global 0-based decoder layer indices of each ``(pipeline rank, virtual stage)``.

    Layer order: virtual stage 0 of every pipeline rank (rank 0 first), then virtual stage 1...
    """
    chunks = vpp or 1
    per_chunk = [count // chunks for count in stage_layer_counts(num_layers, pp, first, last)]
    layout: dict[tuple[int, int], range] = {}
    start = 0
    for vp_stage in range(chunks):
        for pp_rank in range(pp):
            layout[(pp_rank, vp_stage)] = range(start, start + per_chunk[pp_rank])
            start += per_chunk[pp_rank]
    return layout


def interleaved_min_microbatches(pp: int, vpp: int) -> int:
    """The fewest microbatches a step may have under megatron's interleaved schedule (VPP).

    The count must be a multiple of ``pp`` (the schedule runs microbatches in groups of PP).
    And it must leave the first stage a steady phase: its warm-up is ``2 (pp - 1) + (vpp - 1) pp``
    of the ``count x vpp`` chunk passes, and when that covers all of them (every pass in warm-up:
    PP2 x VPP2 with 2 microbatches, PP4 x VPP2 with 4) the stages' point-to-point sends and
    receives no longer pair up over gloo and the step hangs. So: the smallest multiple of ``pp``
    whose ``count x vpp`` exceeds that warm-up.
    """
    warmup = 2 * (pp - 1) + (vpp - 1) * pp
    count = pp
    while count * vpp <= warmup:
        count += pp
    return count
