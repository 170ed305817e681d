"""Cost of one paired (teacher + student) step: the old path against the new one, same run.

Old path (what the trainer did before): microbatches cut in rollout order, right-padded to their
longest member, and the output layer applied at every position of both streams. New path (the
trainer now): rollouts sorted by length before the cut, and the output layer applied only to
the rows that predict response tokens. Each path is also timed as a student-only step (the
student scored against its own detached logits with the same loss), so the teacher overhead
(paired / student-only - 1) is measured for both. Beside every measured ratio the bench prints
what a FLOP count of the work each path executes (padded lengths, all-position or response-only
logits; ``megaopsd.flops``) predicts.

Default shape (the acceptance shape): the ``small`` preset (vocab 32000), 16 rollouts, student
prompt 128 tokens, teacher prompt 384, responses spread evenly over 32-512 in shuffled order.

    python bench/paired_step.py                                    # acceptance shape, one process
    python bench/paired_step.py --preset tiny --rollouts 8         # quick check
    torchrun --nproc-per-node 2 bench/paired_step.py --pp 2        # pipeline parallel

Ends with ``RESULT paired_step new_over_old=... flop_new_over_old=... teacher_overhead_new=...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclasses.dataclass
class Sample:
    student_prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    response_ids: list[int]


def make_samples(vocab: int, count: int, prompt: int, teacher_prompt: int, lo: int, hi: int) -> list[Sample]:
    """Responses evenly spread over [lo, hi], in a fixed shuffled order (as rollouts arrive)."""
    rng = random.Random(0)
    lengths = [lo + round(i * (hi - lo) / max(count - 1, 1)) for i in range(count)]
    rng.shuffle(lengths)
    out = []
    for length in lengths:
        student = [rng.randrange(vocab) for _ in range(prompt)]
        teacher = student + [rng.randrange(vocab) for _ in range(teacher_prompt - prompt)]
        out.append(Sample(student, teacher, [rng.randrange(vocab) for _ in range(length)]))
    return out


class StudentOnly:
    """A forward step without the teacher stream: the student is scored against itself."""

    def __init__(self, paired):
        self.paired = paired

    def __call__(self, data_iterator, model):
        from megaopsd.models.builder import unwrap_chunk

        mb = next(data_iterator).to(next(model.parameters()).device)
        inner = unwrap_chunk(model)
        out = self.paired._stream(model, inner, mb.student_tokens_BL, mb.student_index_T, inner.post_process)
        if not inner.post_process:
            return out, None
        return out, partial(self._loss, mb)

    def _loss(self, mb, rows):
        loss_sum, _ = self.paired.loss_fn(rows, rows.detach(), mb.loss_mask_T, mb.target_ids_T)
        return loss_sum, mb.loss_mask_T.sum().to(torch.int), {"loss_sum": loss_sum.detach().clone()}


def time_step(student, teacher, mbs, loss_fn, *, student_only: bool, all_positions: bool) -> float:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megaopsd.algorithm.forward import PairedForward

    paired = PairedForward(
        student_chunks=student.chunks, teacher=teacher, loss_fn=loss_fn, all_position_logits=all_positions
    )
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


def executed_flops(shape, mbs, *, all_positions: bool) -> dict[str, int]:
    """FLOPs each stream's work costs as executed: padded lengths, logits where computed."""
    from megaopsd.flops import forward_flops

    student = teacher = 0
    for mb in mbs:
        rows = mb.student_index_T.numel()  # response tokens of the microbatch
        s_rows = mb.batch_size * mb.student_len if all_positions else rows
        t_rows = mb.batch_size * mb.teacher_len if all_positions else rows
        # forward_flops(shape, 0, n) is the output layer on n rows alone
        student += 3 * (
            mb.batch_size * forward_flops(shape, mb.student_len, 0) + forward_flops(shape, 0, s_rows)
        )
        teacher += mb.batch_size * forward_flops(shape, mb.teacher_len, 0) + forward_flops(shape, 0, t_rows)
    return {"student": student, "teacher": teacher}


