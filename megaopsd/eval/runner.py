"""Sample k responses per benchmark problem with a rollout engine, grade them, score them.

The trainer calls ``evaluate`` every N steps with its live engine (after a weight sync) and
logs the returned ``eval/<benchmark>/...`` values; ``tools/eval_math.py`` calls
``run_benchmark`` for the per-sample records as well.

Prompts are the student's: ``PromptTemplates.student`` filled with the problem, through the
tokenizer's chat template with thinking on (the paper's protocol), tokenised once. Each
response is decoded, its last ``\\boxed{}`` graded with math-verify (``grading.Grader``).

Seeds: request seeds derive from (sampling.seed, step, problem index). A fixed ``step`` (the
default 0) gives every evaluation of a run the same random numbers, so differences between
two evaluations come from the weights rather than from the draw.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from megaopsd.data.prompts import STUDENT_TEMPLATE, encode_rendered, fill_template, render_user_prompt
from megaopsd.eval.benchmarks import Benchmark
from megaopsd.eval.grading import STATUS_NO_ANSWER, Grader
from megaopsd.eval.metrics import avg_at_k, majority_at_k, pass_at_k
from megaopsd.progress import progress_factory

if TYPE_CHECKING:  # megaopsd.rollout's package import pulls in torch; the runner needs neither
    from megaopsd.rollout.engine import RolloutEngine
    from megaopsd.rollout.types import SamplingSettings


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleRecord:
    """One graded response (one line of the per-sample jsonl).

    Attributes:
        benchmark: the benchmark's name.
        problem_id: the problem's id within the benchmark.
        sample_index: which of the k responses (0-based).
        reference: the reference answer.
        response: the decoded response text.
        extracted_answer: the last boxed answer, or None.
        correct: the grade.
        grade_status: ``graded``, ``no_answer``, ``timeout`` or ``error``.
        response_tokens: the response length in tokens (a stop token included).
        finish_reason: ``stop`` or ``length``.
    """

    benchmark: str
    problem_id: str
    sample_index: int
    reference: str
    response: str
    extracted_answer: str | None
    correct: bool
    grade_status: str
    response_tokens: int
    finish_reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchmarkResult:
    """A benchmark's records and summary (``summarize``)."""

    name: str
    k: int
    records: list[SampleRecord]
    summary: dict[str, float]


def build_prompt_ids(
    tokenizer: Any,
    benchmark: Benchmark,
    *,
    template: str = STUDENT_TEMPLATE,
    enable_thinking: bool = True,
) -> list[list[int]]:
    """The token ids of each problem's student prompt (chat template applied)."""
    return [
        encode_rendered(
            tokenizer,
            render_user_prompt(
                tokenizer, fill_template(template, problem=p.problem), enable_thinking=enable_thinking
            ),
        )
        for p in benchmark.problems
    ]


def summarize(records: Sequence[SampleRecord], k: int) -> dict[str, float]:
    """Per-benchmark numbers from its records (every problem must have exactly k of them).

    Returns:
        ``num_problems``, ``avg@k``, ``pass@k``, ``majority@k`` (means over problems),
        ``response_length_mean`` (tokens, over all responses), ``no_answer_frac`` and
        ``truncated_frac`` (fractions of responses), with the number k in the names.
    """
    by_problem: dict[str, list[SampleRecord]] = defaultdict(list)
    for record in records:
        by_problem[record.problem_id].append(record)
    counts = {len(samples) for samples in by_problem.values()}
    if not by_problem or counts != {k}:
        raise ValueError(f"every problem needs exactly k={k} records; found counts {sorted(counts)}")
    per_problem = [sorted(s, key=lambda r: r.sample_index) for s in by_problem.values()]
    n = len(per_problem)
    return {
        "num_problems": float(n),
        f"avg@{k}": sum(avg_at_k([r.correct for r in s]) for s in per_problem) / n,
        f"pass@{k}": sum(pass_at_k(k, sum(r.correct for r in s), k) for s in per_problem) / n,
        f"majority@{k}": sum(
            majority_at_k([r.extracted_answer for r in s], [r.correct for r in s]) for s in per_problem
        )
        / n,
        "response_length_mean": sum(r.response_tokens for r in records) / len(records),
        "no_answer_frac": sum(r.grade_status == STATUS_NO_ANSWER for r in records) / len(records),
        "truncated_frac": sum(r.finish_reason == "length" for r in records) / len(records),
    }


