"""Benchmark: megaopsd's weight sync into a running vLLM engine vs the engine's own reload and a memcpy.

For each model (the tiny Qwen3 and the ~100M ``small`` preset, made on the fly):

- engine reload: ``collective_rpc("reload_weights", weights_iterator=<ready list>)`` from an
  in-memory HF state dict already in engine order (tied lm_head included): the floor set by
  vLLM's own loading and CPU repacking;
- megaopsd memory: ``VllmEngine.update_weights`` from the same tensors as a trainer would hand
  them over (module ordering, buckets, in-memory transport, reload, prefix-cache reset);
- megaopsd directory: the same through safetensors shards under /dev/shm (the transport of a
  multiprocess engine; here on the in-process engine so the numbers compare);
- copy: ``dst.copy_(src)`` of the same tensors into preallocated buffers.

overhead_ratio = megaopsd memory / engine reload (goal <= 1.5); copy_ratio = megaopsd memory / copy
(how far above a plain copy of the bytes; the engine's repacking sets this floor on CPU);
gbps = bytes / megaopsd memory seconds. Medians over ``--repeats`` runs after one warm-up.
The source is an HF state dict for now; the trainer's Megatron export plugs in as ``source``.

    .venv/bin/python bench/weight_sync.py                      # tiny + small, ~2 min on 2 cores
    .venv/bin/python bench/weight_sync.py --models tiny --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from megaopsd.rollout import (  # noqa: E402
    DirectoryTransport,
    EngineSettings,
    VllmEngine,
    iter_buckets,
    order_by_module,
    sync_weights,
)
from tools.make_tiny_model import make_tiny_model  # noqa: E402

MIB = 1 << 20


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(model_dir: Path, *, repeats: int, bucket_bytes: int, threads: int) -> dict[str, float]:
    """Time the four paths on one model; returns seconds, bytes and parameter count."""
    state = load_file(str(model_dir / "model.safetensors"))
    tied = json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings", False)
    # the engine-order list the engine's own reload gets: same tensors, no megaopsd code on the clock
    ready = [
        pair
        for b in iter_buckets(order_by_module(state.items()), bucket_bytes=1 << 62, tie_word_embeddings=tied)
        for pair in b
    ]
    nbytes = sum(t.nbytes for _, t in ready)
    copies = [torch.empty_like(t) for _, t in ready]

    engine = VllmEngine(
        EngineSettings(
            model_path=str(model_dir),
            max_model_len=512,
            kv_cache_bytes=64 * MIB,
            weight_bucket_bytes=bucket_bytes,
        )
    )
    torch._C.set_num_threads(threads)  # the in-process engine made torch.set_num_threads a no-op and reset it
    directory = DirectoryTransport(engine.llm)
    try:

        def engine_reload() -> None:
            engine.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": ready, "is_checkpoint_format": True}
            )

        def megaopsd_memory() -> None:  # what the trainer calls: the source iterator on the clock
            stats = engine.update_weights(order_by_module(state.items()))
            assert stats.bytes == nbytes, (stats.bytes, nbytes)

        def megaopsd_directory() -> None:
            sync_weights(
                order_by_module(state.items()), directory, bucket_bytes=bucket_bytes, tie_word_embeddings=tied
            )

        def copy() -> None:
            for dst, (_, src) in zip(copies, ready):
                dst.copy_(src)

        paths = {
            "engine": engine_reload,
            "memory": megaopsd_memory,
            "directory": megaopsd_directory,
            "copy": copy,
        }
        for fn in paths.values():
            fn()  # warm-up: first-touch allocations, lazy imports
        result = {"params": sum(t.numel() for t in state.values()), "bytes": nbytes}
        result["buckets"] = engine.update_weights(order_by_module(state.items())).buckets
        # interleave the paths in each round so machine noise hits them alike
        rounds: dict[str, list[float]] = {key: [] for key in paths}
        for _ in range(repeats):
            for key, fn in paths.items():
                rounds[key].append(_seconds(fn))
        result.update({key: statistics.median(values) for key, values in rounds.items()})
        return result
    finally:
        directory.close()
        engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,small", help="comma list of make_tiny_model presets")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mib", type=int, default=512)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for every path (1: stable on a shared 2-core box)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-weight-sync-") as tmp:
        for preset in args.models.split(","):
            model_dir = make_tiny_model("qwen3", Path(tmp) / preset, preset=preset)
            row = measure(
                model_dir, repeats=args.repeats, bucket_bytes=args.bucket_mib * MIB, threads=args.threads
            )
            rows.append((preset, row))

    header = f"{'model':<6} {'params':>10} {'MB':>7} {'bkts':>4} {'engine s':>9} {'memory s':>9} {'dir s':>8} {'copy s':>8} {'overhead':>8} {'vs copy':>8} {'GB/s':>6} {'copy GB/s':>9}"
    print(header)
    print("-" * len(header))
    for preset, r in rows:
        print(
            f"{preset:<6} {r['params']:>10,} {r['bytes'] / 1e6:>7.1f} {r['buckets']:>4} {r['engine']:>9.4f} {r['memory']:>9.4f} "
            f"{r['directory']:>8.4f} {r['copy']:>8.4f} {r['memory'] / r['engine']:>8.2f} {r['memory'] / r['copy']:>8.1f} "
            f"{r['bytes'] / r['memory'] / 1e9:>6.2f} {r['bytes'] / r['copy'] / 1e9:>9.2f}"
        )
    preset, r = rows[-1]
    print(
        f"RESULT weight_sync overhead_ratio={r['memory'] / r['engine']:.2f} copy_ratio={r['memory'] / r['copy']:.1f} "
        f"gbps={r['bytes'] / r['memory'] / 1e9:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
