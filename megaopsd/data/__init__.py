"""Problems, solutions and OPSD prompts: loading, validation, templates, a resumable order."""

from megaopsd.data.dataset import DataError, LoadedExamples, ProblemDataset, ProblemExample, load_examples
from megaopsd.data.prompts import PromptBuilder, PromptPair, PromptTemplates
from megaopsd.data.stream import PromptStream, build_prompt_stream

__all__ = [
    "DataError",
    "LoadedExamples",
    "ProblemDataset",
    "ProblemExample",
    "PromptBuilder",
    "PromptPair",
    "PromptStream",
    "PromptTemplates",
    "build_prompt_stream",
    "load_examples",
]
