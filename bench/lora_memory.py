"""Trainer memory of LoRA + fixed teacher against full-parameter training + fixed teacher.

Both runs build the trainer's own components (``build_components``: HF weights, teacher, DDP,
Adam) for the ``small`` preset (~100M parameters), take one optimizer step (Adam allocates its
state on the first step) and account the bytes of every tensor the trainer holds, each storage
counted once:

- params:    the student's parameters (base + adapters);
- grads:     megatron DDP's gradient buffers (and any ``.grad``);
- optimizer: Adam's state (and fp32 master copies, if any);
- teacher:   storages the teacher holds beyond the student's (a frozen copy; none for LoRA).

Each run is its own process; its peak RSS is printed too (it includes the Python/torch runtime).

    python bench/lora_memory.py                      # small preset, LoRA rank 64 alpha 128
    python bench/lora_memory.py --preset tiny        # quick check

Ends with ``RESULT lora_memory full_mb=... lora_mb=... saved_mb=... weight_copy_mb=...``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MB = 1 << 20


def _bytes(tensors, seen: set[int]) -> int:
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _state_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _state_tensors(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _state_tensors(value)


def _rollouts(vocab: int, count: int = 4):
    """Fixed rollouts shaped like the trainer's (student / teacher prompt ids, response ids)."""
    import random

    rng = random.Random(0)

    class Sample:
        def __init__(self):
            self.student_prompt_ids = [rng.randrange(vocab) for _ in range(32)]
            self.teacher_prompt_ids = self.student_prompt_ids + [rng.randrange(vocab) for _ in range(32)]
            self.response_ids = [rng.randrange(vocab) for _ in range(32)]

    return [Sample() for _ in range(count)]


def measure(hf_dir: str, lora_rank: int, alpha: float) -> dict[str, float]:
    """One process: build, one step, account (MiB)."""
    from megaopsd.algorithm.batch import build_microbatches
    from megaopsd.algorithm.step import train_step
    from megaopsd.components import build_components
    from megaopsd.config import Config, LoraConfig, ModelConfig, RuntimeConfig, TeacherConfig, TrainerConfig
    from megaopsd.runtime import Runtime

    cfg = Config(
        model=ModelConfig(hf_path=hf_dir),
        runtime=RuntimeConfig(cpu_threads=0),
        teacher=TeacherConfig(mode="fixed"),
        trainer=TrainerConfig(lr=1e-5),
        lora=LoraConfig(rank=lora_rank, alpha=alpha),
    )
    runtime = Runtime.start(cfg.parallel, cfg.runtime)
    parts = build_components(cfg, runtime)
    mbs = build_microbatches(_rollouts(parts.spec.vocab_size), max_tokens=10**6, pad_id=0)
    train_step(
        student=parts.student,
        teacher=parts.teacher,
        microbatches=mbs,
        loss_fn=parts.loss_fn,
        parallel=runtime.parallel,
    )
    seen: set[int] = set()
    params = _bytes((p for c in parts.chunks for p in c.parameters()), seen)
    grad_tensors = [b.grad_data for c in parts.student.chunks for b in c.buffers]
    grad_tensors += [p.grad for c in parts.chunks for p in c.parameters() if p.grad is not None]
    grads = _bytes(grad_tensors, seen)
    optimizer = _bytes(_state_tensors(parts.student.optimizer.state_dict()), seen)
    teacher = _bytes((p for i in range(len(parts.chunks)) for p in parts.teacher.chunk(i).parameters()), seen)
    trainable = sum(p.numel() for c in parts.chunks for p in c.parameters() if p.requires_grad)
    runtime.shutdown()
    values = {"params": params, "grads": grads, "optimizer": optimizer, "teacher": teacher}
    out = {k: v / MB for k, v in values.items()}
    out["total"] = sum(values.values()) / MB
    out["trainable_params"] = float(trainable)
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=128.0)
    args = parser.parse_args()
    from bench._ranks import run_ranks
    from tools.make_tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = str(make_tiny_model("qwen3", Path(tmp) / "model", preset=args.preset))
        full = run_ranks(measure, world_size=1, args=(hf_dir, 0, 16.0))[0]
        lora = run_ranks(measure, world_size=1, args=(hf_dir, args.rank, args.alpha))[0]
    copy_mb = full["params"]  # the full run's parameters: the size of one weight copy
    print(f"{'MiB':<12}{'full+fixed':>12}{'lora+fixed':>12}")
    for key in ("params", "grads", "optimizer", "teacher", "total", "peak_rss"):
        print(f"{key:<12}{full[key]:>12.1f}{lora[key]:>12.1f}")
    print(f"trainable parameters: full {full['trainable_params']:.0f}, lora {lora['trainable_params']:.0f}")
    saved = full["total"] - lora["total"]
    print(f"LoRA saves {saved:.1f} MiB = {saved / copy_mb:.2f} weight copies ({copy_mb:.1f} MiB each)")
    print(
        f"RESULT lora_memory full_mb={full['total']:.1f} lora_mb={lora['total']:.1f} "
        f"saved_mb={saved:.1f} weight_copy_mb={copy_mb:.1f} saved_copies={saved / copy_mb:.2f}"
    )


if __name__ == "__main__":
    main()
