"""Benchmark: the trainer's weight sync (Megatron export + transport + engine load) vs the engine's own reload.

For each trainer layout (TP1 in one process; TP2 and PP2 in two gloo processes with a colocated
vLLM engine of TP1 in each, as ``rollout.placement=colocated`` runs them), on a model made on
the fly (``--preset``, default ``small``: ~100M parameters, tied embeddings, float32):

- trainer: ``megaopsd.rollout.refit.Refitter``, exactly what the trainer calls after a step: the
  streaming Megatron -> HF export (on CPU with both ranks on this host, the TP and PP shards
  travel through shared memory, ``rollout.shared_memory_export``), buckets, the in-memory
  transport into every engine, prefix-cache reset;
- gloo (beside, world 2 only): the same refit with ``rollout.shared_memory_export=false``: TP
  all-gather and broadcast from the owning stage over gloo (what a multi-host CPU job does, and
  the path NCCL takes on GPUs);
- engine: each engine's own ``collective_rpc("reload_weights", weights_iterator=...)`` from a
  ready in-memory HF state dict of the same weights, in engine order: the floor set by vLLM's
  loading and CPU repacking, with the whole state dict already in memory;
- rank0 directory (beside, world 2 only): the ``rollout.placement=rank0`` path: export to
  rank 0, safetensors shards under /dev/shm, ``reload_weights(weights_path=...)`` into rank 0's
  engine (in-process here, so vLLM's multiprocess RPC cost is not included).

Each timing runs from a barrier to the slowest rank's end; medians over ``--repeats`` interleaved
rounds after a warm-up. overhead_ratio = trainer / engine (goal <= 1.5). peak_extra_mb = what the
sync holds beyond the parameters on the worst rank (accounted on CPU: largest bucket + the
shared-memory slots, or + the largest TP gather on the gloo path; see refit.py).

    .venv/bin/python bench/weight_sync.py                       # small model, TP1, TP2, PP2
    .venv/bin/python bench/weight_sync.py --preset tiny --layouts tp1,pp2 --repeats 3
    .venv/bin/python bench/weight_sync.py --lora-rank 64      # LoRA refit (merged) vs full refit

With ``--lora-rank`` the student carries LoRA adapters and the trainer path merges
``W + (alpha/r) B A`` shard by shard inside the export (what a LoRA run syncs); ``trainer_full``
times the same export with the adapters off, i.e. the full-model refit without the merge.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 2), "pp2": (1, 2, 2)}  # tp, pp, processes


def _timed(fn: Callable[[], object]) -> float:
    """Seconds from a barrier to the slowest rank's end."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def worker(
    hf_dir: str, tp: int, pp: int, repeats: int, bucket_mib: int, threads: int, lora_rank: int = 0
) -> dict:
    from safetensors.torch import load_file

    from megaopsd.components import build_components
    from megaopsd.config import load_config
    from megaopsd.convert import export_hf_weights, export_plan
    from megaopsd.rollout.fleet import start_fleet
    from megaopsd.rollout.refit import Refitter
    from megaopsd.rollout.weight_sync import DirectoryTransport, iter_buckets, order_by_module, sync_weights
    from megaopsd.runtime.parallel import Runtime

    cfg = load_config(
        {
            "model": {"hf_path": hf_dir},
            "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
            "runtime": {"cpu_threads": threads},
            "teacher": {"mode": "current"},  # no teacher copy: only the student's shards matter here
            "rollout": {"max_model_len": 512, "kv_cache_gib": 0.0625, "weight_bucket_mb": bucket_mib},
            "lora": {"rank": lora_rank, "alpha": 2.0 * max(lora_rank, 1)},
        }
    )
    runtime = Runtime.start(cfg.parallel, cfg.runtime)
    par = runtime.parallel
    parts = build_components(cfg, runtime)  # the trainer's construction path
    spec, chunks = parts.spec, parts.chunks
    fleet = start_fleet(cfg, runtime)
    tied = bool(spec.tie_word_embeddings)
    refitter = Refitter(fleet, chunks, spec, par)  # what the trainer builds at its first sync
    collective = Refitter(fleet, chunks, spec, par, shared_memory=False)
    plan = export_plan(chunks, spec, par)
    state = load_file(str(Path(hf_dir) / "model.safetensors"))
    whole = 1 << 62
    ready = [
        p
        for b in iter_buckets(order_by_module(state.items()), bucket_bytes=whole, tie_word_embeddings=tied)
        for p in b
    ]
    directory = DirectoryTransport(fleet.engine.llm) if runtime.is_main and runtime.world_size > 1 else None
    llm = fleet.engine.llm
    peaks: list[float] = []

    def trainer() -> None:
        peaks.append(refitter(chunks)["perf/weight_sync_peak_mb"])

    def trainer_collective() -> None:  # the same refit through gloo's all-gather and broadcast
        collective(chunks)

    def engine() -> None:
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": ready, "is_checkpoint_format": True})

    def rank0_directory() -> None:
        weights = export_hf_weights(chunks, spec, par, dst_ranks=(0,), plan=plan)
        if directory is None:
            for _ in weights:
                pass
            return
        sync_weights(weights, directory, bucket_bytes=bucket_mib << 20, tie_word_embeddings=tied)

    paths = {"trainer": trainer, "engine": engine}
    if lora_rank:
        from megaopsd.models.lora import adapter_mode, adapters_of

        adapters = adapters_of(chunks)

        def trainer_full() -> None:  # the same export without the merge: a full-model refit
            with adapter_mode(adapters, "off"):
                refitter(chunks)

        paths = {"trainer": trainer, "trainer_full": trainer_full, "engine": engine}
    if runtime.world_size > 1:
        paths["rank0_dir"] = rank0_directory
        if refitter.exchange is not None:
            paths["collective"] = trainer_collective
    for fn in paths.values():
        fn()  # warm-up
    rounds: dict[str, list[float]] = {key: [] for key in paths}
    for _ in range(repeats):
        for key, fn in paths.items():
            rounds[key].append(_timed(fn))
    result = {key: statistics.median(v) for key, v in rounds.items()}
    result["peak_extra_mb"] = max(peaks)
    result["bytes"] = plan.total_bytes
    result["transport"] = refitter.transport
    refitter.close()
    if directory is not None:
        directory.close()
    fleet.close()
    runtime.shutdown()
    return result


