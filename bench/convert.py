"""Export throughput (Megatron -> HF safetensors) next to a plain safetensors save of the same tensors.

Builds the ~100M-parameter "small" preset (tools/make_tiny_model.py), imports it into Megatron
at the running layout, then times (best of ``--repeats``):

- safetensors ``save_file`` of the exported tensors, already gathered in memory under their HF
  names (the baseline: what writing those exact tensors costs with no Megatron in between);
- safetensors ``load_file`` and ``load_file`` + ``save_file`` of the original checkpoint, for
  reference;
- the streaming export iterator alone (TP gather, fused-tensor split, sends to rank 0);
- the export written to safetensors (iterator + streaming writer; what export-hf and
  file-based weight sync do after the checkpoint is loaded);
- the sliced import (``load_hf_weights``) for reference.

    python bench/convert.py                                    # TP1, one process
    torchrun --nproc-per-node 2 bench/convert.py --tp 2        # TP2

Ends with ``RESULT convert export_mb_s=... safetensors_save_mb_s=... ratio=...`` (export written
to safetensors vs a plain save of the same tensors; MB = 10**6 bytes).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))


def _best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _baseline(model_dir: Path, work: Path, repeats: int, exported: dict) -> dict[str, float]:
    """Seconds for a plain save of the exported tensors; load, save, load+save of the model file."""
    from safetensors.torch import load_file, save_file

    plain = str(work / "plain.safetensors")
    save_of_exported = _best_seconds(lambda: save_file(exported, plain, metadata={"format": "pt"}), repeats)
    src = str(model_dir / "model.safetensors")
    dst = str(work / "baseline.safetensors")
    load_file(src)  # warm the page cache, as the export's source is in memory
    tensors = load_file(src)
    return {
        "save of exported tensors": save_of_exported,
        "load (mmap, lazy)": _best_seconds(lambda: load_file(src), repeats),
        "save": _best_seconds(lambda: save_file(tensors, dst, metadata={"format": "pt"}), repeats),
        "load+save": _best_seconds(
            lambda: save_file(load_file(src), dst, metadata={"format": "pt"}), repeats
        ),
    }


def _megatron(args: argparse.Namespace, model_dir: Path, work: Path) -> tuple[dict[str, float], int]:
    """Seconds for import, export iterator and export-to-safetensors at the running layout."""
    import torch.distributed as dist

    from megaopsd.config import ModelConfig, ParallelConfig, RuntimeConfig
    from megaopsd.convert import export_hf_weights, export_plan, load_hf_weights
    from megaopsd.convert.offline import write_hf_checkpoint
    from megaopsd.models import build_model_chunks, load_hf_config
    from megaopsd.runtime import Runtime

    runtime = Runtime.start(
        ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp),
        RuntimeConfig(),
    )
    try:
        spec = load_hf_config(model_dir)
        chunks = build_model_chunks(spec, ModelConfig(hf_path=str(model_dir)), runtime.parallel)
        seconds = {
            "import": _best_seconds(
                lambda: load_hf_weights(chunks, spec, model_dir, runtime.parallel), args.repeats
            )
        }
        plan = export_plan(chunks, spec, runtime.parallel)

        def iterate() -> None:
            dist.barrier()
            for _ in export_hf_weights(chunks, spec, runtime.parallel, plan=plan):
                pass

        def write() -> None:
            dist.barrier()
            write_hf_checkpoint(chunks, spec, runtime, work / "export")

        seconds["export iterator"] = _best_seconds(iterate, args.repeats)
        seconds["export to safetensors"] = _best_seconds(write, args.repeats)
        exported = {
            name: t.detach().clone()
            for name, t in export_hf_weights(chunks, spec, runtime.parallel, plan=plan)
        }
        baseline = _baseline(model_dir, work, args.repeats, exported) if runtime.is_main else {}
        dist.barrier()
        return ({**baseline, **seconds} if runtime.is_main else {}), plan.total_bytes
    finally:
        runtime.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="qwen3", choices=["qwen3", "qwen2", "llama"])
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--model-dir", type=Path, help="reuse (or create) the model here")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    from megaopsd.runtime.distributed import read_launch_env
    from tools.make_tiny_model import make_tiny_model

    launch = read_launch_env()
    root = Path(tempfile.mkdtemp(prefix="bench-convert-")) if launch.rank == 0 else None
    model_dir = args.model_dir or Path(tempfile.gettempdir()) / f"megaopsd-bench-{args.family}-{args.preset}"
    if launch.rank == 0 and not (model_dir / "generation_config.json").is_file():
        make_tiny_model(args.family, model_dir, preset=args.preset)
    while not (model_dir / "generation_config.json").is_file():  # written last by make_tiny_model
        time.sleep(0.5)
    try:
        seconds, nbytes = _megatron(args, model_dir, root or Path(tempfile.gettempdir()))
    finally:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    if launch.rank != 0:
        return 0
    mb = nbytes / 1e6
    print(
        f"\nconvert benchmark: {args.family} {args.preset}, {mb:.1f} MB float32, TP{args.tp} PP{args.pp}, "
        f"best of {args.repeats}"
    )
    print(f"{'operation':<26}{'seconds':>10}{'MB/s':>10}")
    for name, secs in seconds.items():
        print(f"{name:<26}{secs:>10.3f}{mb / secs:>10.0f}")
    export_mb_s = mb / seconds["export to safetensors"]
    baseline_mb_s = mb / seconds["save of exported tensors"]
    print(
        f"RESULT convert export_mb_s={export_mb_s:.0f} safetensors_save_mb_s={baseline_mb_s:.0f} "
        f"ratio={export_mb_s / baseline_mb_s:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
