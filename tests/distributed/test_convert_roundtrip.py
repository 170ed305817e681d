"""HF -> Megatron (TP2, PP2, ...) -> HF reproduces every tensor bit for bit, for every family.

The tiny vocabulary (549) is not a multiple of 128 x TP, so the padding path is exercised;
qwen3 has tied embeddings, so PP2 covers the last stage's copy of the embedding. qwen2 is
imported from a sharded checkpoint (index + several files). Export goes through the streaming
iterator to one or several destination ranks, and to every rank (the colocated refit) through
the collectives and through shared memory (``HostExchange``), twice, so the second export
reuses the slots. With data parallelism, replica 1's weights are then shifted by one: each
replica must export its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dist_harness import run_ranks


def _fused_groups_together(names: list[str]) -> bool:
    """q, k, v of a layer are consecutive, and so are gate and up."""
    for i, name in enumerate(names):
        if ".q_proj." in name:
            expected = [name.replace("q_proj", "k_proj"), name.replace("q_proj", "v_proj")]
            if names[i + 1 : i + 3] != expected:
                return False
        if name.endswith("gate_proj.weight") and names[i + 1] != name.replace("gate_proj", "up_proj"):
            return False
    return True


def every_rank_report(report, family, prefix, chunks, spec, runtime, plan, exchange, original, shift) -> None:
    """Export to every rank through the collectives once and through ``exchange`` twice (the
    second reuses the slots); record what differs from ``original + shift`` on this rank."""
    import torch

    from megaopsd.convert import export_hf_weights

    shared = [
        export_hf_weights(chunks, spec, runtime.parallel, dst_ranks=None, plan=plan, exchange=exchange)
        for _ in range(2)
    ]
    exports = {"collectives": [export_hf_weights(chunks, spec, runtime.parallel, dst_ranks=None, plan=plan)]}
    exports["shared"] = shared
    for path, runs in exports.items():
        for index, export in enumerate(runs):
            # Copies: a tensor may be a view of a parameter; the next export must not alias it.
            pairs = [(name, tensor.clone()) for name, tensor in export]
            names = [name for name, _ in pairs]
            report[f"{family}@{prefix}{path}{index}"] = {
                "names_equal": sorted(names) == sorted(original) and len(names) == len(set(names)),
                "fused_together": _fused_groups_together(names),
                "mismatched": [
                    n for n, t in pairs if n not in original or not torch.equal(t, original[n] + shift)
                ],
            }


def roundtrip_worker(
    tp: int,
    pp: int,
    vpp: int | None,
    model_dirs: dict,
    dst_ranks: tuple[int, ...],
    stages: tuple[int | None, int | None] = (None, None),
) -> dict:
    """Import each family, export it to ``dst_ranks``; report mismatches seen on each destination.

    ``stages``: layers on the first / last pipeline stage (uneven stages), None for an even split.
    """
    import torch
    import torch.distributed as dist

    from megaopsd.config import ModelConfig, ParallelConfig, RuntimeConfig
    from megaopsd.convert import (
        HFCheckpointReader,
        export_hf_weights,
        export_plan,
        hf_tensor_names,
        load_hf_weights,
    )
    from megaopsd.models import build_model_chunks, load_hf_config
    from megaopsd.runtime import Runtime
    from megaopsd.runtime.host_exchange import HostExchange

    runtime = Runtime.start(
        ParallelConfig(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
            num_layers_in_first_pipeline_stage=stages[0],
            num_layers_in_last_pipeline_stage=stages[1],
        ),
        RuntimeConfig(),
    )
    report: dict = {}
    try:
        for family, model_dir in model_dirs.items():
            spec = load_hf_config(model_dir)
            chunks = build_model_chunks(spec, ModelConfig(hf_path=str(model_dir)), runtime.parallel)
            load_hf_weights(chunks, spec, model_dir, runtime.parallel)
            plan = export_plan(chunks, spec, runtime.parallel)
            got = list(export_hf_weights(chunks, spec, runtime.parallel, dst_ranks=dst_ranks, plan=plan))
            # Weight sync also asks for lm_head of a tied model (collective: every rank runs it).
            with_head = {}
            if spec.tie_word_embeddings:
                with_head = dict(
                    export_hf_weights(
                        chunks, spec, runtime.parallel, dst_ranks=dst_ranks, include_tied_lm_head=True
                    )
                )
            with HFCheckpointReader(model_dir) as reader:
                original = {name: reader.get_slice(name)[:] for name in reader.names()}
            # The colocated refit: every rank receives every tensor (order: plan, or rounds).
            exchange = HostExchange.open(plan.max_shard_bytes)
            every_rank_report(report, family, "", chunks, spec, runtime, plan, exchange, original, 0.0)
            if runtime.parallel.dp_size > 1:
                # Each replica exports its own shards: shift replica 1's weights by one, and each
                # replica must yield its own (nothing read from, or sent to, another replica).
                shift = float(runtime.parallel.dp_rank)
                with torch.no_grad():
                    for chunk in chunks:
                        for param in chunk.parameters():
                            param.add_(shift)
                every_rank_report(
                    report, family, "replica-", chunks, spec, runtime, plan, exchange, original, shift
                )
            exchange.close()
            if dist.get_rank() not in dst_ranks:
                assert got == [] and with_head == {}, "a non-destination rank received tensors"
                continue
            names = [name for name, _ in got]
            report[family] = {
                "names_equal": sorted(names) == sorted(original) and len(names) == len(set(names)),
                "plan_order": names == plan.names == hf_tensor_names(spec),
                "fused_together": _fused_groups_together(names),
                "plan_bytes": plan.total_bytes
                == sum(t.numel() * t.element_size() for t in original.values()),
                "mismatched": [n for n, t in got if n not in original or not torch.equal(t, original[n])],
            }
            if spec.tie_word_embeddings:
                report[family]["tied_lm_head"] = torch.equal(
                    with_head["lm_head.weight"], original["model.embed_tokens.weight"]
                )
        return report
    finally:
        runtime.shutdown()


def sharded_copy(model_dir: Path, out_dir: Path) -> Path:
    """The same model with its weights split over several safetensors files and an index."""
    import torch
    from safetensors.torch import load_file

    from megaopsd.convert import StreamingSafetensorsWriter, copy_side_files

    tensors = load_file(str(model_dir / "model.safetensors"))
    entries = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    writer = StreamingSafetensorsWriter(out_dir, entries, max_shard_bytes=600_000)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    copy_side_files(model_dir, out_dir)
    shards = sorted(out_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (out_dir / "model.safetensors").exists()
    # Read back without our reader: the shards hold exactly the original tensors.
    copied = {name: t for shard in shards for name, t in load_file(str(shard)).items()}
    assert sorted(copied) == sorted(tensors) and all(torch.equal(copied[n], t) for n, t in tensors.items())
    return out_dir


@pytest.fixture(scope="module")
def model_dirs(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The tiny models, qwen2 as a sharded checkpoint (index + several files)."""
    dirs = dict(tiny_models)
    dirs["qwen2"] = sharded_copy(tiny_models["qwen2"], tmp_path_factory.mktemp("sharded") / "qwen2")
    return dirs