def sync() -> None:
    """All ranks (and the GPU's queue) done before the clock is read."""
    if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl":
        torch.cuda.synchronize()
    torch.distributed.barrier()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128, help="student prompt tokens")
    parser.add_argument("--teacher-prompt", type=int, default=384, help="teacher prompt tokens")
    parser.add_argument("--response-min", type=int, default=32)
    parser.add_argument("--response-max", type=int, default=512)
    parser.add_argument("--microbatch-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def setup(args):
    """Runtime and the trainer's own components (HF weights, fixed teacher, DDP, Adam, JSD)."""
    from megaopsd.components import build_components
    from megaopsd.config import Config, LossConfig, ModelConfig, ParallelConfig, RuntimeConfig, TrainerConfig
    from megaopsd.runtime import Runtime, read_launch_env
    from tools.make_tiny_model import make_tiny_model

    par_cfg = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    rt_cfg = RuntimeConfig(cpu_threads=0 if read_launch_env().world_size == 1 else 1)
    runtime = Runtime.start(par_cfg, rt_cfg)
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
        parts = build_components(cfg, runtime)
        torch.distributed.barrier()  # every rank has read the model before rank 0 deletes it
    return runtime, parts.spec, parts.student, parts.teacher, parts.loss_fn


def main() -> None:
    args = parse_args()
    from megaopsd.algorithm.batch import build_microbatches, padding_fraction
    from megaopsd.flops import ModelShape

    runtime, spec, student, teacher, loss_fn = setup(args)
    samples = make_samples(
        spec.vocab_size, args.rollouts, args.prompt, args.teacher_prompt, args.response_min, args.response_max
    )
    paths = {
        name: build_microbatches(
            samples, max_tokens=args.microbatch_tokens, pad_id=0, length_aware=name == "new"
        )
        for name in ("old", "new")
    }
    timings = {(path, kind): [] for path in paths for kind in ("paired", "student")}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for path, mbs in paths.items():
            for kind in ("student", "paired"):
                seconds = time_step(
                    student,
                    teacher,
                    mbs,
                    loss_fn,
                    student_only=kind == "student",
                    all_positions=path == "old",
                )
                if repeat:
                    timings[(path, kind)].append(seconds)
    med = {key: statistics.median(values) for key, values in timings.items()}
    shape = ModelShape.of(spec)
    flops = {path: executed_flops(shape, mbs, all_positions=path == "old") for path, mbs in paths.items()}
    total = {path: f["student"] + f["teacher"] for path, f in flops.items()}
    result = {
        "new_over_old": med[("new", "paired")] / med[("old", "paired")],
        "flop_new_over_old": total["new"] / total["old"],
        "teacher_overhead_new": med[("new", "paired")] / med[("new", "student")] - 1,
        "teacher_flop_new": flops["new"]["teacher"] / flops["new"]["student"],
        "teacher_overhead_old": med[("old", "paired")] / med[("old", "student")] - 1,
        "teacher_flop_old": flops["old"]["teacher"] / flops["old"]["student"],
        "padding_old": padding_fraction(paths["old"]),
        "padding_new": padding_fraction(paths["new"]),
    }
    if runtime.is_main:
        report(args, spec, runtime, paths, med, result)
    runtime.shutdown()


def report(args, spec, runtime, paths, med, r) -> None:
    device = f"{torch.cuda.get_device_name()} (CUDA)" if runtime.device.type == "cuda" else "CPU"
    print(
        f"{spec.architecture} {args.preset} (vocab {spec.vocab_size}) on {device}, TP{args.tp} PP{args.pp}: "
        f"{args.rollouts} rollouts, student prompt {args.prompt}, teacher prompt {args.teacher_prompt}, "
        f"responses {args.response_min}-{args.response_max}, {args.microbatch_tokens} tokens per microbatch"
    )
    print(
        f"{'path':<6}{'microbatches':>13}{'padding':>9}{'student s':>11}{'paired s':>10}{'teacher':>9}{'FLOP est':>10}"
    )
    for path in ("old", "new"):
        print(
            f"{path:<6}{len(paths[path]):>13}{r[f'padding_{path}']:>9.3f}{med[(path, 'student')]:>11.3f}"
            f"{med[(path, 'paired')]:>10.3f}{r[f'teacher_overhead_{path}']:>9.3f}{r[f'teacher_flop_{path}']:>10.3f}"
        )
    print(
        f"new / old paired step: {r['new_over_old']:.3f} measured, {r['flop_new_over_old']:.3f} predicted by FLOPs; "
        f"teacher overhead (new) {r['teacher_overhead_new']:.3f} vs FLOP estimate {r['teacher_flop_new']:.3f} "
        f"({r['teacher_overhead_new'] / r['teacher_flop_new']:.2f}x)"
    )
    fields = " ".join(f"{key}={value:.3f}" for key, value in r.items())
    print(
        f"RESULT paired_step {fields} preset={args.preset} rollouts={args.rollouts} tp={args.tp} pp={args.pp}"
    )


if __name__ == "__main__":
    main()
