"""Cost of one paired (teacher + student) step against a student-only step on the same batch.

Both variants run the same microbatches through megatron-core's schedule with forward and
backward; the student-only step skips the teacher stream and scores the student against its
own detached logits with the same loss, so the difference is the teacher forward alone. The
FLOP estimate for the teacher (forward only, its own sequence lengths) is printed beside the
measurement.

    python bench/paired_step.py                                   # tiny Qwen3, one process
    python bench/paired_step.py --preset small --repeats 3        # ~100M parameters
    torchrun --nproc-per-node 2 bench/paired_step.py --pp 2       # pipeline parallel

Ends with ``RESULT paired_step teacher_overhead=... paired_s=... student_only_s=...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclasses.dataclass
class Sample:
    student_prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    response_ids: list[int]


def make_samples(vocab: int, count: int, prompt: int, solution: int, response: int) -> list[Sample]:
    rng = random.Random(0)
    out = []
    for _ in range(count):
        student = [rng.randrange(vocab) for _ in range(prompt)]
        teacher = student + [rng.randrange(vocab) for _ in range(solution)]
        out.append(Sample(student, teacher, [rng.randrange(vocab) for _ in range(response)]))
    return out


class StudentOnly:
    """A forward step without the teacher stream: the student is scored against itself."""

    def __init__(self, paired):
        self.paired = paired

    def __call__(self, data_iterator, model):
        from functools import partial

        mb = next(data_iterator).to(next(model.parameters()).device)
        out = model(mb.student_tokens_BL, mb.position_ids(mb.student_tokens_BL), None)
        if not self.paired.student_chunks[0].module.post_process:
            return out, None
        return out, partial(self._loss, mb)

    def _loss(self, mb, logits):
        vocab = logits.shape[-1]
        rows = logits.reshape(-1, vocab).index_select(0, mb.student_index_T)
        loss_sum, _ = self.paired.loss_fn(rows, rows.detach(), mb.loss_mask_T, mb.target_ids_T)
        return loss_sum, mb.loss_mask_T.sum().to(torch.int), {"loss_sum": loss_sum.detach().clone()}


def time_step(student, teacher, mbs, loss_fn, parallel, *, student_only: bool) -> float:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megaopsd.algorithm.forward import PairedForward

    paired = PairedForward(student_chunks=student.chunks, teacher=teacher, loss_fn=loss_fn)
    step = StudentOnly(paired) if student_only else paired
    for chunk in student.chunks:
        chunk.zero_grad_buffer()
    sync()
    start = time.perf_counter()
    get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter(mbs),
        model=student.chunks[0],
        num_microbatches=len(mbs),
        seq_length=max(mb.student_len + mb.teacher_len for mb in mbs),
        micro_batch_size=max(mb.batch_size for mb in mbs),
        forward_only=False,
    )
    sync()
    return time.perf_counter() - start


def sync() -> None:
    """All ranks (and the GPU's queue) done before the clock is read."""
    if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl":
        torch.cuda.synchronize()
    torch.distributed.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64, help="student prompt tokens")
    parser.add_argument("--solution", type=int, default=128, help="extra teacher prompt tokens")
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--microbatch-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from megaopsd.algorithm.batch import build_microbatches
    from megaopsd.components import build_components
    from megaopsd.config import Config, LossConfig, ModelConfig, ParallelConfig, RuntimeConfig, TrainerConfig
    from megaopsd.runtime import Runtime
    from tools.make_tiny_model import make_tiny_model

    par_cfg = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    rt_cfg = RuntimeConfig(cpu_threads=0 if runtime_world() == 1 else 1)
    runtime = Runtime.start(par_cfg, rt_cfg)
    device = f"{torch.cuda.get_device_name()} (CUDA)" if runtime.device.type == "cuda" else "CPU"
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = (
            make_tiny_model("qwen3", Path(tmp) / "model", preset=args.preset) if runtime.is_main else None
        )
        holder = [str(hf_dir) if hf_dir else None]
        torch.distributed.broadcast_object_list(holder, src=0)
        cfg = Config(
            model=ModelConfig(hf_path=holder[0]),
            parallel=par_cfg,
            runtime=rt_cfg,
            trainer=TrainerConfig(lr=1e-5),
            loss=LossConfig(kind="jsd", beta=0.5),
        )
        # The same construction as the trainer (HF weights, fixed teacher, DDP, Adam, JSD).
        parts = build_components(cfg, runtime)
        torch.distributed.barrier()  # every rank has read the model before rank 0 deletes it
    spec, student, teacher, loss_fn = parts.spec, parts.student, parts.teacher, parts.loss_fn
    samples = make_samples(spec.vocab_size, args.samples, args.prompt, args.solution, args.response)
    mbs = build_microbatches(samples, max_tokens=args.microbatch_tokens, pad_id=0)
    timings = {"paired": [], "student_only": []}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name in ("student_only", "paired"):
            seconds = time_step(
                student, teacher, mbs, loss_fn, runtime.parallel, student_only=name == "student_only"
            )
            if repeat:
                timings[name].append(seconds)
    paired, alone = statistics.median(timings["paired"]), statistics.median(timings["student_only"])
    s_len = args.prompt + args.response - 1
    t_len = args.prompt + args.solution + args.response - 1
    flop_estimate = t_len / (3 * s_len)  # teacher forward (1x) over student forward + backward (3x)
    if runtime.is_main:
        print(
            f"{spec.architecture} {args.preset} on {device}: {args.samples} samples in {len(mbs)} microbatches, "
            f"student {s_len} / teacher {t_len} tokens each, TP{args.tp} PP{args.pp}"
        )
        print(f"{'variant':<14}{'median s':>10}{'runs':>6}")
        print(f"{'student only':<14}{alone:>10.3f}{len(timings['student_only']):>6}")
        print(f"{'paired':<14}{paired:>10.3f}{len(timings['paired']):>6}")
        print(
            f"teacher overhead {paired / alone - 1:.3f}x (FLOP estimate {flop_estimate:.3f}x, goal <= 0.5x)"
        )
        print(
            f"RESULT paired_step teacher_overhead={paired / alone - 1:.3f} paired_s={paired:.4f} "
            f"student_only_s={alone:.4f} flop_estimate={flop_estimate:.3f} preset={args.preset} "
            f"tp={args.tp} pp={args.pp}"
        )
    runtime.shutdown()


def runtime_world() -> int:
    from megaopsd.runtime import read_launch_env

    return read_launch_env().world_size


if __name__ == "__main__":
    main()
