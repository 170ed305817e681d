"""The training step's peak memory against the dry run's estimate, by microbatch size and recompute.

Each case runs in a fresh process (TP1, float32, fixed teacher, JSD): build the model, one
warm-up paired forward/backward of a microbatch of ``n`` equal rollouts (grad buffers, caches),
then reset the kernel's peak-RSS mark (writing "5" to /proc/self/clear_refs), run one more and
read VmHWM. The peak rise over the RSS before the step is the memory the step itself needs:
activations kept for backward, the scored rows' logits and the loss's working set. glibc is
told to serve every allocation above 128 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``), so freed
tensors go back to the OS and the warm-up's pages do not hide the second step's peak.

Beside each measurement: the dry run's step working set for the same run (``activations`` +
``logits and loss`` + ``other transients`` of ``megaopsd.dry_run.estimate_memory_gib``, with
``trainer.microbatch_tokens`` = n rollouts exactly) and its error. The losses of the recompute
variants at one size are printed too: recompute must not change them.

    python bench/activation_memory.py                          # none at 1, 2, 4 rollouts; selective, full at 4
    python bench/activation_memory.py --attention unfused      # megatron's own attention (s x s scores)
    python bench/activation_memory.py --preset tiny --sizes 1,2

Ends with ``RESULT activation_memory max_error=... none_mb=... full_over_none=... same_loss=...``.
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

RECOMPUTE = {"none": None, "selective": "selective", "full": "full"}


def run_case(args: argparse.Namespace) -> dict:
    """One case in this process: the step's peak RSS rise, the dry run's estimate, the loss."""
    import tempfile

    import torch

    from bench._rss import peak_rss_mb, reset_peak_rss, rss_mb
    from bench.paired_step import make_samples
    from megaopsd.algorithm.batch import build_microbatches
    from megaopsd.algorithm.step import forward_backward
    from megaopsd.components import build_components
    from megaopsd.config import load_config
    from megaopsd.dry_run import STEP_PARTS, estimate_memory_gib
    from megaopsd.runtime import Runtime
    from tools.make_tiny_model import make_tiny_model

    tmp = tempfile.mkdtemp()
    hf_dir = make_tiny_model("qwen3", Path(tmp) / "model", preset=args.preset)
    rollout_tokens = args.prompt + args.teacher_prompt + 2 * args.response
    cfg = load_config(
        dict(
            model=dict(
                hf_path=str(hf_dir),
                recompute_granularity=RECOMPUTE[args.recompute],
                attention_backend=args.attention,
            ),
            loss=dict(kind="jsd", beta=0.5),
            teacher=dict(mode="fixed"),
            rollout=dict(max_new_tokens=args.response),
            data=dict(max_prompt_tokens=args.prompt, max_teacher_prompt_tokens=args.teacher_prompt),
            trainer=dict(microbatch_tokens=args.case_size * rollout_tokens, lr=1e-5),
            runtime=dict(device="cpu", cpu_threads=0),
        )
    )
    estimate = estimate_memory_gib(cfg, 1)
    estimate_mb = sum(estimate[name] for name in STEP_PARTS) * 1024
    runtime = Runtime.start(cfg.parallel, cfg.runtime)
    torch.manual_seed(0)
    parts = build_components(cfg, runtime)
    samples = make_samples(
        parts.spec.vocab_size, args.case_size, args.prompt, args.teacher_prompt, args.response, args.response
    )
    mbs = build_microbatches(samples, max_tokens=cfg.trainer.microbatch_tokens, pad_id=0)
    assert len(mbs) == 1, f"{len(mbs)} microbatches; the case measures one"

    def step() -> float:
        sums, tokens = forward_backward(
            student=parts.student,
            teacher=parts.teacher,
            microbatches=mbs,
            loss_fn=parts.loss_fn,
            parallel=runtime.parallel,
        )
        return sums["loss_sum"] / tokens

    step()  # warm-up
    before = rss_mb()
    if not reset_peak_rss():
        raise SystemExit(
            "activation_memory: cannot reset the peak RSS (/proc/self/clear_refs); it needs Linux"
        )
    loss = step()
    peak = peak_rss_mb(was_reset=True)
    runtime.shutdown()
    return {"peak_rise_mb": peak - before, "estimate_mb": estimate_mb, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument(
        "--sizes", default="1,2,4", help="rollouts per microbatch, measured without recompute"
    )
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--teacher-prompt", type=int, default=384)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument(
        "--attention", default="sdpa", choices=["sdpa", "unfused"], help="model.attention_backend"
    )
    parser.add_argument("--recompute", choices=sorted(RECOMPUTE), help=argparse.SUPPRESS)
    parser.add_argument("--case-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.recompute:
        print("CASE " + json.dumps(run_case(args)), flush=True)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    cases = [("none", n) for n in sizes] + [("selective", sizes[-1]), ("full", sizes[-1])]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=str(ROOT))
    shared = [
        f"--preset={args.preset}",
        f"--prompt={args.prompt}",
        f"--teacher-prompt={args.teacher_prompt}",
        f"--response={args.response}",
        f"--attention={args.attention}",
    ]
    results = {}
    for recompute, n in cases:
        cmd = [sys.executable, __file__, *shared, f"--recompute={recompute}", f"--case-size={n}"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        results[recompute, n] = json.loads(
            next(line for line in out.splitlines() if line.startswith("CASE "))[5:]
        )
    print(
        f"TP1 {args.preset}, float32, {args.attention} attention, fixed teacher, JSD; rollouts of student {args.prompt}+{args.response}, "
        f"teacher {args.teacher_prompt}+{args.response} tokens; one paired forward/backward of one microbatch"
    )
    print(f"{'recompute':<11}{'rollouts':>9}{'peak rise MB':>14}{'dry run MB':>12}{'error':>8}{'loss':>16}")
    errors = []
    for (recompute, n), r in results.items():
        error = r["estimate_mb"] / r["peak_rise_mb"] - 1
        errors.append(abs(error))
        print(
            f"{recompute:<11}{n:>9}{r['peak_rise_mb']:>14.1f}{r['estimate_mb']:>12.1f}{error:>+8.1%}{r['loss']:>16.9f}"
        )
    largest = sizes[-1]
    none, full = results["none", largest], results["full", largest]
    same = len({results[v, largest]["loss"] for v in RECOMPUTE}) == 1
    print(
        f"RESULT activation_memory max_error={max(errors):.3f} none_mb={none['peak_rise_mb']:.1f} "
        f"full_mb={full['peak_rise_mb']:.1f} full_over_none={full['peak_rise_mb'] / none['peak_rise_mb']:.3f} "
        f"selective_over_none={results['selective', largest]['peak_rise_mb'] / none['peak_rise_mb']:.3f} "
        f"same_loss={same} preset={args.preset} attention={args.attention}"
    )


if __name__ == "__main__":
    main()
