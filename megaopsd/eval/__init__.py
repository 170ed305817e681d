"""Evaluation: answer grading, pass@k / avg@k / majority@k, benchmark loading and the eval loop.

Importing this package imports neither vLLM nor torch nor math-verify (the grading workers
import math-verify in their own processes).
"""

from megaopsd.eval.benchmarks import REGISTRY, Benchmark, BenchmarkProblem, BenchmarkSpec, load_benchmark
from megaopsd.eval.grading import Grade, Grader, GradingSettings, extract_boxed, verify_answer
from megaopsd.eval.metrics import avg_at_k, majority_at_k, pass_at_k
from megaopsd.eval.runner import BenchmarkResult, SampleRecord, evaluate, run_benchmark, summarize

__all__ = [
    "REGISTRY",
    "Benchmark",
    "BenchmarkProblem",
    "BenchmarkResult",
    "BenchmarkSpec",
    "Grade",
    "Grader",
    "GradingSettings",
    "SampleRecord",
    "avg_at_k",
    "evaluate",
    "extract_boxed",
    "load_benchmark",
    "majority_at_k",
    "pass_at_k",
    "run_benchmark",
    "summarize",
    "verify_answer",
]
