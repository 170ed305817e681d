"""Qwen3-MoE: Megatron MoE layers (SequentialMLP experts, alltoall dispatch) against transformers,
and the Hugging Face round trip, at EP1, EP2, TP2 x EP2 (sequence parallel) and PP2 x EP2.

One spawn per layout: the worker builds the tiny Qwen3-MoE (8 experts, top-2, renormalised) from
its config, imports the Hugging Face weights (each rank reads only its own experts), runs a
forward, exports back to Hugging Face on rank 0 (experts gathered from the ranks that own them)
and reports the max logit difference to transformers and whether every exported tensor equals
the source bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.distributed.test_model_parity import TOLERANCE, hf_logits, make_batch, megatron_logits


def moe_worker(tp: int, pp: int, ep: int, model_dir: Path, input_ids: torch.Tensor, reference: torch.Tensor):
    import torch.distributed as dist
    from safetensors.torch import load_file

    from megaopsd.config import ModelConfig, ParallelConfig, RuntimeConfig
    from megaopsd.convert import export_hf_weights, load_hf_weights
    from megaopsd.models import build_model_chunks, load_hf_config
    from megaopsd.runtime import Runtime

    runtime = Runtime.start(
        ParallelConfig(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            sequence_parallel=tp > 1,
        ),
        RuntimeConfig(),
    )
    try:
        par = runtime.parallel
        out: dict = {"ep": (par.ep_size, par.ep_rank)}
        logits = megatron_logits(runtime, model_dir, input_ids)
        if logits is not None:
            out["logit_diff"] = (logits - reference).abs().max().item()
        spec = load_hf_config(model_dir)
        chunks = build_model_chunks(spec, ModelConfig(hf_path=str(model_dir)), par)
        load_hf_weights(chunks, spec, model_dir, par)
        experts = {
            index
            for chunk in chunks
            for layer in chunk.decoder.layers
            for index in layer.mlp.local_expert_indices
        }
        out["experts"] = sorted(experts)
        exported = dict(export_hf_weights(chunks, spec, par, dst_ranks=(0,)))
        if dist.get_rank() == 0:
            source = load_file(str(model_dir / "model.safetensors"))
            out["names_equal"] = sorted(exported) == sorted(source)
            out["not_bit_exact"] = [
                n for n, t in source.items() if n in exported and not torch.equal(exported[n], t)
            ]
        return out
    finally:
        runtime.shutdown()


@pytest.fixture(scope="module")
def moe_case(tiny_qwen3_moe):
    input_ids = make_batch(549, seed=11)
    return tiny_qwen3_moe, input_ids, hf_logits(tiny_qwen3_moe, input_ids)


@pytest.mark.parametrize(
    ("tp", "pp", "ep"),
    [
        pytest.param(1, 1, 1, id="ep1"),
        pytest.param(1, 1, 2, id="ep2"),
        pytest.param(2, 1, 2, id="tp2xep2"),
        pytest.param(1, 2, 2, id="pp2xep2"),
    ],
)
def test_moe_logits_match_transformers_and_round_trip_bit_exact(moe_case, tp, pp, ep):
    model_dir, input_ids, reference = moe_case
    world = max(tp * pp, ep * pp)
    results = run_ranks(moe_worker, world_size=world, args=(tp, pp, ep, model_dir, input_ids, reference))
    diffs = [r["logit_diff"] for r in results if "logit_diff" in r]
    print(f"max abs logit diff {diffs}, experts per rank {[r['experts'] for r in results]}")
    assert diffs and max(diffs) <= TOLERANCE, diffs
    # each rank holds only its EP rank's experts: 8 / EP of them, never all 8 (EP > 1)
    for r in results:
        size, rank = r["ep"]
        assert size == ep and r["experts"] == list(range(rank * 8 // ep, (rank + 1) * 8 // ep)), r
    assert results[0]["names_equal"] and results[0]["not_bit_exact"] == [], results[0]
