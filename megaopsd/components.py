"""The one construction path for training: HF config -> chunks -> HF weights -> teacher -> optimizer -> loss.

The trainer, the distributed tests and the benchmarks all build through ``build_components``,
so a change to the order (the teacher must copy the student *after* the HF weights are loaded
and *before* DDP wraps the chunks; the copy must not consume the student's RNG) is made once.

    runtime = Runtime.start(cfg.parallel, cfg.runtime)
    parts = build_components(cfg, runtime)
    train_step(student=parts.student, teacher=parts.teacher, loss_fn=parts.loss_fn, ...)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch

from megaopsd.algorithm.forward import LossFn
from megaopsd.algorithm.methods import Algorithm, make_algorithm
from megaopsd.algorithm.optim import TrainableStudent, wrap_student
from megaopsd.algorithm.policy_loss import StudentLoss
from megaopsd.algorithm.teacher import Teacher
from megaopsd.config import Config
from megaopsd.config.hf_spec import HFModelSpec
from megaopsd.convert import load_hf_weights
from megaopsd.loss.logprobs import token_logprobs
from megaopsd.models import build_model_chunks, load_hf_config
from megaopsd.models.lora import add_lora
from megaopsd.runtime.parallel import Runtime


@dataclasses.dataclass(frozen=True, kw_only=True)
class Components:
    """Everything the paired update needs, built for this rank's layout."""

    spec: HFModelSpec  # the parsed HF config
    chunks: list[torch.nn.Module]  # this rank's unwrapped GPTModel chunks (the student's modules)
    build_chunks: Callable[[], list[torch.nn.Module]]  # fresh chunks like ``chunks`` (random init)
    teacher: Teacher | None  # None: a student-only algorithm (GRPO without KL, SFT)
    student: TrainableStudent  # DDP-wrapped ``chunks`` with optimizer and LR schedule
    loss_fn: LossFn | StudentLoss  # the per-token loss on vocab-parallel logits, bound to the TP group
    logprob_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # student logprobs of sampled ids


def build_components(
    cfg: Config, runtime: Runtime, *, think_token_ids: Sequence[int] = (), method: Algorithm | None = None
) -> Components:
    """Build the student (weights from ``cfg.model.hf_path``), its teacher, optimizer and loss.

    Args:
        cfg: the validated config (model, parallel, teacher, trainer and loss sections are read).
        runtime: the started runtime; its parallel state decides this rank's chunks.
        think_token_ids: the tokenizer's think tags, for the thinking-boundary metrics.
        method: the run's training method (``make_algorithm(cfg)`` when omitted): its teacher and loss.

    Returns:
        The components; the student and the teacher (if any) hold identical weights at return.
    """
    parallel = runtime.parallel
    method = method if method is not None else make_algorithm(cfg)
    spec = load_hf_config(cfg.model.hf_path)
    build = functools.partial(build_model_chunks, spec, cfg.model, parallel)
    chunks = build()
    load_hf_weights(chunks, spec, cfg.model.hf_path, parallel, progress=runtime.is_main)
    if cfg.lora.enabled:
        # Adapters and the frozen base before DDP: its buffers and the optimizer see adapters only.
        add_lora(chunks, cfg.lora)
    # The teacher copies the loaded weights before DDP wraps the chunks (LoRA: no copy).
    teacher = method.make_teacher(chunks, build)
    student = wrap_student(
        chunks, trainer=cfg.trainer, parallel=cfg.parallel, bf16=cfg.model.dtype == "bfloat16"
    )
    tp_group = parallel.tp_group
    return Components(
        spec=spec,
        chunks=chunks,
        build_chunks=build,
        teacher=teacher,
        student=student,
        loss_fn=method.make_loss(
            vocab_size=spec.vocab_size, tp_group=tp_group, think_token_ids=think_token_ids
        ),
        logprob_fn=functools.partial(token_logprobs, vocab_size=spec.vocab_size, tp_group=tp_group),
    )
