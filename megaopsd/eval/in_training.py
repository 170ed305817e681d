"""Evaluation during training: the benchmarks and grader kept for the run, scored through the live engine.

The benchmarks load (and may fail) when the evaluator starts, before the rollout engine does,
so a bad benchmark name leaks no engine. Every evaluation uses the same request seeds
(``runner.evaluate`` with a fixed step), so two evaluations differ by the weights only.

    evaluator = InTrainingEvaluator.start(cfg.eval, template)   # None when evaluation is off
    if evaluator is not None and eval_due(cfg.eval, step):
        values = evaluator.evaluate(engine, tokenizer)   # eval/<benchmark>/...
    evaluator.close()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from megaopsd.config import EvalConfig
from megaopsd.data.prompts import STUDENT_TEMPLATE
from megaopsd.eval.benchmarks import Benchmark, load_benchmark, parse_benchmark_arg
from megaopsd.eval.grading import Grader, GradingSettings
from megaopsd.eval.runner import evaluate as evaluate_engine
from megaopsd.rollout.types import SamplingSettings

if TYPE_CHECKING:
    from megaopsd.rollout.engine import RolloutEngine


class InTrainingEvaluator:
    """The loaded benchmarks and a long-lived grader (on every rank: the engines generate together)."""

    def __init__(
        self,
        cfg: EvalConfig,
        benchmarks: Sequence[Benchmark],
        grader: Grader,
        template: str = STUDENT_TEMPLATE,
    ):
        self.cfg, self.benchmarks, self.grader, self.template = cfg, list(benchmarks), grader, template

    @classmethod
    def start(cls, cfg: EvalConfig, template: str = STUDENT_TEMPLATE) -> InTrainingEvaluator | None:
        """Load the benchmarks and start the grader; None when evaluation is off.

        ``template`` is the student prompt template of the run (``data.prompt_style``): the model
        is evaluated on the prompt it is trained on.
        """
        if not (cfg.interval or cfg.at_start):
            return None
        benchmarks = [load_benchmark(*parse_benchmark_arg(b), limit=cfg.limit) for b in cfg.benchmarks]
        grader = Grader(GradingSettings.of(cfg))
        return cls(cfg, benchmarks, grader, template)

    def evaluate(self, engine: RolloutEngine, tokenizer: Any) -> dict[str, float]:
        """``eval/<benchmark>/...`` of the engine's current weights."""
        return evaluate_engine(
            engine,
            tokenizer,
            self.benchmarks,
            k=self.cfg.k,
            sampling=SamplingSettings.from_config(self.cfg),
            grader=self.grader,
            template=self.template,
            enable_thinking=self.cfg.enable_thinking,
        )

    def close(self) -> None:
        self.grader.close()


def eval_due(cfg: EvalConfig, step: int) -> bool:
    """Every ``cfg.interval`` steps (never when 0); every rank can ask, with or without an evaluator."""
    return bool(cfg.interval) and step % cfg.interval == 0
