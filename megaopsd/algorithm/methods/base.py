"""What every training method provides, and what one step of it trains on.

A method is one class (``Algorithm``) registered under its ``algorithm.name``
(``megaopsd.algorithm.methods``). The trainer, ``build_components`` and the entry point's
validation ask it instead of comparing names:

    method = make_algorithm(cfg)                          # opsd | grpo | sft
    teacher = method.make_teacher(chunks, build)          # its teacher or reference, or None
    loss_fn = method.make_loss(vocab_size=..., tp_group=..., think_token_ids=...)
    batch = method.training_batch(prompts, inputs)        # rollouts, or references, to train on
    if method.sync_after_step(eval_due=...): refit the engines
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from megaopsd.algorithm.baselines import rewards_of
from megaopsd.config import Config, ConfigError
from megaopsd.eval.grading import Grader, GradingSettings
from megaopsd.runtime.parallel import ParallelState


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingBatch:
    """One step's data on this replica: what was sampled (for logs) and what is trained on."""

    sampled: list  # the step's rollouts (SFT: the reference responses)
    train: list  # what the update trains on (GRPO: after dynamic sampling)
    advantages: list[float] | None = None  # GRPO, one per ``train`` entry
    in_loss: list[bool] | None = None  # GRPO, one per ``train`` entry
    scalars: dict[str, float] = dataclasses.field(default_factory=dict)  # the method's own tags
    empty: bool = False  # GRPO: no group anywhere had mixed rewards; the step has no update


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepInputs:
    """The trainer's collaborators a method may use to build a step's batch."""

    tokenizer: Any
    parallel: ParallelState
    rollouts: Callable[[list], list]  # prompts -> this replica's rollouts (collective: the fleet)
    next_prompts: Callable[[int], list]  # the next n prompts of the data stream (every rank alike)
    has_teacher: bool  # a teacher or reference model scores a second stream
    # (problem, privileged text) -> the teacher prompt's ids in the run's template, or None when
    # over data.max_teacher_prompt_tokens (teacher contexts built after sampling)
    teacher_prompt_ids: Callable[[str, str], list[int] | None] | None = None
    completed_steps: int = 0  # optimizer steps before this one (schedules of the method's own)


class Algorithm:
    """One training method on the paired schedule. Subclasses set ``name`` and override what differs.

    Class attributes:
        name: the ``algorithm.name`` it is registered under.
        samples_rollouts: whether training steps sample from the engines (False: SFT, whose
            engines only evaluate; their generated tokens are not training cost).
        whole_prompts: whether a data-parallel replica must hold whole prompts (GRPO's groups,
            SFT's references), so ``trainer.prompts_per_step`` must divide by the DP size.
        teacher_reads_student_prompt: whether the second stream scores the response after the
            student's own prompt (GRPO's frozen KL reference) instead of the teacher prompt.
        divergence_loss: whether the loss is the teacher-student divergence of ``loss.*``
            (OPSD and its variants) rather than a policy or cross-entropy loss; only these
            methods read ``teacher.context`` (``check_config`` refuses it for the others).
    """

    name: ClassVar[str]
    samples_rollouts: ClassVar[bool] = True
    whole_prompts: ClassVar[bool] = False
    teacher_reads_student_prompt: ClassVar[bool] = False
    divergence_loss: ClassVar[bool] = False

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.grader: Grader | None = None  # math-verify workers, for methods that grade their rollouts

    @classmethod
    def check_config(cls, cfg: Config, *, dp_size: int) -> None:
        """The method's own config rules, after ``megaopsd.config.validate`` (raise ``ConfigError``)."""
        if cfg.teacher.context != "solution" and not cls.divergence_loss:
            from megaopsd.algorithm.methods import ALGORITHMS  # the registry imports this module

            readers = " or ".join(name for name, method in ALGORITHMS.items() if method.divergence_loss)
            raise ConfigError(
                f"config: teacher.context={cfg.teacher.context!r} applies to algorithm.name={readers}, "
                f"not {cls.name} (it picks the divergence teacher's context); use teacher.context=solution"
            )
        tr = cfg.trainer
        if cls.whole_prompts and tr.prompts_per_step % dp_size:
            raise ConfigError(
                f"config: trainer.prompts_per_step={tr.prompts_per_step!r} does not split evenly over "
                f"{dp_size} data-parallel replicas ({cls.name} keeps prompts whole); use a multiple of {dp_size}"
            )

    @classmethod
    def uses_teacher(cls, cfg: Config) -> bool:
        """Whether ``make_teacher`` builds a second stream for ``cfg`` (the dry run plans with it)."""
        return False

    def make_teacher(self, chunks: list[torch.nn.Module], build: Callable[[], list[torch.nn.Module]]):
        """The second stream's model (a ``Teacher``), or None for a student-only method."""
        return None

    def make_loss(self, *, vocab_size: int, tp_group, think_token_ids: Sequence[int] = ()):
        """The per-token loss on vocab-parallel logits, bound to the TP group."""
        raise NotImplementedError

    def training_batch(self, prompts: list, inputs: StepInputs) -> TrainingBatch:
        """What this replica trains on this step."""
        raise NotImplementedError

    def start(self) -> None:
        """Start what the method needs for the whole run (worker processes), before the engines."""

    def sync_after_step(self, *, eval_due: bool) -> bool:
        """Whether the engines need the updated weights after this step."""
        return True

    def close(self) -> None:
        """Release what the method holds for the run (worker processes)."""
        if self.grader is not None:
            self.grader.close()
            self.grader = None

    def _start_grader(self) -> None:
        """Start the reward grader (killable math-verify workers) for the whole run."""
        self.grader = Grader(GradingSettings.of(self.cfg.eval))

    def _rewards(self, rollouts: list, prompts: list, inputs: StepInputs) -> list[float]:
        """1.0 for each rollout whose answer the verifier accepts, else 0.0."""
        assert self.grader is not None, "call start() before the first step"
        return rewards_of(rollouts, prompts, self.grader, inputs.tokenizer)
