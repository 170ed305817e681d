"""Peak memory of one paired forward/backward with and without activation recompute.

Each variant runs in a fresh process (TP1, the ``small`` preset, fixed teacher): build the
model, one warm-up forward/backward (grad buffers, caches), then reset the kernel's peak-RSS
mark (writing "5" to /proc/self/clear_refs), run one more forward/backward and read VmHWM. The
peak rise over the RSS before the step is the memory the step itself needs: activations kept
for backward, the scored rows' logits and the loss's working set. glibc is told to serve every
allocation above 128 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``), so freed tensors go back to the
OS and the warm-up's pages do not hide the second step's peak. The losses of all variants are
printed: recompute must not change them.

    python bench/recompute_memory.py                           # none, selective, full (1 layer)
    python bench/recompute_memory.py --rollouts 2 --preset tiny

Ends with ``RESULT recompute_memory full_over_none=... none_mb=... full_mb=... same_loss=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {"none": None, "selective": "selective", "full": "full"}


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024


def run_variant(args: argparse.Namespace) -> dict:
    """One variant in this process: the step's peak RSS rise and its loss."""
    import tempfile

    import torch

    from bench.paired_step import make_samples
    from megaopsd.algorithm.batch import build_microbatches
    from megaopsd.algorithm.loss import make_loss_fn
    from megaopsd.algorithm.optim import wrap_student
    from megaopsd.algorithm.step import forward_backward
    from megaopsd.algorithm.teacher import make_teacher
    from megaopsd.config import (
        LossConfig,
        ModelConfig,
        ParallelConfig,
        RuntimeConfig,
        TeacherConfig,
        TrainerConfig,
    )
    from megaopsd.models import build_model_chunks, load_hf_config
    from megaopsd.runtime import Runtime
    from tools.make_tiny_model import make_tiny_model

    par_cfg = ParallelConfig()
    runtime = Runtime.start(par_cfg, RuntimeConfig(cpu_threads=0))
    tmp = tempfile.mkdtemp()
    hf_dir = make_tiny_model("qwen3", Path(tmp) / "model", preset=args.preset)
    spec = load_hf_config(hf_dir)
    model_cfg = ModelConfig(hf_path=str(hf_dir), recompute_granularity=VARIANTS[args.variant])
    torch.manual_seed(0)

    def build():
        return build_model_chunks(spec, model_cfg, runtime.parallel)

    chunks = build()
    teacher = make_teacher(TeacherConfig(mode="fixed"), chunks, build)
    student = wrap_student(chunks, trainer=TrainerConfig(lr=1e-5), parallel=par_cfg)
    loss_fn = make_loss_fn(
        LossConfig(kind="jsd"), vocab_size=spec.vocab_size, tp_group=runtime.parallel.tp_group
    )
    samples = make_samples(
        spec.vocab_size, args.rollouts, args.prompt, args.teacher_prompt, args.response, args.response
    )
    mbs = build_microbatches(samples, max_tokens=10**9, pad_id=0)

    def step() -> float:
        sums, tokens = forward_backward(
            student=student, teacher=teacher, microbatches=mbs, loss_fn=loss_fn, parallel=runtime.parallel
        )
        return sums["loss_sum"] / tokens

    step()  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_mb("VmRSS")
    loss = step()
    peak = _rss_mb("VmHWM")
    runtime.shutdown()
    return {"variant": args.variant, "peak_rise_mb": peak - before, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--rollouts", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--teacher-prompt", type=int, default=384)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("VARIANT " + json.dumps(run_variant(args)), flush=True)
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=str(ROOT))
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "variant"
        ]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(
            next(line for line in out.splitlines() if line.startswith("VARIANT "))[8:]
        )
    print(
        f"TP1 {args.preset}, {args.rollouts} rollouts: student {args.prompt}+{args.response}, "
        f"teacher {args.teacher_prompt}+{args.response} tokens, one paired forward/backward"
    )
    print(f"{'recompute':<11}{'peak rise MB':>14}{'loss':>16}")
    for name, r in results.items():
        print(f"{name:<11}{r['peak_rise_mb']:>14.1f}{r['loss']:>16.9f}")
    none, full = results["none"], results["full"]
    same = all(r["loss"] == none["loss"] for r in results.values())
    print(
        f"RESULT recompute_memory full_over_none={full['peak_rise_mb'] / none['peak_rise_mb']:.3f} "
        f"selective_over_none={results['selective']['peak_rise_mb'] / none['peak_rise_mb']:.3f} "
        f"none_mb={none['peak_rise_mb']:.1f} full_mb={full['peak_rise_mb']:.1f} same_loss={same} preset={args.preset}"
    )


if __name__ == "__main__":
    main()
