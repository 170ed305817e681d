"""Benchmark: the generation phase with one engine against two colocated engines.

The same prompts, sampling settings and seeds go through

- one engine: one process (the single-process trainer's in-process engine);
- two engines: two gloo ranks under the torchrun environment, a vLLM ``external_launcher``
  worker in each (``rollout.placement=colocated``, engine TP1), the prompts split in halves and
  the completions exchanged so every rank holds all of them (``EngineFleet.generate``).

Each engine runs with the same torch intra-op threads (``--threads``, default 1), so two
engines use twice the cores: the comparison is what a job gains by generating on every GPU
instead of on one. time_ratio = two engines / one engine (goal <= 0.6); tokens are checked
identical. Timed after a warm-up call; median of ``--repeats`` calls.

    .venv/bin/python bench/rollout_scaling.py                  # small model, 32 prompts x 128 tokens
    .venv/bin/python bench/rollout_scaling.py --preset tiny --prompts 16 --tokens 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def worker(hf_dir: str, prompts: list[list[int]], tokens: int, repeats: int, threads: int) -> dict:
    """Start the runtime and this rank's engine, time ``repeats`` generations of all prompts."""
    import torch.distributed as dist

    from megaopsd.config import load_config
    from megaopsd.rollout.fleet import start_fleet
    from megaopsd.rollout.types import SamplingSettings
    from megaopsd.runtime.parallel import Runtime

    cfg = load_config(
        {
            "model": {"hf_path": hf_dir},
            "runtime": {"cpu_threads": threads},
            "rollout": {"max_model_len": 512, "kv_cache_gib": 0.25, "max_new_tokens": tokens},
        }
    )
    runtime = Runtime.start(cfg.parallel, cfg.runtime)
    fleet = start_fleet(cfg, runtime)
    # No stop token: responses run to max_new_tokens (equal seeds give both sides the same work).
    sampling = SamplingSettings.from_config(cfg.rollout, stop_token_ids=())
    fleet.generate(prompts[:2], sampling, step=999)  # warm-up
    seconds, out = [], None
    for repeat in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        out = fleet.generate(prompts, sampling, step=repeat)
        seconds.append(time.perf_counter() - start)
    fleet.close()
    runtime.shutdown()
    return {"seconds": statistics.median(seconds), "tokens": [s[0].response_ids for s in out]}


def main(argv: list[str] | None = None) -> int:
    from bench._ranks import run_ranks
    from tools.make_tiny_model import make_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="make_tiny_model preset (tiny or small)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per response")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    args = parser.parse_args(argv)
    prompts = [[(7 * i + j) % 1000 + 5 for j in range(16 + i % 8)] for i in range(args.prompts)]
    with tempfile.TemporaryDirectory(prefix="bench-rollout-scaling-") as tmp:
        model = str(make_tiny_model("qwen3", Path(tmp) / args.preset, preset=args.preset))
        job = (model, prompts, args.tokens, args.repeats, args.threads)
        one = run_ranks(worker, world_size=1, args=job)[0]
        two = run_ranks(worker, world_size=2, args=job)
    same = sum(a == b for a, b in zip(one["tokens"], two[0]["tokens"], strict=True)) / len(prompts)
    total = args.prompts * args.tokens
    print(f"{'engines':<8} {'seconds':>8} {'tok/s':>8}")
    print(f"{1:<8} {one['seconds']:>8.3f} {total / one['seconds']:>8.0f}")
    two_s = max(r["seconds"] for r in two)
    print(f"{2:<8} {two_s:>8.3f} {total / two_s:>8.0f}")
    print(
        f"RESULT rollout_scaling time_ratio={two_s / one['seconds']:.2f} one_s={one['seconds']:.3f} "
        f"two_s={two_s:.3f} identical_fraction={same:.2f} prompts={args.prompts} tokens={args.tokens} "
        f"threads_per_engine={args.threads}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
