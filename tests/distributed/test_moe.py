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
        # the dry run's count of this rank's expert parameters is the model's
        from megaopsd.config import Config
        from megaopsd.dry_run import DryRunPlan

        cfg = Config(
            model=ModelConfig(hf_path=str(model_dir)),
            parallel=ParallelConfig(
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
            ),
        )
        planned = DryRunPlan.of(cfg, dist.get_world_size()).stage_expert_params()[par.pp_rank]
        held = sum(
            p.numel() for chunk in chunks for name, p in chunk.named_parameters() if ".experts." in name
        )
        out["expert_params"] = (held, planned)
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
    for r in results:  # the dry run counts each rank's experts exactly
        held, planned = r["expert_params"]
        assert held == planned == 4 // pp * 8 // ep * 3 * 128 * 64, r["expert_params"]  # 4 layers


def _microbatches(runtime, budget: int):
    """This replica's share of the fixed rollouts, padded to a multiple of 2 in every layout (the
    padded positions route through the experts too, so the layouts compared pad alike), as many
    microbatches on every replica as the most any replica needs: what the trainer does when EP > 1
    (``microbatches_for_expert_groups``), here at every layout so that the layouts compared cut
    the rollouts alike."""
    import dataclasses

    from megaopsd.algorithm.batch import build_microbatches
    from megaopsd.algorithm.step import microbatches_for_expert_groups
    from tests.helpers import fixed_rollouts

    par = runtime.parallel
    mine = fixed_rollouts()[par.dp_rank :: par.dp_size]
    return microbatches_for_expert_groups(
        lambda count: build_microbatches(mine, max_tokens=budget, pad_id=0, pad_multiple=2, min_count=count),
        dataclasses.replace(par, ep_size=2),  # agree on the count whatever the EP size
    )


def _moe_step(hf_dir: str, tp: int, ep: int, **setup):
    """Build the tiny MoE's components at TP x EP and run one paired forward/backward on the
    fixed rollouts; returns (runtime, components, microbatches, loss)."""
    from megaopsd.algorithm.step import forward_backward
    from tests.helpers import BUDGET_FOUR, paired_setup

    runtime, parts = paired_setup(
        hf_dir, tp, 1, sp=tp > 1, parallel={"expert_model_parallel_size": ep}, **setup
    )
    mbs = _microbatches(runtime, BUDGET_FOUR)
    sums, tokens = forward_backward(
        student=parts.student,
        teacher=parts.teacher,
        microbatches=mbs,
        loss_fn=parts.loss_fn,
        parallel=runtime.parallel,
    )
    return runtime, parts, mbs, sums["loss_sum"] / tokens


def step_worker(hf_dir: str, tp: int, ep: int, mode: str = "fixed"):
    """The paired step's loss, load-balancing loss and HF-named gradients at one layout; with
    ``mode="current"`` also the load-balancing loss of the student's forward alone."""
    from megaopsd.algorithm.step import moe_aux_loss
    from tests.helpers import export_full

    runtime, parts, mbs, loss = _moe_step(hf_dir, tp, ep, mode=mode)
    out = {"loss": loss, "aux": moe_aux_loss(parts.student, len(mbs)), "num_mb": len(mbs)}
    if mode == "current":  # the student alone, gradients on: what its routers record
        for mb in mbs:
            model = parts.student.chunks[0]
            model(mb.student_tokens_BL, mb.position_ids(mb.student_tokens_BL), None)
        out["student_alone_aux"] = moe_aux_loss(parts.student, len(mbs))
    out["grads"] = export_full(parts.student.chunks, parts.spec, runtime, grads=True)
    runtime.shutdown()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _assert_same_step(result: dict, reference: dict) -> None:
    assert result["num_mb"] == reference["num_mb"] >= 2
    assert abs(result["loss"] - reference["loss"]) <= 1e-5 * abs(reference["loss"]), (
        result["loss"],
        reference["loss"],
    )
    assert abs(result["aux"] - reference["aux"]) <= 1e-5 * reference["aux"], (result["aux"], reference["aux"])
    grads, ref_grads = result["grads"], reference["grads"]
    assert sorted(grads) == sorted(ref_grads) and any(".experts." in n for n in grads)
    worst = max((_rel(grads[n], ref), n) for n, ref in ref_grads.items())
    assert worst[0] <= 1e-5, worst


def test_expert_parallel_step_equals_one_expert_group(tiny_qwen3_moe):
    """The step-1 loss, the load-balancing loss and every gradient (router and experts included)
    at TP2 x EP2 (SP, one replica) equal one process, and at EP2 (two replicas) equal EP1 on the
    same two replicas (each replica's routers see the same tokens in both), within 1e-5."""
    hf = str(tiny_qwen3_moe)
    one = run_ranks(step_worker, world_size=1, args=(hf, 1, 1))[0]
    tp2_ep2 = run_ranks(step_worker, world_size=2, args=(hf, 2, 2))[0]
    _assert_same_step(tp2_ep2, one)
    ep1_dp2 = run_ranks(step_worker, world_size=2, args=(hf, 1, 1))[0]
    ep2_dp2 = run_ranks(step_worker, world_size=2, args=(hf, 1, 2))[0]
    _assert_same_step(ep2_dp2, ep1_dp2)
    print(f"loss {one['loss']:.6f}, load-balancing loss {one['aux']:.4f} (EP1 x DP2: {ep1_dp2['aux']:.4f})")


def test_the_teacher_stream_adds_no_load_balancing_loss(tiny_qwen3_moe):
    """With the teacher on the student's own weights (teacher.mode=current), the routers record
    exactly what the student's forward alone records: the teacher's pass (no gradients) adds no
    load-balancing term, token count or router statistic."""
    result = run_ranks(step_worker, world_size=1, args=(str(tiny_qwen3_moe), 1, 1, "current"))[0]
    assert result["aux"] > 0 and result["aux"] == result["student_alone_aux"], result


def lora_worker(hf_dir: str, ep: int):
    """One OPSD step with LoRA on the attention of the MoE model (the recipe's setting)."""
    from megaopsd.models.lora import adapters_of

    lora = {"rank": 4, "alpha": 8.0, "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj")}
    runtime, parts, _, loss = _moe_step(hf_dir, 1, ep, lora=lora)
    chunk = parts.student.chunks[0]
    trained = sorted(
        {
            name.split(".decoder.layers.")[-1].split(".", 1)[1]
            for name, p in chunk.named_parameters()
            if p.requires_grad
        }
    )
    adapters = adapters_of(parts.student.chunks)
    runtime.shutdown()
    return {"loss": loss, "trained": trained, "adapters": len(adapters)}


def test_attention_lora_trains_only_the_attention_adapters_at_ep2(tiny_qwen3_moe):
    """LoRA on a mixture-of-experts model adapts q/k/v/o only (experts and routers frozen), the
    fixed teacher is the base with the adapters off, and the step runs at EP2."""
    results = run_ranks(lora_worker, world_size=2, args=(str(tiny_qwen3_moe), 2))
    for result in results:
        assert result["adapters"] == 2 * 4, result  # linear_qkv and linear_proj of 4 layers
        assert result["loss"] > 0 and all("self_attention" in name for name in result["trained"]), result
