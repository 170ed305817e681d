"""Uneven pipeline stages: our layer placement equals megatron-core's, and bad splits fail in one line.

``megaopsd.stages`` restates megatron-core 0.16.1's rule so the config can be checked before
megatron is imported; here it is compared with megatron's own ``get_num_layers_to_build`` and
``get_transformer_layer_offset`` for every valid split of small models, with and without VPP.
"""

from __future__ import annotations

import itertools

import pytest

from megaopsd.config import ConfigError, load_config, validate
from megaopsd.stages import check_stages, chunk_layers, stage_layer_counts

HF = {
    "architectures": ["Qwen3ForCausalLM"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "vocab_size": 549,
}


def _megatron_layers(num_layers: int, pp: int, vpp: int | None, first: int | None, last: int | None):
    """``{(pp_rank, vp_stage): range}`` as megatron builds and numbers them."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = TransformerConfig(
        num_layers=num_layers,
        hidden_size=64,
        num_attention_heads=4,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
        pipeline_dtype=None if pp == 1 else __import__("torch").float32,
    )
    out = {}
    for pp_rank in range(pp):
        for vp_stage in range(vpp or 1):
            stage = vp_stage if vpp else None
            count = get_num_layers_to_build(config, vp_stage=stage, pp_rank=pp_rank)
            offset = get_transformer_layer_offset(config, vp_stage=stage, pp_rank=pp_rank)
            out[(pp_rank, vp_stage)] = range(offset, offset + count)
    return out


def _splits():
    for num_layers, pp, vpp in itertools.product((3, 4, 6, 8, 9), (2, 3, 4), (None, 2)):
        for first, last in itertools.product((None, 1, 2, 3, 4), repeat=2):
            if (first, last) != (None, None) and check_stages(num_layers, pp, vpp, first, last) is None:
                yield num_layers, pp, vpp, first, last


SPLITS = list(_splits())


def test_valid_splits_cover_the_interesting_cases():
    assert (3, 2, None, 2, None) in SPLITS and (3, 2, None, None, 2) in SPLITS  # the e2e layouts
    assert any(vpp and first and last and pp > 2 for _, pp, vpp, first, last in SPLITS)  # VPP, middle stages
    assert len(SPLITS) > 40


@pytest.mark.parametrize(("num_layers", "pp", "vpp", "first", "last"), SPLITS)
def test_layer_placement_equals_megatron(num_layers, pp, vpp, first, last):
    ours = chunk_layers(num_layers, pp, vpp, first, last)
    assert ours == _megatron_layers(num_layers, pp, vpp, first, last)
    assert sorted(i for r in ours.values() for i in r) == list(range(num_layers))  # each layer once
    counts = stage_layer_counts(num_layers, pp, first, last)
    assert counts == [sum(len(ours[(s, v)]) for v in range(vpp or 1)) for s in range(pp)]


def test_what_we_refuse_megatron_cannot_build():
    """Every split we refuse, megatron refuses, crashes on (VPP with both ends at PP2), or
    silently turns into a placement that is not the model (ends asking more layers than exist)."""
    refused = silent = 0
    for num_layers, pp, vpp in itertools.product((3, 6, 9), (2, 3), (None, 2)):
        for first, last in itertools.product((None, 1, 2, 4), repeat=2):
            if (first, last) == (None, None) or check_stages(num_layers, pp, vpp, first, last) is None:
                continue
            refused += 1
            try:
                placement = _megatron_layers(num_layers, pp, vpp, first, last)
            except (ValueError, AssertionError, ZeroDivisionError):
                continue
            layers = [i for r in placement.values() for i in r]
            assert sorted(layers) != list(range(num_layers)) or min(map(len, placement.values())) == 0
            silent += 1
    assert refused > 20 and silent > 0


def test_three_layers_at_pp2():
    assert stage_layer_counts(3, 2, 2, None) == [2, 1]
    assert stage_layer_counts(3, 2, None, 2) == [1, 2]
    assert chunk_layers(3, 2, None, 1, 2) == {(0, 0): range(0, 1), (1, 0): range(1, 3)}
    # interleaved: chunk 0 of every stage before chunk 1 of any
    assert chunk_layers(6, 2, 2, 4, None) == {
        (0, 0): range(0, 2),
        (1, 0): range(2, 3),
        (0, 1): range(3, 5),
        (1, 1): range(5, 6),
    }


def _cfg(**parallel):
    return load_config({"model": {"hf_path": "unused"}, "parallel": parallel})


@pytest.mark.parametrize(
    ("parallel", "layers", "words"),
    [
        # 36 layers (Qwen3-4B/8B) at PP8: refused evenly, with a split that works
        (
            {"pipeline_model_parallel_size": 8},
            36,
            [
                "parallel.pipeline_model_parallel_size",
                "num_hidden_layers=36",
                "num_layers_in_first_pipeline_stage=1",
            ],
        ),
        (
            {
                "pipeline_model_parallel_size": 2,
                "num_layers_in_first_pipeline_stage": 2,
                "num_layers_in_last_pipeline_stage": 2,
            },
            3,
            ["must add up to num_hidden_layers=3"],
        ),
        (
            {"pipeline_model_parallel_size": 4, "num_layers_in_first_pipeline_stage": 2},
            9,
            ["leaves 7 layers for 3 other stages", "equal share"],
        ),
        (
            {
                "pipeline_model_parallel_size": 2,
                "virtual_pipeline_model_parallel_size": 2,
                "num_layers_in_first_pipeline_stage": 3,
            },
            6,
            ["num_layers_in_first_pipeline_stage=3", "multiple of the virtual stages per stage (2)"],
        ),
        ({"num_layers_in_last_pipeline_stage": 1}, 3, ["pipeline_model_parallel_size >= 2"]),
        ({"pipeline_model_parallel_size": 2, "num_layers_in_first_pipeline_stage": 0}, 3, ["must be >= 1"]),
    ],
)
def test_bad_splits_fail_with_the_valid_choices(parallel, layers, words):
    world = parallel.get("pipeline_model_parallel_size", 1)
    with pytest.raises(ConfigError) as info:
        validate(_cfg(**parallel), world_size=world, hf_config={**HF, "num_hidden_layers": layers})
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_good_uneven_split_validates():
    validate(
        _cfg(pipeline_model_parallel_size=8, num_layers_in_first_pipeline_stage=1),
        world_size=8,
        hf_config={**HF, "num_hidden_layers": 36},
    )
    assert check_stages(36, 8, None, 1, None) is None
    assert stage_layer_counts(36, 8, 1, None) == [1, 5, 5, 5, 5, 5, 5, 5]


@pytest.mark.parametrize("pp", [2, 3, 4, 8])
@pytest.mark.parametrize("vpp", [2, 3, 4])
def test_interleaved_minimum_leaves_every_stage_a_steady_phase_by_megatrons_own_count(pp, vpp):
    """megatron's get_pp_rank_microbatches says when a stage runs every pass in warm-up (the
    case that hung over gloo at PP2 x VPP2 with 2 microbatches); our minimum is the first count
    (a multiple of pp) where no stage does."""
    import types

    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    from megaopsd.stages import interleaved_min_microbatches

    def all_warmup(count: int) -> bool:
        for rank in range(pp):
            group = types.SimpleNamespace(size=lambda: pp, rank=lambda r=rank: r)
            p2p = types.SimpleNamespace(pp_group=group, virtual_pipeline_model_parallel_size=vpp)
            if get_pp_rank_microbatches(count, vpp, pp, p2p_communicator=p2p)[1]:
                return True
        return False

    minimum = interleaved_min_microbatches(pp, vpp)
    assert minimum % pp == 0 and not all_warmup(minimum)
    assert all(all_warmup(count) for count in range(pp, minimum, pp))