def _check(results: list[dict], families, dst_ranks, *, replicas: bool = False) -> None:
    prefixes = ("", "replica-") if replicas else ("",)
    every_rank = [
        f"{family}@{prefix}{path}"
        for family in families
        for prefix in prefixes
        for path in ("collectives0", "shared0", "shared1")
    ]
    for rank, report in enumerate(results):
        expected = [*families, *every_rank] if rank in dst_ranks else every_rank
        assert sorted(report) == sorted(expected), f"rank {rank} got {sorted(report)}"
        for family, checks in report.items():
            assert checks.pop("mismatched") == [], f"rank {rank} {family}: tensors differ"
            assert all(checks.values()), f"rank {rank} {family}: {checks}"


@pytest.mark.parametrize(
    ("tp", "pp", "vpp", "dp", "dst_ranks"),
    [
        pytest.param(2, 1, None, 1, (0,), id="tp2"),
        pytest.param(1, 2, None, 1, (0, 1), id="pp2-two-destinations"),
        pytest.param(1, 1, None, 2, (1,), id="dp2"),
        pytest.param(2, 2, 2, 1, (3,), id="tp2xpp2-vpp2-last-rank"),
        pytest.param(1, 2, None, 2, (0,), id="pp2xdp2"),
    ],
)
def test_roundtrip_is_bit_exact(model_dirs, tp, pp, vpp, dp, dst_ranks):
    results = run_ranks(roundtrip_worker, world_size=tp * pp * dp, args=(tp, pp, vpp, model_dirs, dst_ranks))
    _check(results, model_dirs, dst_ranks, replicas=dp > 1)


@pytest.fixture(scope="module")
def uneven_models(tmp_path_factory) -> dict[str, Path]:
    """qwen3 (tied embeddings) and llama (untied) with 3 layers, and qwen3 with 6 for VPP."""
    from tools.make_tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("uneven")
    return {
        "qwen3": make_tiny_model("qwen3", root / "qwen3", num_layers=3),
        "llama": make_tiny_model("llama", root / "llama", num_layers=3),
        "qwen3-6": make_tiny_model("qwen3", root / "qwen3-6", num_layers=6),
    }


@pytest.mark.parametrize(
    ("tp", "pp", "vpp", "stages", "families"),
    [
        pytest.param(1, 2, None, (2, None), ("qwen3", "llama"), id="pp2-2+1"),
        pytest.param(1, 2, None, (None, 2), ("qwen3", "llama"), id="pp2-1+2"),
        # stage 0 holds layers [0, 1] and [3, 4], stage 1 holds [2] and [5]
        pytest.param(1, 2, 2, (4, None), ("qwen3-6",), id="pp2-vpp2-4+2"),
    ],
)
def test_uneven_stages_roundtrip_is_bit_exact(uneven_models, tp, pp, vpp, stages, families):
    dirs = {name: uneven_models[name] for name in families}
    results = run_ranks(roundtrip_worker, world_size=tp * pp, args=(tp, pp, vpp, dirs, (0, 1), stages))
    _check(results, dirs, (0, 1))