def main(argv: list[str] | None = None) -> int:
    from bench._ranks import run_ranks
    from tools.make_tiny_model import make_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="make_tiny_model preset (tiny or small)")
    parser.add_argument("--layouts", default="tp1,tp2,pp2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mib", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="LoRA adapters of this rank: 'trainer' merges W + (alpha/r) B A per bucket, 'trainer_full' is the plain refit",
    )
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-weight-sync-") as tmp:
        model = str(make_tiny_model("qwen3", Path(tmp) / args.preset, preset=args.preset))
        for layout in args.layouts.split(","):
            tp, pp, world = LAYOUTS[layout]
            job = (model, tp, pp, args.repeats, args.bucket_mib, args.threads, args.lora_rank)
            rows.append((layout, run_ranks(worker, world_size=world, args=job)[0]))
    header = (
        f"{'layout':<7} {'MB':>7} {'trainer s':>10} {'engine s':>9} {'gloo s':>8} {'rank0 dir s':>12} "
        f"{'overhead':>9} {'peak MB':>8}"
    )
    print(header)
    print("-" * len(header))

    def column(r: dict, key: str, width: int) -> str:
        return f"{r[key]:>{width}.4f}" if key in r else f"{'-':>{width}}"

    for layout, r in rows:
        print(
            f"{layout:<7} {r['bytes'] / 1e6:>7.1f} {r['trainer']:>10.4f} {r['engine']:>9.4f} "
            f"{column(r, 'collective', 8)} {column(r, 'rank0_dir', 12)} "
            f"{r['trainer'] / r['engine']:>9.2f} {r['peak_extra_mb']:>8.1f}   {r['transport']}"
        )
    for layout, r in rows:
        if "trainer_full" in r:
            print(
                f"RESULT weight_sync_lora layout={layout} lora_rank={args.lora_rank} lora_refit_s={r['trainer']:.4f} "
                f"full_refit_s={r['trainer_full']:.4f} lora_over_full={r['trainer'] / r['trainer_full']:.2f}"
            )
    for layout, r in rows:
        extra = "".join(
            f" {name}={r[key]:.4f}"
            for key, name in (("collective", "gloo_s"), ("rank0_dir", "rank0_dir_s"))
            if key in r
        )
        print(
            f"RESULT weight_sync layout={layout} overhead_ratio={r['trainer'] / r['engine']:.2f} "
            f"peak_extra_mb={r['peak_extra_mb']:.1f} trainer_s={r['trainer']:.4f} engine_s={r['engine']:.4f}{extra}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