def run_benchmark(
    engine: RolloutEngine,
    tokenizer: Any,
    benchmark: Benchmark,
    *,
    k: int,
    sampling: SamplingSettings,
    grader: Grader,
    template: str = STUDENT_TEMPLATE,
    enable_thinking: bool = True,
    step: int = 0,
    show_progress: bool = False,
) -> BenchmarkResult:
    """Sample k responses per problem (``sampling`` with ``n=k``), grade and summarize them.

    ``show_progress``: report generation (samples, token rates) and grading (answers) with rate
    and ETA on stderr, as ``<benchmark>: generate`` and ``<benchmark>: grade`` (``megaopsd.progress``).

    Returns:
        Records ordered problem-major (all samples of problem 0, then problem 1, ...).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    prompts = build_prompt_ids(tokenizer, benchmark, template=template, enable_thinking=enable_thinking)
    generating = (
        progress_factory(desc=f"{benchmark.name}: generate", unit="sample") if show_progress else None
    )
    completions = engine.generate(prompts, dataclasses.replace(sampling, n=k), step=step, progress=generating)
    flat = [
        (problem, index, completion)
        for problem, samples in zip(benchmark.problems, completions, strict=True)
        for index, completion in enumerate(samples)
    ]
    texts = [tokenizer.decode(c.response_ids, skip_special_tokens=True) for _, _, c in flat]
    grades = grader.grade_responses(
        texts,
        [problem.answer for problem, _, _ in flat],
        progress=f"{benchmark.name}: grade" if show_progress else None,
    )
    records = [
        SampleRecord(
            benchmark=benchmark.name,
            problem_id=problem.problem_id,
            sample_index=index,
            reference=problem.answer,
            response=text,
            extracted_answer=grade.extracted_answer,
            correct=grade.correct,
            grade_status=grade.status,
            response_tokens=len(completion.response_ids),
            finish_reason=completion.finish_reason,
        )
        for (problem, index, completion), text, grade in zip(flat, texts, grades, strict=True)
    ]
    return BenchmarkResult(name=benchmark.name, k=k, records=records, summary=summarize(records, k))


def evaluate(
    engine: RolloutEngine,
    tokenizer: Any,
    benchmarks: Sequence[Benchmark],
    *,
    k: int,
    sampling: SamplingSettings,
    grader: Grader | None = None,
    template: str = STUDENT_TEMPLATE,
    enable_thinking: bool = True,
    step: int = 0,
) -> dict[str, float]:
    """Evaluate the engine's current weights on each benchmark; values ready to log.

    Args:
        engine: the rollout engine (the trainer's live one, after weight sync).
        tokenizer: the model's Hugging Face tokenizer.
        benchmarks: loaded benchmarks (``benchmarks.load_benchmark``).
        k: responses per problem.
        sampling: temperature, top-p, top-k, max_new_tokens, seed (``n`` is replaced by k).
        grader: a long-lived grader to reuse; None starts one for this call.
        template: the student prompt template (``{problem}``).
        enable_thinking: the chat template's thinking switch.
        step: part of each request seed; keep it fixed for the same draws at every evaluation.

    Returns:
        ``eval/<benchmark>/avg@<k>``, ``eval/<benchmark>/pass@<k>``,
        ``eval/<benchmark>/majority@<k>`` and ``eval/<benchmark>/response_length_mean``.
    """
    own_grader = grader is None
    grader = grader or Grader()
    values: dict[str, float] = {}
    try:
        for benchmark in benchmarks:
            result = run_benchmark(
                engine,
                tokenizer,
                benchmark,
                k=k,
                sampling=sampling,
                grader=grader,
                template=template,
                enable_thinking=enable_thinking,
                step=step,
            )
            for key in (f"avg@{k}", f"pass@{k}", f"majority@{k}", "response_length_mean"):
                values[f"eval/{benchmark.name}/{key}"] = result.summary[key]
    finally:
        if own_grader:
            grader.close()
    return values
